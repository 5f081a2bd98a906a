"""Scoring single neurons as face detectors, chosen on one split and measured on another.

Three measures of "positive iff activation > threshold", each with its own
choice of neuron (and threshold) on the validation split, then measured on
the disjoint test split:

- ``paper``: Le et al.'s figure: plain accuracy at the best of 20 evenly
  spaced thresholds between the neuron's minimum and maximum activation (on
  the validation split here; the paper chose on its test set). Chance is the
  share of the majority class.
- ``balanced``: balanced accuracy (mean of the true-positive and
  true-negative rates) at the best threshold (``common.fit_thresholds``);
  chance 50%.
- ``auc``: area under the ROC curve (no threshold); chance 50%.

Pure NumPy over (examples x neurons) matrices; every neuron of every layer
is a candidate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from downpour.evals.common import balanced_accuracy, fit_thresholds

N_THRESHOLDS = 20  # Le et al. 2012, section 4.1
MEASURES = ("paper", "balanced", "auc")


def _concat(layers: dict[str, np.ndarray]):
    names = list(layers)
    A = np.concatenate([np.asarray(layers[k], np.float32) for k in names], axis=1)
    offsets = np.cumsum([0] + [layers[k].shape[1] for k in names])
    return names, A, offsets


def paper_thresholds(A: np.ndarray, y: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per column: the best of ``N_THRESHOLDS`` evenly spaced thresholds between its min and
    max for plain accuracy of "positive iff > threshold", and that accuracy."""
    y = np.asarray(y).astype(bool)
    m = A.shape[1]
    thr, acc = np.empty(m), np.empty(m)
    frac = np.linspace(0.0, 1.0, N_THRESHOLDS)
    for j in range(0, m, chunk):
        a = np.asarray(A[:, j : j + chunk], np.float64)
        lo, hi = a.min(axis=0), a.max(axis=0)
        T = lo[None] + frac[:, None] * (hi - lo)[None]  # (20, m)
        pred = a[None] > T[:, None]  # (20, n, m)
        correct = (pred == y[None, :, None]).mean(axis=1)  # (20, m)
        k = correct.argmax(axis=0)
        cols = np.arange(a.shape[1])
        thr[j : j + chunk], acc[j : j + chunk] = T[k, cols], correct[k, cols]
    return thr, acc


def plain_accuracy(scores: np.ndarray, y: np.ndarray, threshold: float) -> float:
    return float(((np.asarray(scores) > threshold) == np.asarray(y).astype(bool)).mean())


def auc(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    """ROC AUC of every column of ``A`` as a score for ``y`` (ties count a half): the
    Mann-Whitney statistic over average ranks."""
    from scipy.stats import rankdata  # noqa: PLC0415 - heavy (~0.3 s), only the faces eval scores AUCs

    y = np.asarray(y).astype(bool)
    P, N = int(y.sum()), int((~y).sum())
    if P == 0 or N == 0:
        raise ValueError("need both positive and negative examples for an ROC AUC")
    r = rankdata(np.asarray(A, np.float64), axis=0)
    return (r[y].sum(axis=0) - P * (P + 1) / 2) / (P * N)


@dataclass
class Choice:
    measure: str
    layer: str
    index: int  # flat index into the layer's (C, H, W) activations
    threshold: float | None  # None for AUC
    val: float
    test: float


def choose_and_test(layers: dict[str, np.ndarray], y: np.ndarray, val: np.ndarray) -> dict[str, Choice]:
    """For each measure: the neuron (and threshold) best on ``val``, measured on ``~val``."""
    names, A, offsets = _concat(layers)
    y = np.asarray(y)
    yv, yt = y[val], y[~val]
    Av, At = A[val], A[~val]

    def where(j) -> tuple[str, int]:
        li = int(np.searchsorted(offsets, j, side="right") - 1)
        return names[li], int(j - offsets[li])

    out = {}
    thr, acc = paper_thresholds(Av, yv)
    j = int(acc.argmax())
    out["paper"] = Choice("paper", *where(j), float(thr[j]), float(acc[j]), plain_accuracy(At[:, j], yt, thr[j]))
    thr, acc = fit_thresholds(Av, yv)
    j = int(acc.argmax())
    out["balanced"] = Choice(
        "balanced", *where(j), float(thr[j]), float(acc[j]), balanced_accuracy(At[:, j], yt, thr[j])
    )
    a = auc(Av, yv)
    j = int(a.argmax())
    out["auc"] = Choice("auc", *where(j), None, float(a[j]), float(auc(At[:, j : j + 1], yt)[0]))
    return out


@dataclass
class Selection:
    """Every column's figures on a selection set, computed once so that any subset of the columns
    can then choose its best neuron per measure (``choose``) without scoring them again."""

    thresholds: dict[str, np.ndarray]  # measure -> per-column threshold (AUC: none)
    scores: dict[str, np.ndarray]  # measure -> per-column figure on the selection set


def selection(A: np.ndarray, y: np.ndarray, chunk: int = 2048) -> Selection:
    """Per column of ``A`` (selection images x neurons): the paper's and the balanced measure's
    best threshold and accuracy, and the ROC AUC; in chunks of columns, so memory stays bounded."""
    m = A.shape[1]
    thr = {k: np.empty(m) for k in ("paper", "balanced")}
    sc = {k: np.empty(m) for k in MEASURES}
    for j in range(0, m, chunk):
        a = np.asarray(A[:, j : j + chunk], np.float32)
        thr["paper"][j : j + chunk], sc["paper"][j : j + chunk] = paper_thresholds(a, y)
        thr["balanced"][j : j + chunk], sc["balanced"][j : j + chunk] = fit_thresholds(a, y)
        sc["auc"][j : j + chunk] = auc(a, y)
    return Selection(thr, sc)


def choose(sel: Selection, columns: np.ndarray, A_test: np.ndarray, y_test: np.ndarray) -> dict[str, tuple]:
    """Per measure, the best of ``columns`` on the selection set: (column, threshold, selection
    figure, held-out figure on ``A_test``)."""
    out: dict[str, tuple[int, float | None, float, float]] = {}
    for m in MEASURES:
        j = int(columns[int(np.argmax(sel.scores[m][columns]))])
        a = A_test[:, j]
        if m == "auc":
            out[m] = (j, None, float(sel.scores[m][j]), float(auc(a[:, None], y_test)[0]))
            continue
        t = float(sel.thresholds[m][j])
        test = plain_accuracy(a, y_test, t) if m == "paper" else balanced_accuracy(a, y_test, t)
        out[m] = (j, t, float(sel.scores[m][j]), test)
    return out


def as_dict(choices: dict[str, Choice]) -> dict:
    return {k: asdict(v) for k, v in choices.items()}
