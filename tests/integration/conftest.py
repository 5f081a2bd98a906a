"""Shared helpers for the integration tests."""

from __future__ import annotations

import functools

import numpy as np
import pytest


@functools.lru_cache(maxsize=None)
def _initial_loss(preset: str, batch: int = 32) -> float:
    """TICA loss of the initial parameters (seed 0) on bundled training examples, in-process."""
    from downpour.feeder.datasets import open_dataset
    from downpour.feeder.preprocess import PreprocessSpec
    from downpour.nn import Network, presets

    spec = presets.get(preset)
    c, h, w = spec.input
    ds = open_dataset("default", PreprocessSpec(channels=c, size=(h, w), normalize="standardize"))
    x, _ = ds.get(np.arange(0, len(ds), max(1, len(ds) // batch))[:batch])
    net = Network(spec)
    return float(net.tica(net.init_params(0), x)[0])


@pytest.fixture
def initial_loss():
    """The loss a run starts from, computed independently of the cluster."""
    return _initial_loss


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A real `downpour up` run folder: tiny preset, 20 steps, one replica, two shards (about 5 s)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("trained") / "run"
    r = subprocess.run([sys.executable, "-m", "downpour.cli", "up", "--preset", "tiny", "--replicas", "1",
                        "--shards", "2", "--steps", "20", "--quiet", "--no-neurons", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return out
