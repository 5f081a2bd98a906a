"""Confidence intervals for the face experiment: a bootstrap over identities.

The held-out images are not independent: every view of one face (or of one
non-face photograph, or one face's phase-scrambled views) shares that
identity's luck. So the bootstrap resamples *clusters* (``cluster`` ids: an
identity with all of its views), with replacement, separately for positives
and negatives (their counts stay fixed) and separately within each fold's
held-out set, and recomputes the measure on the resampled set. One resampling
is drawn for all rows, so a difference between two rows (trained minus random
weights) is paired: both rows are scored on the same resampled identities.

Measures, with each fold's neuron and threshold fixed (they were chosen on
the training identities, never on these images):

- balanced accuracy over the union of the folds' held-out images (each image
  judged by its own fold's neuron and threshold: every face is tested once);
- ROC AUC, the mean of the folds' AUCs (two folds' neurons give scores on
  different scales, so one ROC over their union would mean nothing).

``detectable`` turns a standard error into the smallest difference the test
finds 80% of the time at a two-sided 5% level (normal approximation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_BOOT = 2000
BOOT_SEED = 7  # the resampling is fixed: every run and every row sees the same resamples
Z_ALPHA, Z_POWER = 1.959964, 0.841621  # two-sided 5%, power 80%


def detectable(se: float) -> float:
    """The smallest true difference a test with this standard error detects 80% of the time (5%, two-sided)."""
    return (Z_ALPHA + Z_POWER) * se


@dataclass
class Fold:
    """One fold's held-out images: labels and the cluster (identity) of each."""

    y: np.ndarray  # (n,) 0/1
    cluster: np.ndarray  # (n,) int: images of one cluster are resampled together


def _weights(fold: Fold, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) image weights: how many times each image's cluster was drawn, per resample."""
    y = np.asarray(fold.y).astype(bool)
    cl = np.asarray(fold.cluster)
    if len(y) != len(cl):
        raise ValueError(f"labels ({len(y)}) and clusters ({len(cl)}) differ in length")
    W = np.zeros((n_boot, len(y)), np.float32)
    for cls in (True, False):
        ids, inv = np.unique(cl[y == cls], return_inverse=True)
        if len(ids) == 0:
            raise ValueError(f"a fold's held-out set has no {'positive' if cls else 'negative'} images")
        if np.intersect1d(ids, cl[y != cls]).size:
            raise ValueError("a cluster holds both positive and negative images: clusters must not mix labels")
        counts = rng.multinomial(len(ids), np.full(len(ids), 1.0 / len(ids)), size=n_boot).astype(np.float32)
        W[:, np.flatnonzero(y == cls)] = counts[:, inv]
    return W


def _interval(point: float, boots: np.ndarray) -> dict:
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"mean": float(point), "lo": float(lo), "hi": float(hi), "se": float(np.std(boots, ddof=1))}


class Resampler:
    """One fixed set of cluster resamples of every fold's held-out images, shared by all rows."""

    def __init__(self, folds: list[Fold], n_boot: int = N_BOOT, seed: int = BOOT_SEED):
        if not folds:
            raise ValueError("no folds to resample")
        rng = np.random.default_rng(seed)
        self.folds = folds
        self.n_boot = n_boot
        self.W = [_weights(f, n_boot, rng) for f in folds]
        self.pos = [np.asarray(f.y).astype(bool) for f in folds]

    def _check(self, per_fold: list[np.ndarray]) -> list[np.ndarray]:
        if len(per_fold) != len(self.folds):
            raise ValueError(f"expected one array per fold ({len(self.folds)}), got {len(per_fold)}")
        out = []
        for a, p in zip(per_fold, self.pos):
            a = np.asarray(a)
            if a.shape != p.shape:
                raise ValueError(f"an array of shape {a.shape} for a fold of {len(p)} images")
            out.append(a)
        return out

    def _balanced(self, correct: list[np.ndarray], weights: list[np.ndarray]) -> np.ndarray:
        tp = sum(w[..., p] @ c[p].astype(np.float32) for w, c, p in zip(weights, correct, self.pos))
        npos = sum(w[..., p].sum(axis=-1) for w, p in zip(weights, self.pos))
        tn = sum(w[..., ~p] @ c[~p].astype(np.float32) for w, c, p in zip(weights, correct, self.pos))
        nneg = sum(w[..., ~p].sum(axis=-1) for w, p in zip(weights, self.pos))
        return 0.5 * (tp / npos + tn / nneg)

    def balanced(self, correct: list[np.ndarray]) -> tuple[float, np.ndarray]:
        """(balanced accuracy over the folds' union, its n_boot resampled values); ``correct``:
        per fold, whether each held-out image was judged right."""
        correct = self._check(correct)
        ones = [np.ones(len(p), np.float32) for p in self.pos]
        return float(self._balanced(correct, ones)), self._balanced(correct, self.W)

    def auc(self, scores: list[np.ndarray]) -> tuple[float, np.ndarray]:
        """(mean over folds of the ROC AUC of ``scores`` (per fold, the chosen neuron's activations),
        its resampled values). Ties count a half."""
        scores = self._check(scores)
        point, boots = [], []
        for s, p, W in zip(scores, self.pos, self.W):
            ones = np.ones((1, len(p)), np.float32)
            point.append(_weighted_auc(s, p, ones)[0])
            boots.append(_weighted_auc(s, p, W))
        return float(np.mean(point)), np.mean(boots, axis=0)

    def interval(self, point: float, boots: np.ndarray) -> dict:
        """Mean, 95% percentile interval and standard error of one measure."""
        return _interval(point, boots)

    def difference(self, a: tuple[float, np.ndarray], b: tuple[float, np.ndarray]) -> dict:
        """The paired difference a - b (same resamples), its interval, and whether it is above zero."""
        d = _interval(a[0] - b[0], a[1] - b[1])
        d["above_zero"] = bool(d["lo"] > 0)
        d["detectable"] = detectable(d["se"])
        return d


def _weighted_auc(s: np.ndarray, pos: np.ndarray, W: np.ndarray) -> np.ndarray:
    """ROC AUC of scores ``s`` for labels ``pos`` under each row of image weights ``W`` (B, n)."""
    s = np.asarray(s, np.float64)
    u, inv = np.unique(s, return_inverse=True)
    neg = ~pos
    # weight of negatives at each distinct score, per resample: (B, U)
    wn = np.zeros((W.shape[0], len(u)), np.float64)
    np.add.at(wn.T, inv[neg], W[:, neg].T.astype(np.float64))
    below = np.cumsum(wn, axis=1) - wn  # negatives strictly below each distinct score
    credit = below + 0.5 * wn  # ties count a half
    wp = W[:, pos].astype(np.float64)
    num = (wp * credit[:, inv[pos]]).sum(axis=1)
    return num / (wp.sum(axis=1) * W[:, neg].sum(axis=1))
