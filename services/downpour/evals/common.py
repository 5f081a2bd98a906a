"""Shared pieces of the evaluations: in-process training, activations of every
neuron, and the single-neuron classifier of Le et al. (2012).

A *single-neuron classifier* predicts "positive" when one neuron's activation
exceeds a threshold. The neuron and the threshold are chosen on a validation
half and the accuracy is measured on the other (test) half; the halves are
then swapped, and this is repeated over several random stratified halvings;
the row is the mean test accuracy over all those folds (with its spread), so
that a lucky split does not decide a row. Accuracy is *balanced* (the mean of the
true-positive and true-negative rates: every class weighs the same), so
chance is 50% whatever the class mix.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

from downpour import scalars
from downpour.feeder.preprocess import PreprocessSpec
from downpour.nn import Network
from downpour.nn.spec import NetworkSpec
from downpour.optim import OptimizerConfig
from downpour.worker.loop import DownpourLoop, LocalStore

# The experiments' own Adagrad, not the job's defaults (lr 0.01, accumulator 0.1, tuned for
# asynchronous replicas): in-process synchronous training takes the larger step from a zero
# accumulator. docs/experiments.md's tables were measured with these values.
OPTIMIZER = OptimizerConfig(kind="adagrad", lr=0.02, eps=1e-6, initial_accumulator=0.0)
DEFAULT_LR = OPTIMIZER.lr
DEFAULT_EPS = OPTIMIZER.eps
OBJECTIVE_EVERY = 100  # steps between the rows of TrainResult.objective


def preprocess_for(spec: NetworkSpec, normalize: str = "standardize") -> PreprocessSpec:
    """What the feeder gives a job with this model: its channels and size, per-example normalisation."""
    c, h, w = spec.input
    return PreprocessSpec(channels=c, size=(h, w), normalize=normalize)


def without_lcn(spec: NetworkSpec) -> NetworkSpec:
    """The same network with every stage's local contrast normalisation removed."""
    return dataclasses.replace(spec, stages=tuple(dataclasses.replace(s, lcn=None) for s in spec.stages))


@dataclass
class TrainResult:
    params: dict
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    # Every OBJECTIVE_EVERY steps: the step and each scalar of the objective (per-stage terms,
    # weight norms, dead and dense units) averaged over those steps, as downpour up records them.
    objective: list[dict] = field(default_factory=list)

    @property
    def first_loss(self) -> float:
        return float(np.mean(self.losses[:20])) if self.losses else float("nan")

    @property
    def last_loss(self) -> float:
        return float(np.mean(self.losses[-20:])) if self.losses else float("nan")


def batches(dataset, batch_size: int, seed: int):
    """Endless seeded minibatches (x, y) of a dataset, a fresh permutation per epoch."""
    rng = np.random.default_rng(seed)
    n = len(dataset)
    while True:
        order = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            x, y = dataset.get(order[i : i + batch_size])
            yield x, y


def train(
    net: Network,
    dataset,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = DEFAULT_LR,
    eps: float = DEFAULT_EPS,
    seed: int = 0,
    supervised: bool = False,
    params: dict | None = None,
    time_budget: float | None = None,
    log=None,
) -> TrainResult:
    """Train in this process with the Downpour loop against an in-memory Adagrad store.

    The experiments' optimizer (``OPTIMIZER``) with ``lr`` and ``eps`` in place of its own.
    TICA (unsupervised) by default, softmax cross-entropy with ``supervised``.
    Stops after ``steps`` or when ``time_budget`` seconds have passed.
    """
    init = params if params is not None else net.init_params(seed)
    optimizer = dataclasses.replace(OPTIMIZER, lr=lr, eps=eps)
    store = LocalStore({k: np.asarray(v) for k, v in init.items()}, optimizer)
    objective = net.supervised if supervised else (lambda p, x, y: net.tica(p, x))
    loop = DownpourLoop(objective, store, list(init), batches(dataset, batch_size, seed + 1), overlap=False)
    losses: list[float] = []
    means, watched = scalars.Means(), []
    t0 = time.perf_counter()
    done = 0
    try:
        for step in range(steps):
            r = loop.step(step, first=step == 0)
            losses.append(r.loss)
            means.add(r.info)
            done = step + 1
            if done % OBJECTIVE_EVERY == 0 or done == steps:
                watched.append({"step": done, **scalars.with_ratios(means.take())})
            if log is not None and (done % 500 == 0 or done == steps):
                log(f"  step {done}/{steps}: loss {np.mean(losses[-50:]):.4g} ({time.perf_counter() - t0:.0f}s)")
            if time_budget is not None and time.perf_counter() - t0 > time_budget:
                break
    finally:
        loop.close()
    return TrainResult(store.pull(list(init)), done, time.perf_counter() - t0, losses, watched)


def activations(
    net: Network, params: dict, x: np.ndarray, layers: list[str] | None = None, batch: int = 256
) -> dict[str, np.ndarray]:
    """Every layer's activations for ``x``, each flattened to (N, neurons) float32."""
    out: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(x), batch):
        acts = net.forward(params, x[i : i + batch])
        for k, v in acts.items():
            if layers is None or k in layers:
                out.setdefault(k, []).append(np.asarray(v, np.float32).reshape(len(v), -1))
    return {k: np.concatenate(v) for k, v in out.items()}


# -- single-neuron classifiers ------------------------------------------------------


def fit_thresholds(A: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every column of ``A`` (examples x neurons): the threshold that maximises the
    balanced accuracy of "positive iff activation > threshold" on labels ``y``, and
    that accuracy. Thresholds fall midway between consecutive distinct values."""
    A = np.asarray(A, np.float64)
    y = np.asarray(y).astype(bool)
    n, m = A.shape
    P, N = int(y.sum()), int((~y).sum())
    if P == 0 or N == 0:
        raise ValueError("need both positive and negative examples to fit a threshold")
    order = np.argsort(A, axis=0, kind="stable")
    s = np.take_along_axis(A, order, axis=0)
    ys = y[order]
    # cut i (0..n): the i smallest are predicted negative
    neg_below = np.vstack([np.zeros((1, m)), np.cumsum(~ys, axis=0)])
    pos_below = np.vstack([np.zeros((1, m)), np.cumsum(ys, axis=0)])
    bal = 0.5 * (neg_below / N + (P - pos_below) / P)
    valid = np.ones((n + 1, m), bool)
    valid[1:n] = s[1:] > s[:-1]  # no cut between equal values
    bal = np.where(valid, bal, -1.0)
    best = bal.argmax(axis=0)
    cols = np.arange(m)
    lo = np.where(best > 0, s[np.maximum(best - 1, 0), cols], -np.inf)
    hi = np.where(best < n, s[np.minimum(best, n - 1), cols], np.inf)
    thr = np.where(np.isinf(lo), hi - 1.0, np.where(np.isinf(hi), lo + 1.0, 0.5 * (lo + hi)))
    return thr, bal[best, cols]


def balanced_accuracy(scores: np.ndarray, y: np.ndarray, threshold: float) -> float:
    y = np.asarray(y).astype(bool)
    pred = np.asarray(scores) > threshold
    return float(0.5 * (pred[y].mean() + (~pred[~y]).mean()))


def stratified_halves(groups: np.ndarray, seed: int) -> np.ndarray:
    """A boolean mask: True for the first half of every group (shuffled with ``seed``)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(groups), bool)
    for g in np.unique(groups):
        idx = rng.permutation(np.flatnonzero(groups == g))
        mask[idx[: len(idx) // 2]] = True
    return mask


@dataclass
class NeuronChoice:
    layer: str
    index: int  # flat index into the layer's (C, H, W) activations
    threshold: float
    val_accuracy: float
    test_accuracy: float


@dataclass
class SingleNeuronResult:
    accuracy: float  # mean test accuracy over every fold
    folds: list[NeuronChoice]

    @property
    def choice(self) -> NeuronChoice:
        """The neuron chosen on the first validation half."""
        return self.folds[0]

    @property
    def std(self) -> float:
        """Spread of the test accuracy over the folds."""
        return float(np.std([f.test_accuracy for f in self.folds]))


def best_single_neuron(
    layers: dict[str, np.ndarray], y: np.ndarray, first_half: np.ndarray | list[np.ndarray]
) -> SingleNeuronResult:
    """Pick neuron + threshold on one half, measure on the other; both ways round.

    ``first_half`` is one mask or a list of masks (repeated random halvings):
    the accuracy is then the mean over all 2 x len(masks) folds."""
    names = list(layers)
    A = np.concatenate([layers[k] for k in names], axis=1)
    offsets = np.cumsum([0] + [layers[k].shape[1] for k in names])
    masks = [first_half] if isinstance(first_half, np.ndarray) else list(first_half)
    folds = []
    for half in masks:
        for val in (half, ~half):
            thr, acc = fit_thresholds(A[val], y[val])
            j = int(acc.argmax())
            li = int(np.searchsorted(offsets, j, side="right") - 1)
            test = balanced_accuracy(A[~val, j], y[~val], thr[j])
            folds.append(NeuronChoice(names[li], j - int(offsets[li]), float(thr[j]), float(acc[j]), test))
    return SingleNeuronResult(float(np.mean([f.test_accuracy for f in folds])), folds)
