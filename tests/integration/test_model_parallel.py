"""Model parallelism through the whole system: workers exchanging halos over gRPC."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from downpour.config import from_yaml
from downpour.partition import join_params, plan
from downpour.paramserver import checkpoint as ckpt

pytestmark = pytest.mark.slow


def up(out, *args, env=None):
    cmd = [sys.executable, "-m", "downpour.cli", "up", "--quiet", "--out", str(out), "--preset", "tiny", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, **(env or {})))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def final_params(out: Path) -> dict[str, np.ndarray]:
    """The newest committed checkpoint's weights, joined into the unpartitioned network's blocks."""
    manifests = sorted(out.glob("checkpoints/*/MANIFEST.json"), key=lambda p: json.loads(p.read_text())["step"])
    m = json.loads(manifests[-1].read_text())
    blocks = {}
    for part in m["shards"]:
        _, _, bl, _ = ckpt.load(Path(part["path"]))
        blocks.update({b.name: b.w.copy() for b in bl})
    cfg = from_yaml(m["config"])
    rows, cols = cfg.grid()
    return join_params(plan(cfg.network_spec(), rows, cols), blocks) if rows * cols > 1 else blocks


def test_one_training_step_with_partitions_equals_one_without(tmp_path):
    # One replica, one step: pull the initial parameters, one batch, one push.
    # Plain SGD: Adagrad's first step, g / (|g| + eps), turns float32 rounding
    # of gradients near eps into visible differences; SGD keeps w - lr * g exact.
    args = ["--replicas", "1", "--shards", "2", "--steps", "1"]
    env = {"DOWNPOUR_OPTIMIZER__KIND": "sgd", "DOWNPOUR_OPTIMIZER__LR": "0.5"}
    up(tmp_path / "whole", *args, env=env)
    up(tmp_path / "grid", *args, "--partitions", "2x2", env=env)
    a, b = final_params(tmp_path / "whole"), final_params(tmp_path / "grid")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6 * float(np.abs(a[k]).max()), err_msg=k)
    # ...and the step did change them (the comparison is not of two initial states)
    from downpour.nn import Network, presets

    init = Network(presets.get("tiny")).init_params(0)
    assert any(not np.allclose(a[k], init[k]) for k in a)


def test_two_replicas_of_2x2_partitions_train_end_to_end(tmp_path):
    out = tmp_path / "run"
    up(out, "--replicas", "2", "--partitions", "2x2", "--shards", "2", "--steps", "30")
    m = json.loads((out / "metrics.json").read_text())
    last = m["history"][-1]
    assert [r["step"] for r in last["replicas"]] == [30, 30]
    losses = [h["replicas"][0]["loss"] for h in m["history"] if h["replicas"] and h["replicas"][0]["step"] > 0]
    assert losses[-1] < 0.8 * losses[0]
    # eight workers, every one exchanged halos with its peers
    logs = list((out / "logs").glob("worker-*.log"))
    assert len(logs) == 8
    started = [line for f in logs for line in f.read_text().splitlines() if "training from step 0" in line]
    assert {line.split("replica ")[1].split(":")[0] for line in started} == {
        f"{r} partition {p}" for r in range(2) for p in range(4)}
