"""``downpour eval supervised`` on tiny: every network trained by a real ``downpour up`` cluster."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_eval_supervised_on_tiny_trains_through_the_cluster(tmp_path):
    from downpour.evals import supervised

    rng = np.random.default_rng(0)
    # a small labeled .npz: three classes told apart by where a bright bar is
    x = rng.random((300, 1, 16, 16)).astype(np.float32) * 0.3
    y = rng.integers(0, 3, 300)
    for i, c in enumerate(y):
        x[i, 0, 2 + 5 * c:5 + 5 * c, :] += 0.7
    np.savez(tmp_path / "d.npz", x=x, y=y)
    out = tmp_path / "out"
    res = supervised.run(str(out), data=str(tmp_path / "d.npz"), preset="tiny", pretrain_steps=30,
                         finetune_steps=40, n_labeled=240, n_test=60, log=lambda *a: None)
    names = [r["row"] for r in res["rows"]]
    assert names == ["chance (most frequent test class)", "linear classifier on pixels",
                     "linear classifier on deep features (pretrained, frozen)", "network trained from random weights",
                     "network fine-tuned from unsupervised pretraining"]
    assert res["classes"] == 3
    assert res["rows"][1]["accuracy"] > 0.9  # the task is learnable
    assert res["rows"][4]["accuracy"] > 0.6  # and the fine-tuned network learned it (chance ~0.33)
    assert json.loads((out / "results.json").read_text())["rows"] == res["rows"]
    jobs = out / "jobs"
    for name in ("pretrain", "from_random", "fine_tune"):
        m = json.loads((jobs / name / "metrics.json").read_text())
        assert [r["step"] for r in m["history"][-1]["replicas"]] == [res["training"][name]["steps_per_replica"]] * 2
    assert json.loads((jobs / "pretrain" / "metrics.json").read_text())["config"]["supervised"] is False
    assert json.loads((jobs / "fine_tune" / "metrics.json").read_text())["config"]["supervised"] is True
    # the fine-tuning job started from the pretraining's checkpoint, the other one did not
    from downpour.nn import Network, presets

    n_stage = len(Network(presets.get("tiny")).block_sizes())
    log = (jobs / "fine_tune" / "logs" / "coordinator.log").read_text()
    assert f"initial values of {n_stage} of {n_stage + 2} blocks from checkpoint" in log
    assert "initial values of" not in (jobs / "from_random" / "logs" / "coordinator.log").read_text()
