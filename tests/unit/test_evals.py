"""The evaluations: the single-neuron classifier against brute force, and both
evals end to end on the tiny preset in seconds."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from downpour.evals import common as C
from downpour.nn import presets


def brute_force(a: np.ndarray, y: np.ndarray) -> float:
    best = 0.0
    vals = np.unique(a)
    for t in np.concatenate([[vals[0] - 1], (vals[:-1] + vals[1:]) / 2, [vals[-1] + 1]]):
        best = max(best, C.balanced_accuracy(a, y, t))
    return best


def test_thresholds_match_brute_force_with_ties():
    rng = np.random.default_rng(0)
    A = rng.integers(0, 6, size=(40, 25)).astype(np.float32)  # many ties
    y = rng.random(40) < 0.3
    thr, acc = C.fit_thresholds(A, y)
    for j in range(A.shape[1]):
        assert acc[j] == pytest.approx(brute_force(A[:, j], y))
        assert C.balanced_accuracy(A[:, j], y, thr[j]) == pytest.approx(acc[j])


def test_best_single_neuron_finds_a_planted_detector():
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(40, bool), np.zeros(160, bool)]
    layers = {"a": rng.standard_normal((200, 300)).astype(np.float32),
              "b": rng.standard_normal((200, 50)).astype(np.float32)}
    layers["b"][:, 17] += 3.0 * y
    groups = np.r_[np.zeros(40), np.ones(160)]
    half = C.stratified_halves(groups, 0)
    assert half[:40].sum() == 20 and half[40:].sum() == 80
    r = C.best_single_neuron(layers, y, half)
    assert all(f.layer == "b" and f.index == 17 for f in r.folds)
    assert r.accuracy > 0.9


def test_without_lcn_removes_every_lcn():
    from downpour.nn import presets

    spec = C.without_lcn(presets.get("small"))
    assert all(s.lcn is None for s in spec.stages)
    assert [s.filter for s in spec.stages] == [s.filter for s in presets.get("small").stages]


def test_training_lowers_the_tica_loss():
    from downpour.feeder import bundled
    from downpour.nn import Network, presets

    spec = presets.get("tiny")
    ds = bundled.build(C.preprocess_for(spec)).train
    r = C.train(Network(spec), ds, steps=150, batch_size=16)
    assert r.steps == 150 and r.last_loss < 0.8 * r.first_loss


def test_eval_faces_on_tiny(tmp_path):
    from downpour.evals import faces

    out = tmp_path / "faces"
    res = faces.run(str(out), preset="tiny", steps=60, stimulus_steps=20, log=lambda *a: None)
    names = [r["row"] for r in res["rows"]]
    assert names == ["chance", "best linear filter (training-sample template)", "best first-stage neuron",
                     "same network, random weights", "trained network (best neuron)", "trained without LCN"]
    assert res["test_set"]["make_up"] == {"faces": 50, "LFW non-faces": 50, "distractors": 200}
    td = res["training_data"]  # by default the plain train split and the preset's sparsity
    assert td["examples"] == 2100 and td["faces"] == 50 and td["face_frames_per_face"] == 0
    assert td["lam"] == [s.lam for s in presets.get("tiny").stages]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in res["rows"])
    for f in ("report.html", "results.json", "top_inputs.png", "optimal_stimulus.png", "filters.png",
              "invariance.png", "table.png", "params.npz"):
        assert os.path.getsize(out / f) > 0, f
    html = (out / "report.html").read_text()
    for png in ("top_inputs.png", "optimal_stimulus.png", "filters.png", "invariance.png", "table.png"):
        assert png in html
    assert set(json.loads((out / "results.json").read_text())["invariance"]) == {
        "horizontal shift (pixels)", "vertical shift (pixels)", "scale (factor)", "in-plane rotation (degrees)"}
    assert res["optimal_stimulus"]["activation"] > res["optimal_stimulus"]["random_max"]


def test_eval_faces_from_a_checkpoint_directory(tmp_path):
    """--checkpoint reads the blocks named by the newest MANIFEST.json."""
    from downpour import config as jobconfig
    from downpour.evals import faces
    from downpour.nn import Network, presets
    from downpour.paramserver import checkpoint as ckpt
    from downpour.paramserver.store import OptimizerConfig, ShardStore

    spec = presets.get("tiny")
    params = Network(spec).init_params(5)
    cfg = jobconfig.load(None, env={}, overrides={"preset": "tiny", "shards": 1})
    store = ShardStore(0, OptimizerConfig())
    for k, v in params.items():
        store.create(k, (np.size(v),), np.asarray(v))
    path = ckpt.shard_path(tmp_path, "step-7", 0)
    path.parent.mkdir(parents=True)
    ckpt.save(store, path)
    (path.parent / "MANIFEST.json").write_text(json.dumps({
        "checkpoint_id": "step-7", "step": 7, "created": 1.0, "config": cfg.to_yaml(),
        "shards": [{"shard": 0, "path": str(path)}], "placement": {k: 0 for k in params}}))
    spec2, normalize, blocks, m = faces.load_checkpoint_dir(str(tmp_path))
    assert spec2 == spec and normalize == "standardize" and m["step"] == 7
    for k, v in params.items():
        np.testing.assert_array_equal(blocks[k], v)
    res = faces.run(str(tmp_path / "out"), checkpoint=str(tmp_path), steps=20, stimulus_steps=5, log=lambda *a: None)
    assert res["checkpoint"]["id"] == "step-7" and "trained" not in res["training"]


def test_eval_faces_experiment_levers(tmp_path):
    from downpour.evals import faces

    res = faces.run(str(tmp_path / "out"), preset="tiny", steps=10, stimulus_steps=5, n_splits=1, face_frames=2,
                    lam=0.05, log=lambda *a: None)
    td = res["training_data"]
    assert td["examples"] == 2100 + 2 * 50 and td["faces"] == 150 and td["lam"] == [0.05] * 3
    # the template row still uses the plain training examples only, not the frames
    assert res["rows"][1]["note"] == "2100 templates"


def test_eval_supervised_bundled_fallback_loads_18_classes():
    from downpour.evals import supervised
    from downpour.nn import presets

    what, xu, xl, yl, xt, yt, k = supervised.load_data("bundled", presets.get("tiny"), normalize="standardize",
                                                       n_unlabeled=10, n_labeled=10, n_test=10)
    assert k == 18 and len(xl) == 2000 and len(xt) == 500 and set(np.unique(yt)) <= set(range(18))
    assert "bundled" in what


def test_eval_parsers():
    import argparse

    from downpour.evals import add_eval_parser

    ap = argparse.ArgumentParser()
    add_eval_parser(ap.add_subparsers(dest="command"))
    a = ap.parse_args(["eval", "faces", "--checkpoint", "runs/x/checkpoints", "--steps", "10"])
    assert a.checkpoint == "runs/x/checkpoints" and a.steps == 10 and callable(a.func)
    b = ap.parse_args(["eval", "supervised", "--data", "d.npz"])
    assert b.data == "d.npz" and callable(b.func)
