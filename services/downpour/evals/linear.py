"""Linear classifiers on fixed features: the ``downpour eval supervised`` rows
that read pixels or a frozen pretrained network's features.

A softmax layer is fitted by L-BFGS with an L2 penalty, which is chosen on a
stratified validation fifth of the training examples and then refitted on
all of them (``linear_accuracy``); with more features than examples the fit
runs in the training features' row space (``row_space``), which gives the
same classifier. ``features`` reads a network's layers (``feature_layers``,
``READOUTS``).
"""

from __future__ import annotations

import numpy as np

from downpour.evals import common as C
from downpour.nn import Network

L2_GRID = (1e-3, 1e-2, 1e-1)  # the linear classifiers' penalties, one chosen per row on validation
READOUTS = ("pooled", "outputs", "top", "quadrants")


def softmax_regression(
    f_train: np.ndarray, y: np.ndarray, classes: int, *, l2: float = 1e-4, max_iter: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """A linear softmax classifier on fixed features: mean cross-entropy + l2/2 |W|^2 (bias not
    penalised), minimised by L-BFGS; (W (d, classes), b)."""
    from scipy.optimize import minimize  # noqa: PLC0415 - heavy (~0.3 s), only the supervised eval needs it

    n, d = f_train.shape
    Y = np.eye(classes)[y]

    def loss_and_grad(theta):
        W, b = theta[: d * classes].reshape(d, classes), theta[d * classes :]
        z = f_train @ W + b
        z -= z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        g = (np.exp(logp) - Y) / n
        loss = -(Y * logp).sum() / n + 0.5 * l2 * float((W * W).sum())
        return loss, np.concatenate([(f_train.T @ g + l2 * W).ravel(), g.sum(0)])

    r = minimize(
        loss_and_grad, np.zeros(d * classes + classes), jac=True, method="L-BFGS-B", options={"maxiter": max_iter}
    )
    return r.x[: d * classes].reshape(d, classes), r.x[d * classes :]


def row_space(f_train: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """The same L2-penalised linear problem in min(n, d) dimensions.

    With more features than examples, the penalised optimum W lies in the row space of the
    training features F = U S V^T (the loss gradient is F^T g): W = V C gives F W = U S C and
    |W| = |C|, so a classifier fitted on F V and applied to X V is the one fitted on F and
    applied to X, at the cost of n instead of d columns."""
    n, d = f_train.shape
    if d <= n:
        return (f_train, *others)
    lam, U = np.linalg.eigh(f_train @ f_train.T)
    keep = lam > lam.max() * 1e-10
    V = f_train.T @ (U[:, keep] / np.sqrt(lam[keep]))
    return (f_train @ V, *(o @ V for o in others))


def _prepare(f_train, f_test) -> tuple[np.ndarray, np.ndarray]:
    """Standardised by the training features, in their row space: what every penalty's fit reads."""
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    a, t = row_space((f_train - mu) / sd, (f_test - mu) / sd)
    return a, t


def _fit_and_score(a, y_train, t, y_test, classes, l2) -> float:
    W, b = softmax_regression(a, y_train, classes, l2=l2)
    return float(((t @ W + b).argmax(1) == y_test).mean())


def validation_mask(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for a stratified ``fraction`` of every class (at least one example of a class with two or more)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = max(1, int(round(fraction * len(idx)))) if len(idx) >= 2 else 0
        mask[idx[:k]] = True
    return mask


def linear_accuracy(
    f_train, y_train, f_test, y_test, classes, *, l2_grid=L2_GRID, seed: int = 0
) -> tuple[float, float, dict]:
    """Test accuracy of a linear softmax classifier whose L2 penalty is chosen on a validation fifth of
    the training examples and which is then refitted on all of them: (accuracy, penalty, validation
    accuracy of every penalty)."""
    val_scores = {}
    if len(l2_grid) > 1:
        val = validation_mask(y_train, 0.2, seed)
        a, t = _prepare(f_train[~val], f_train[val])  # once for every penalty
        for l2 in l2_grid:
            val_scores[l2] = _fit_and_score(a, y_train[~val], t, y_train[val], classes, l2)
        l2 = max(l2_grid, key=lambda k: val_scores[k])  # the first (smallest) of equals
    else:
        l2 = l2_grid[0]
    a, t = _prepare(f_train, f_test)
    return _fit_and_score(a, y_train, t, y_test, classes, l2), l2, val_scores


def stage_layers(net: Network) -> list[str]:
    """Every stage's L2-pooled output before its contrast normalisation (its output if it has no pool)."""
    return [f"{st.name}.{'pool' if st.spec.pool is not None else 'output'}" for st in net.stages]


def feature_layers(net: Network, readout: str = "pooled") -> list[str]:
    """The layers a linear classifier on deep features reads: ``pooled``, every stage's L2-pooled
    output before its contrast normalisation (``stage_layers``); ``outputs``, every stage's output;
    ``top``, the last stage's output (what the network's own softmax head reads); ``quadrants``, the
    layers of ``pooled``, each map summed over the four quarters of its grid (``quadrant_sums``)."""
    if readout not in READOUTS:
        raise ValueError(f"readout {readout!r} is unknown; allowed: {', '.join(READOUTS)}")
    if readout == "top":
        return [f"{net.stages[-1].name}.output"]
    if readout == "outputs":
        return [f"{st.name}.output" for st in net.stages]
    return stage_layers(net)


def layer_shape(net: Network, layer: str) -> tuple[int, int, int]:
    """(maps, height, width) of a stage's ``pool`` or ``output`` layer."""
    name, _, part = layer.partition(".")
    st = next(st for st in net.stages if st.name == name)
    if part != "pool":
        return st.out_shape
    if st.pool is None:
        raise ValueError(f"{name} has no pool")
    return st.pool.out_shape


def quadrant_sums(a: np.ndarray) -> np.ndarray:
    """(N, C, H, W) maps -> (N, 4 C): every map summed over the four quarters of its grid (Coates,
    Lee & Ng, AISTATS 2011), per map in the order top left, top right, bottom left, bottom right.
    An odd height or width gives its middle row or column to the top or left half."""
    a = np.asarray(a, np.float64)
    h, w = (a.shape[2] + 1) // 2, (a.shape[3] + 1) // 2
    top, bottom = a[:, :, :h], a[:, :, h:]
    q = [part[..., cols].sum((2, 3)) for part in (top, bottom) for cols in (slice(0, w), slice(w, None))]
    return np.stack(q, axis=2).reshape(len(a), -1)


def from_activations(net: Network, acts: dict[str, np.ndarray], readout: str = "pooled") -> np.ndarray:
    """The readout's features from ``common.activations``' flattened layers (which may hold more)."""
    layers = feature_layers(net, readout)
    if readout == "quadrants":
        return np.concatenate([quadrant_sums(acts[k].reshape(len(acts[k]), *layer_shape(net, k))) for k in layers], 1)
    return np.concatenate([acts[k] for k in layers], axis=1).astype(np.float64)


def features(net: Network, params: dict, x: np.ndarray, readout: str = "pooled") -> np.ndarray:
    return from_activations(net, C.activations(net, params, x, layers=feature_layers(net, readout)), readout)
