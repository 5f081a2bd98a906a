"""``downpour eval supervised`` on tiny: every network trained by a real ``downpour up`` cluster."""

from __future__ import annotations

import json

import numpy as np
import pytest

from downpour.evals import probes, supervised
from downpour.nn import Network, presets

pytestmark = pytest.mark.slow


def test_eval_supervised_on_tiny_trains_through_the_cluster(tmp_path):
    rng = np.random.default_rng(0)
    # a small labeled .npz: three classes told apart by where a bright bar is
    x = rng.random((300, 1, 16, 16)).astype(np.float32) * 0.3
    y = rng.integers(0, 3, 300)
    for i, c in enumerate(y):
        x[i, 0, 2 + 5 * c : 5 + 5 * c, :] += 0.7
    np.savez(tmp_path / "d.npz", x=x, y=y)
    out = tmp_path / "out"
    res = supervised.run(
        str(out),
        data=str(tmp_path / "d.npz"),
        preset="tiny",
        seeds=2,
        labels=(30, 120),
        pretrain_steps=30,
        finetune_steps=40,
        head_only_steps=10,
        n_test=60,
        replicas=1,
        log=lambda *a: None,
    )
    assert res["seeds"] == [0, 1] and res["labels"] == [120, 30] and res["classes"] == 3
    rows = {(r["row"], r["labels"]): r for r in res["rows"]}
    names = [*supervised.ROWS, *probes.probe_rows(Network(presets.get("tiny")))]
    assert [r["row"] for r in res["rows"]] == names + names and len(rows) == 2 * 12
    for r in res["rows"]:
        assert len(r["accuracies"]) == 2 and r["mean"] == pytest.approx(np.mean(r["accuracies"]))
        assert r["spread"] == pytest.approx(np.std(r["accuracies"], ddof=1))
    assert rows["linear classifier on pixels", 120]["mean"] > 0.9  # the task is learnable
    assert rows["network fine-tuned from unsupervised pretraining", 120]["mean"] > 0.6  # and learned (chance ~0.33)
    assert len(res["comparisons"]) == 2 * (3 + 4) and {c["verdict"] for c in res["comparisons"]} <= {
        "gain",
        "loss",
        "within the spread",
    }
    assert {c["l2"] for c in res["linear_choices"]} <= set(supervised.L2_GRID) and len(res["linear_choices"]) == 36
    assert json.loads((out / "results.json").read_text())["rows"] == res["rows"]
    assert (out / "curve.png").stat().st_size > 1000 and (out / "probes.png").stat().st_size > 1000
    assert res["probe_layers"] == ["stage1.pool", "stage2.pool", "stage3.pool"]
    jobs = out / "jobs"
    for s in (0, 1):
        for name in ("pretrain", "labels30/from_random", "labels120/fine_tune"):
            m = json.loads((jobs / f"seed{s}" / name / "metrics.json").read_text())
            assert (
                [r["step"] for r in m["history"][-1]["replicas"]]
                == [res["training"][f"seed{s}/{name}"]["steps_per_replica"]]
                == [40 if "labels" in name else 30]
            )
            assert m["config"]["seed"] == s
    sd = jobs / "seed1"
    assert json.loads((sd / "pretrain" / "metrics.json").read_text())["config"]["supervised"] is False
    ft = json.loads((sd / "labels30" / "fine_tune" / "metrics.json").read_text())["config"]
    assert ft["supervised"] is True and ft["head_only_steps"] == 10
    assert json.loads((sd / "labels30" / "from_random" / "metrics.json").read_text())["config"]["head_only_steps"] == 0
    # the labeled sets: 30 of the 120, balanced, and a different draw for each seed
    d0 = np.load(jobs / "seed0" / "labels30" / "from_random" / "data.npz")
    d1 = np.load(sd / "labels30" / "from_random" / "data.npz")
    assert len(d0["y"]) == 30 and list(np.bincount(d0["y"])) == [10, 10, 10]
    assert not np.array_equal(d0["x"], d1["x"])
    # the fine-tuning job started from its own seed's pretraining checkpoint, the other one did not
    n_stage = len(Network(presets.get("tiny")).block_sizes())
    log = (sd / "labels30" / "fine_tune" / "logs" / "coordinator.log").read_text()
    assert f"initial values of {n_stage} of {n_stage + 2} blocks from checkpoint" in log
    assert str(sd / "pretrain" / "checkpoints") in log
    assert "initial values of" not in (sd / "labels30" / "from_random" / "logs" / "coordinator.log").read_text()
