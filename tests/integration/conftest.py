"""Shared fixtures of the integration tests: the initial loss, shards, the one trained run, a photo."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import harness
from downpour.feeder.datasets import open_dataset
from downpour.feeder.preprocess import PreprocessSpec
from downpour.nn import Network, presets


@functools.cache
def _initial_loss(preset: str, batch: int = 32) -> float:
    """TICA loss of the initial parameters (seed 0) on bundled training examples, in-process."""
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


@pytest.fixture
def shards(procs):
    """Start a `downpour serve paramserver FLAGS` shard; it is SERVING when returned."""

    def start(*flags: str, **kw) -> harness.Service:
        return procs.serve("paramserver", *flags, **kw)

    return start


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A real `downpour up` run folder: tiny preset, 20 steps, one replica, two shards (about 5 s).

    The one trained run of the suite: test_explorer and test_using_networks both read it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    r = harness.run_cli(
        "up",
        "--preset",
        "tiny",
        "--replicas",
        "1",
        "--shards",
        "2",
        "--steps",
        "20",
        "--quiet",
        "--no-neurons",
        "--out",
        str(out),
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A 120x90 RGB JPEG with structure (a gradient and a disc), as a camera would give."""
    yy, xx = np.mgrid[0:90, 0:120]
    rgb = np.stack([xx * 2, yy * 2, ((xx - 70) ** 2 + (yy - 40) ** 2 < 400) * 255], -1).clip(0, 255).astype(np.uint8)
    p = tmp_path_factory.mktemp("photo") / "photo.jpg"
    Image.fromarray(rgb).save(p, quality=95)
    return p
