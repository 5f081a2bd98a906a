"""Synthetic data whose sources are known, and whether reconstruction TICA recovers them.

The classic ICA set-up (Hyvarinen & Oja 2000): n independent Laplacian
sources s (unit variance) are mixed by a random, well-conditioned matrix A,
x = A s, and the mixtures are ZCA-whitened, x_w = V (x - mean) with V the
whitening matrix. The sources are then recoverable exactly up to order,
sign and scale: the directions that unmix them are the rows of (V A)^-1 (for
a whitened set V A is nearly orthogonal, so they are also its columns).
Each example is shaped as a (1, h, w) image with h * w = n, so a one-stage
network whose filter field is the whole image (one location, no pooling, no
LCN) is a fully connected ICA layer with the L1-like penalty
sum_j sqrt(eps + z_j^2).

``train_ica`` trains that layer in process with the job's Adagrad
(``downpour.optim``, the rule a parameter shard applies) for one
``StageSpec.constraint`` and measures recovery:

* ``amari_index(W1 @ V A)`` (complete case only, maps == n): 0 for a scaled
  permutation, i.e. perfect recovery; about 0.5 or more for an unrelated matrix;
* ``min_cosine``: for every source, the best |cosine| between its unmixing
  direction and a learned encoder row, then the minimum over sources (1:
  every source has a filter; also defined when the layer is overcomplete,
  maps > n).

Pure NumPy, no I/O: tests and notebooks call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from downpour import optim
from downpour.nn import constraint
from downpour.nn.network import Network
from downpour.nn.spec import FilterSpec, NetworkSpec, StageSpec


@dataclass
class ICASet:
    """Whitened mixtures of known sources. ``x`` (B, 1, h, w) float32; ``sources`` (B, n);
    ``mixing`` A (n, n); ``whitening`` V (n, n) with x_w = V (A s - mean); ``mean`` (n,)."""

    x: np.ndarray
    sources: np.ndarray
    mixing: np.ndarray
    whitening: np.ndarray
    mean: np.ndarray

    @property
    def n(self) -> int:
        return self.mixing.shape[0]

    @property
    def effective_mixing(self) -> np.ndarray:
        """V A: how the sources reach the whitened examples (nearly orthogonal)."""
        return self.whitening @ self.mixing

    @property
    def unmixing(self) -> np.ndarray:
        """(V A)^-1: its row i is the filter that reads source i off a whitened example."""
        return np.linalg.inv(self.effective_mixing)


def random_orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    """A Haar-distributed orthogonal n x n matrix (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def mixing_matrix(rng: np.random.Generator, n: int, cond: float = 4.0) -> np.ndarray:
    """A random n x n mixing matrix U diag(s) W^T with singular values log-spaced over [1, cond]."""
    s = np.exp(rng.uniform(0.0, np.log(cond), n))
    s[0], s[-1] = 1.0, cond  # the condition number is exactly ``cond``
    return random_orthogonal(rng, n) @ np.diag(s) @ random_orthogonal(rng, n).T


def zca(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(whitening matrix V = E D^-1/2 E^T, mean) of the rows of ``x`` (B, n)."""
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False)
    d, e = np.linalg.eigh(cov)
    return (e / np.sqrt(d)) @ e.T, mean


def ica_set(n: int = 16, samples: int = 4096, seed: int = 0, cond: float = 4.0) -> ICASet:
    """``samples`` whitened mixtures of n unit-variance Laplacian sources, as (1, h, h) images (n = h * h)."""
    h = int(round(np.sqrt(n)))
    if h * h != n:
        raise ValueError(f"n={n} must be a perfect square: the examples are h x h images")
    rng = np.random.default_rng(seed)
    s = rng.laplace(scale=1 / np.sqrt(2), size=(samples, n))  # variance 2 b^2 = 1
    a = mixing_matrix(rng, n, cond)
    mixed = s @ a.T
    v, mean = zca(mixed)
    xw = (mixed - mean) @ v.T
    return ICASet(xw.astype(np.float32).reshape(samples, 1, h, h), s, a, v, mean)


def amari_index(p: np.ndarray) -> float:
    """Amari et al.'s performance index of a square P, normalised to [0, 1]:

        1 / (2 n (n - 1)) * [ sum_i (sum_j |p_ij| / max_k |p_ik| - 1)
                            + sum_j (sum_i |p_ij| / max_k |p_kj| - 1) ]

    It is 0 exactly when P is a scaled permutation (every row and every column has one
    non-zero), as P = W1 V A is when the encoder W1 unmixes every source. (S. Amari,
    A. Cichocki, H. H. Yang, "A new learning algorithm for blind signal separation",
    NIPS 8, 1996; the normalisation as in Bach & Jordan, "Kernel independent component
    analysis", JMLR 3, 2002, divided by n - 1.)"""
    a = np.abs(np.asarray(p, np.float64))
    n = a.shape[0]
    if a.shape != (n, n) or n < 2:
        raise ValueError(f"amari_index needs a square matrix of size >= 2, got shape {a.shape}")
    rows = (a.sum(axis=1) / a.max(axis=1) - 1).sum()
    cols = (a.sum(axis=0) / a.max(axis=0) - 1).sum()
    return float((rows + cols) / (2 * n * (n - 1)))


def best_match_cosines(truth: np.ndarray, learned: np.ndarray) -> np.ndarray:
    """For every row of ``truth`` (n, d), the largest |cosine| with a row of ``learned`` (m, d)."""
    t = truth / np.linalg.norm(truth, axis=1, keepdims=True)
    ln = np.linalg.norm(learned, axis=1, keepdims=True)
    u = learned / np.maximum(ln, 1e-30)
    return np.abs(t @ u.T).max(axis=1)


def ica_spec(n: int, maps: int, constraint_kind: str, lam: float) -> NetworkSpec:
    """One stage whose field is the whole h x h image: a fully connected ICA layer, no pool, no LCN."""
    h = int(round(np.sqrt(n)))
    stage = StageSpec(filter=FilterSpec(maps=maps, field=h), pool=None, lcn=None, lam=lam, constraint=constraint_kind)
    return NetworkSpec(input=(1, h, h), stages=(stage,))


@dataclass
class Recovery:
    """What ``train_ica`` learned and how well it recovers the sources."""

    constraint: str
    w1: np.ndarray  # effective encoder (maps, n)
    w2: np.ndarray  # effective decoder (n, maps)
    amari: float | None  # amari_index(w1 @ V A); None when maps != n
    min_cosine: float  # min over sources of the best |cosine| against an encoder row
    encoder_norm: float  # mean norm of the effective encoder rows
    decoder_norm: float  # mean norm of the effective decoder columns
    initial_encoder_norm: float
    info: dict[str, float] = field(default_factory=dict)  # the last step's TICA info

    def row(self) -> dict[str, object]:
        """A flat record, for tables."""
        return {
            "constraint": self.constraint,
            "amari": self.amari,
            "min_cosine": self.min_cosine,
            "encoder_norm": self.encoder_norm,
            "decoder_norm": self.decoder_norm,
            "reconstruction": self.info.get("stage1.reconstruction"),
            "sparsity": self.info.get("stage1.sparsity"),
        }


def effective(net: Network, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """The stage's effective (W1 (maps, n), W2 (n, maps)) from its stored blocks."""
    st = net.stages[0]
    f = st.filter
    assert f is not None
    w1, w2 = constraint.effective_blocks(
        st.spec.constraint, np, params["stage1.W1"], params.get("stage1.W2"), f.weight_shape, f.decoder_shape
    )
    return np.asarray(w1).reshape(f.M, f.K), np.asarray(w2).reshape(f.K, f.M)


def train_ica(
    data: ICASet,
    constraint_kind: str,
    *,
    maps: int | None = None,
    steps: int = 2000,
    batch: int = 128,
    lam: float = 0.1,
    lr: float = 0.05,
    seed: int = 0,
) -> Recovery:
    """Train the one-stage ICA layer on ``data`` with Adagrad (``optim.update``) and measure recovery."""
    n = data.n
    m = maps or n
    net = Network(ica_spec(n, m, constraint_kind, lam))
    params: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in net.init_params(seed).items()}
    cfg = optim.OptimizerConfig(lr=lr)
    opt = optim.get(cfg.kind)
    state = {k: opt.init(v.size, cfg) for k, v in params.items()}
    rng = np.random.default_rng(seed + 1)
    x = data.x
    w1, _ = effective(net, params)
    initial = float(np.linalg.norm(w1, axis=1).mean())
    info: dict[str, float] = {}
    for _ in range(steps):
        xb = x[rng.integers(0, len(x), batch)]
        _, grads, info = net.tica(params, xb)
        for k, g in grads.items():
            optim.update(cfg, params[k], state[k], np.ascontiguousarray(g, np.float32))
    w1, w2 = effective(net, params)
    p = w1 @ data.effective_mixing
    return Recovery(
        constraint=constraint_kind,
        w1=w1,
        w2=w2,
        amari=amari_index(p) if m == n else None,
        min_cosine=float(best_match_cosines(data.unmixing, w1).min()),
        encoder_norm=float(np.linalg.norm(w1, axis=1).mean()),
        decoder_norm=float(np.linalg.norm(w2, axis=0).mean()),
        initial_encoder_norm=initial,
        info=dict(info),
    )
