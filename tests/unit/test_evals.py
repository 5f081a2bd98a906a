"""The evaluations: the single-neuron classifier against brute force, the
supervised eval's data and both evals' parsers (eval faces: test_eval_faces.py)."""

from __future__ import annotations

import numpy as np
import pytest

from downpour.evals import common as C
from downpour.nn import Network, presets


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
    layers = {
        "a": rng.standard_normal((200, 300)).astype(np.float32),
        "b": rng.standard_normal((200, 50)).astype(np.float32),
    }
    layers["b"][:, 17] += 3.0 * y
    groups = np.r_[np.zeros(40), np.ones(160)]
    half = C.stratified_halves(groups, 0)
    assert half[:40].sum() == 20 and half[40:].sum() == 80
    r = C.best_single_neuron(layers, y, half)
    assert all(f.layer == "b" and f.index == 17 for f in r.folds)
    assert r.accuracy > 0.9


def test_without_lcn_removes_every_lcn():

    spec = C.without_lcn(presets.get("small"))
    assert all(s.lcn is None for s in spec.stages)
    assert [s.filter for s in spec.stages] == [s.filter for s in presets.get("small").stages]


def test_training_lowers_the_tica_loss():
    from downpour.feeder import bundled
    from downpour.nn import Network

    spec = presets.get("tiny")
    ds = bundled.build(C.preprocess_for(spec)).train
    r = C.train(Network(spec), ds, steps=150, batch_size=16)
    assert r.steps == 150 and r.last_loss < 0.8 * r.first_loss


def test_eval_supervised_bundled_fallback_loads_18_classes():
    from downpour.evals import supervised

    what, xu, xl, yl, xt, yt, k = supervised.load_data(
        "bundled", presets.get("tiny"), normalize="standardize", n_unlabeled=10, n_labeled=10, n_test=10
    )
    assert k == 18 and len(xl) == 2000 and len(xt) == 500 and set(np.unique(yt)) <= set(range(18))
    assert "bundled" in what


def test_eval_parsers():
    import argparse

    from downpour.evals.cli import add_eval_parser

    ap = argparse.ArgumentParser()
    add_eval_parser(ap.add_subparsers(dest="command"))
    a = ap.parse_args(
        ["eval", "faces", "--checkpoint", "runs/x/checkpoints", "--steps", "10", "--test", "mine", "--seed", "3"]
    )
    assert a.checkpoint == "runs/x/checkpoints" and a.steps == 10 and callable(a.func)
    assert a.test_dir == "mine" and a.seed == 3 and a.whiten == "none" and not a.untied and not a.in_process
    c = ap.parse_args(["eval", "faces", "--positives", "cats/", "--negatives", "rooms/", "--budget", "60"])
    assert c.positives == "cats/" and c.negatives == "rooms/" and c.budget == 60.0
    b = ap.parse_args(["eval", "supervised", "--data", "d.npz"])
    assert b.data == "d.npz" and callable(b.func)


def test_in_process_training_records_the_objective():
    # evals.common.train keeps, every OBJECTIVE_EVERY steps, each stage's terms, their ratio and
    # the weights' norms, averaged over those steps (as downpour up's metrics.json does).
    net = Network(presets.get("tiny"))

    class Data:
        x = np.random.default_rng(0).normal(size=(64, 1, 16, 16)).astype(np.float32)

        def __len__(self):
            return len(self.x)

        def get(self, idx):
            return self.x[idx], None

    steps = C.OBJECTIVE_EVERY + 7
    tr = C.train(net, Data(), steps=steps, batch_size=8)
    assert [r["step"] for r in tr.objective] == [C.OBJECTIVE_EVERY, steps]
    last = tr.objective[-1]
    for s in ("stage1", "stage2", "stage3"):
        assert last[f"{s}.ratio"] == pytest.approx(last[f"{s}.sparsity"] / last[f"{s}.reconstruction"])
        assert last[f"{s}.W1.norm_min"] <= last[f"{s}.W1.norm_mean"] <= last[f"{s}.W1.norm_max"]
    # the recorded terms are the mean of the steps' own: their sum over stages is the mean loss
    total = sum(last[f"{s}.{t}"] for s in ("stage1", "stage2", "stage3") for t in ("reconstruction", "sparsity"))
    assert total == pytest.approx(np.mean(tr.losses[C.OBJECTIVE_EVERY :]), rel=1e-6)
