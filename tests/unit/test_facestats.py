"""The identity bootstrap of the face experiment against naive, independent computations."""

import numpy as np
import pytest

from downpour.evals import facestats as F
from downpour.evals.neuronscore import auc as naive_auc


def _fold(rng, n_pos_ids=6, views=3, n_neg=10):
    y = np.r_[np.ones(n_pos_ids * views, int), np.zeros(n_neg, int)]
    cluster = np.r_[np.repeat(np.arange(n_pos_ids), views), 100 + np.arange(n_neg)]
    return F.Fold(y, cluster)


def test_weights_resample_whole_clusters_and_keep_class_counts():
    rng = np.random.default_rng(0)
    fold = _fold(rng)
    r = F.Resampler([fold], n_boot=300, seed=1)
    W = r.W[0]
    pos = fold.y == 1
    # a cluster's images always share one weight: whole identities are drawn
    for c in np.unique(fold.cluster):
        m = fold.cluster == c
        assert np.all(W[:, m] == W[:, m][:, :1])
    # as many clusters of each class are drawn as there are
    assert np.all(W[:, pos].sum(axis=1) == 6 * 3)
    assert np.all(W[:, ~pos].sum(axis=1) == 10)
    assert W[:, pos].std() > 0  # it does resample


def test_balanced_and_auc_match_a_naive_expansion_of_each_resample():
    rng = np.random.default_rng(2)
    folds = [_fold(rng), _fold(rng, n_pos_ids=5, views=2, n_neg=7)]
    r = F.Resampler(folds, n_boot=40, seed=3)
    correct = [rng.random(len(f.y)) < 0.7 for f in folds]
    scores = [rng.normal(size=len(f.y)) + f.y + np.round(rng.random(len(f.y)), 1) for f in folds]
    point, boots = r.balanced(correct)
    pa, ba = r.auc(scores)

    def naive_balanced(cs, ys):
        c, y = np.concatenate(cs), np.concatenate(ys)
        return 0.5 * (c[y == 1].mean() + c[y == 0].mean())

    assert point == pytest.approx(naive_balanced(correct, [f.y for f in folds]))
    assert pa == pytest.approx(np.mean([naive_auc(s[:, None], f.y)[0] for s, f in zip(scores, folds)]))
    for b in range(40):
        reps = [r.W[k][b].astype(int) for k in range(2)]
        cs = [np.repeat(correct[k], reps[k]) for k in range(2)]
        ys = [np.repeat(folds[k].y, reps[k]) for k in range(2)]
        assert boots[b] == pytest.approx(naive_balanced(cs, ys), abs=1e-6)
        aucs = [naive_auc(np.repeat(scores[k], reps[k])[:, None], ys[k])[0] for k in range(2)]
        assert ba[b] == pytest.approx(np.mean(aucs), abs=1e-9)


def test_paired_difference_and_its_interval():
    rng = np.random.default_rng(4)
    folds = [_fold(rng, n_pos_ids=40, views=4, n_neg=200)]
    r = F.Resampler(folds, n_boot=500)
    y = folds[0].y
    a = r.balanced([rng.random(len(y)) < 0.9])
    b = r.balanced([rng.random(len(y)) < 0.6])
    d = r.difference(a, b)
    assert d["mean"] == pytest.approx(a[0] - b[0])
    assert d["lo"] < d["mean"] < d["hi"] and d["above_zero"]
    assert d["detectable"] == pytest.approx(2.8016 * d["se"], rel=1e-3)
    same = r.difference(a, a)
    assert same["mean"] == 0 and same["se"] == 0 and not same["above_zero"]


def test_interval_width_follows_the_number_of_identities():
    """More identities, a narrower interval: about 1/sqrt(identities) for the positives' share."""
    rng = np.random.default_rng(5)
    widths = []
    for ids in (20, 80):
        fold = _fold(rng, n_pos_ids=ids, views=4, n_neg=400)
        correct = np.r_[np.repeat(rng.random(ids) < 0.7, 4), np.ones(400, bool)]
        r = F.Resampler([fold], n_boot=1000)
        iv = r.interval(*r.balanced([correct]))
        widths.append(iv["hi"] - iv["lo"])
    assert 1.4 < widths[0] / widths[1] < 2.8  # sqrt(4) = 2


def test_bad_input_is_named():
    rng = np.random.default_rng(6)
    fold = _fold(rng)
    with pytest.raises(ValueError, match="both positive and negative"):
        F.Resampler([F.Fold(fold.y, np.zeros_like(fold.cluster))])
    with pytest.raises(ValueError, match="no negative"):
        F.Resampler([F.Fold(np.ones(4, int), np.arange(4))])
    r = F.Resampler([fold], n_boot=10)
    with pytest.raises(ValueError, match="one array per fold"):
        r.balanced([])
    with pytest.raises(ValueError, match="shape"):
        r.auc([np.zeros(3)])
