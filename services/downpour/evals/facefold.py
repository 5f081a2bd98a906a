"""One fold of ``downpour eval faces``: every row's neuron chosen on the training identities,
then judged on the held-out identities.

A *source* is anything with units: a network (every layer's activations),
the k-means centroids, the autoencoder's hidden units, or the training
frames used as linear templates. A *row* is a source and a set of
candidate units (``ROWS``): the top stage's non-negative pooled units (the
primary candidates: a few, as in the paper), every unit of every layer (the
secondary, as the earlier eval did), or one stage's units.

For each row and each test (B: moved views over held-out backgrounds with
hard negatives; A: the aligned images), ``Scored.pick`` chooses the neuron and its
threshold on the *selection* set (views of the training identities, whose
labels are used only to choose) and keeps, for the held-out set, whether
each image was judged right (balanced accuracy's choice) and the scores of
the AUC's choice, for the identity bootstrap (``facestats``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from downpour.evals import neuronscore as S

# (key, label, source, candidates): candidates "top" (the top stage's pooled units), "all"
# (every unit the source has), or a stage name
ROWS = (
    ("linear", "best linear filter (each training frame as a template)", "linear", "all"),
    ("first_stage", "best first-stage neuron (trained network)", "trained", "stage1"),
    ("random_top", "random weights: top-stage pooled units", "random", "top"),
    ("random_all", "random weights: every unit", "random", "all"),
    ("trained_top", "trained network: top-stage pooled units", "trained", "top"),
    ("trained_all", "trained network: every unit", "trained", "all"),
    ("no_lcn_top", "trained without LCN: top-stage pooled units", "no_lcn", "top"),
    ("no_lcn_all", "trained without LCN: every unit", "no_lcn", "all"),
    ("no_faces_top", "control, trained without the objects: top-stage pooled units", "no_faces", "top"),
    ("no_faces_all", "control, trained without the objects: every unit", "no_faces", "all"),
    ("kmeans", "k-means on whitened frames (every centroid)", "kmeans", "all"),
    ("autoencoder", "autoencoder (every hidden unit)", "autoencoder", "all"),
)
NETWORKS = ("trained", "random", "no_lcn", "no_faces")
TESTS = ("B", "A")


def stages_of(layers) -> list[str]:
    """The stage names among the layer names, in order (stage1, stage2, ...)."""
    return sorted({k.split(".")[0] for k in layers if k.startswith("stage")}, key=lambda s: int(s[5:]))


def top_layer(layers) -> str:
    """The top stage's non-negative pooled units (its pool layer; its output if it has no pooling)."""
    stages = stages_of(layers)
    if not stages:
        raise ValueError(f"no stage layers among {sorted(layers)}")
    top = stages[-1]
    return f"{top}.pool" if f"{top}.pool" in layers else f"{top}.output"


def candidates(layers, which: str) -> list[str]:
    """The layer names a row chooses among."""
    layers = list(layers)
    if which == "all":
        return layers
    if which == "top":
        return [top_layer(layers)]
    picked = [k for k in layers if k.split(".")[0] == which]
    if not picked:
        raise ValueError(f"no layer of {which} among {layers}")
    return picked


@dataclass
class Pick:
    """One row's choice on one test of one fold."""

    choice: dict  # measure -> {layer, index, threshold, val (selection figure), test (held-out figure)}
    correct: np.ndarray  # held-out images: judged right by the balanced measure's neuron and threshold
    scores: np.ndarray  # held-out images: activations of the AUC measure's neuron


class Scored:
    """One source's units on one test: every column scored once on the selection side, so that
    each candidate set (top stage, every unit, one stage) only picks its best."""

    def __init__(self, sel: dict, held: dict, y_sel: np.ndarray, y_held: np.ndarray):
        self.names = list(sel)
        widths = [sel[k].shape[1] for k in self.names]
        self.offsets = dict(zip(self.names, np.cumsum([0] + widths[:-1]).tolist()))
        self.widths = dict(zip(self.names, widths))
        self.held = np.concatenate([np.asarray(held[k], np.float32) for k in self.names], axis=1)
        self.y_held = np.asarray(y_held)
        A_sel = np.concatenate([np.asarray(sel[k], np.float32) for k in self.names], axis=1)
        self.selection = S.selection(A_sel, np.asarray(y_sel))

    def pick(self, layers: list[str]) -> Pick:
        cols = np.concatenate([self.offsets[k] + np.arange(self.widths[k]) for k in layers])
        ch = S.choose(self.selection, cols, self.held, self.y_held)
        choice = {}
        for m, (j, t, val, test) in ch.items():
            layer = max((k for k in layers if self.offsets[k] <= j), key=lambda k: self.offsets[k])
            choice[m] = {"layer": layer, "index": j - self.offsets[layer], "threshold": t, "val": val, "test": test}
        jb, tb = ch["balanced"][0], ch["balanced"][1]
        correct = (self.held[:, jb] > tb) == self.y_held.astype(bool)
        return Pick(choice, correct, self.held[:, ch["auc"][0]].astype(np.float64))


def score_fold(acts: dict, labels: dict) -> dict:
    """Every row (and every network's best neuron per stage) on both tests of one fold.

    ``acts[source][test]`` = (selection activations, held-out activations), each a dict layer ->
    (images, units); ``labels[test]`` = (selection labels, held-out labels). Sources absent from
    ``acts`` (a network not trained in this run) leave their rows out.
    """
    out: dict = {"rows": {}, "by_stage": {}}
    for source in list(acts):
        for t in TESTS:
            sel, held = acts[source][t]
            scored = Scored(sel, held, *labels[t])
            for key, _, src, which in ROWS:
                if src == source:
                    out["rows"].setdefault(key, {})[t] = scored.pick(candidates(sel, which))
            if source in NETWORKS:
                out["by_stage"].setdefault(source, {})[t] = {s: scored.pick(candidates(sel, s)) for s in stages_of(sel)}
            del scored
        del acts[source]  # free each source's activations once scored
    return out
