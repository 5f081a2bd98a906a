"""The update rules: one home for Adagrad and plain SGD, their config and its wire form.

An optimizer, in the style of optax or ps-lite's server handle, is a pair of
functions registered under its ``kind``:

    state = opt.init(n, config)                # a block's optimizer state
    opt.update(w, state, g, config, scratch)   # w (and state) updated in place

``OptimizerConfig`` is the one configuration (the job's ``optimizer:``
settings, the shard's, the in-process ``LocalStore``'s); ``to_proto`` and
``from_proto`` convert it to and from the wire's ``OptimizerSpec``.

Adagrad, exactly as the parameter servers apply it::

    acc += g * g
    w   -= lr * g / (sqrt(acc) + eps)

Updates work on any contiguous slice of a block, so a shard can apply a
gradient chunk by chunk as it arrives. Inside a slice the work is done in
tiles of ``TILE`` elements so that the temporaries stay in the L2 cache: the
five NumPy passes then cost little more than one pass over main memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from downpour.v1 import common_pb2

TILE = 1 << 16  # elements; 256 KiB per temporary (fastest of 2^12..2^16 here)


@dataclass
class OptimizerConfig:
    """How gradients change the weights: the job's ``optimizer:`` settings, the shard's, LocalStore's."""

    kind: str = "adagrad"  # a key of OPTIMIZERS
    lr: float = 0.01
    eps: float = 1e-6  # Adagrad: w -= lr * g / (sqrt(acc) + eps)
    # Adagrad's accumulator before the first update (TensorFlow and Keras: 0.1): bounds the first,
    # otherwise sign-sized steps; chosen on benchmarks/time_to_loss.py's held-out loss.
    initial_accumulator: float = 0.1


class Scratch:
    """Two reusable temporaries of TILE float32 (one per applying thread)."""

    def __init__(self, tile: int = TILE) -> None:
        self.tile = tile
        self.a = np.empty(tile, np.float32)
        self.b = np.empty(tile, np.float32)


def adagrad_(
    w: np.ndarray, acc: np.ndarray, g: np.ndarray, lr: float, eps: float, scratch: Scratch | None = None
) -> None:
    """In place: acc += g*g; w -= lr * g / (sqrt(acc) + eps). All float32, same length."""
    if not (w.shape == acc.shape == g.shape):
        raise ValueError(f"adagrad_: shapes differ: w {w.shape}, acc {acc.shape}, g {g.shape}")
    s = scratch or Scratch()
    lr32, eps32 = np.float32(lr), np.float32(eps)
    n = w.shape[0]
    for i in range(0, n, s.tile):
        j = min(n, i + s.tile)
        gs, ws, accs = g[i:j], w[i:j], acc[i:j]
        a, b = s.a[: j - i], s.b[: j - i]
        np.multiply(gs, gs, out=a)
        accs += a
        np.sqrt(accs, out=b)
        b += eps32
        np.multiply(gs, lr32, out=a)  # lr * g, then / (sqrt(acc) + eps): the formula's order
        a /= b
        ws -= a


def sgd_(w: np.ndarray, g: np.ndarray, lr: float, scratch: Scratch | None = None) -> None:
    """In place: w -= lr * g."""
    if w.shape != g.shape:
        raise ValueError(f"sgd_: shapes differ: w {w.shape}, g {g.shape}")
    s = scratch or Scratch()
    lr32 = np.float32(lr)
    n = w.shape[0]
    for i in range(0, n, s.tile):
        j = min(n, i + s.tile)
        a = s.a[: j - i]
        np.multiply(g[i:j], lr32, out=a)
        w[i:j] -= a


def all_finite(g: np.ndarray) -> bool:
    """True when g has no NaN or Inf.

    A float32 sum is a single vectorised pass with no temporary; it is finite
    only if every element is. If it is not (a NaN, an Inf, or a merely
    overflowing sum) the exact element-wise test decides.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(g)):
            return True
    return bool(np.isfinite(g).all())


# -- the interface: optimizers by kind ------------------------------------------------

# (w, state, g, config, scratch): all flat float32 of one length; w and state change in place.
UpdateFn = Callable[[np.ndarray, np.ndarray, np.ndarray, OptimizerConfig, "Scratch | None"], None]


@dataclass(frozen=True)
class Optimizer:
    """One update rule: a block's state and the in-place update of a block (or a slice of one)."""

    kind: str
    proto_kind: common_pb2.OptimizerKind.ValueType
    update: UpdateFn

    def init(self, n: int, config: OptimizerConfig) -> np.ndarray:
        """A block's state: the accumulator, ``initial_accumulator`` everywhere.

        Every kind keeps one (SGD leaves it alone), so that a block's state has
        one layout in checkpoints and Pull, and a job can change kinds.
        """
        return np.full(n, config.initial_accumulator, dtype=np.float32)


def _adagrad(w: np.ndarray, acc: np.ndarray, g: np.ndarray, c: OptimizerConfig, s: Scratch | None) -> None:
    adagrad_(w, acc, g, c.lr, c.eps, s)


def _sgd(w: np.ndarray, acc: np.ndarray, g: np.ndarray, c: OptimizerConfig, s: Scratch | None) -> None:
    sgd_(w, g, c.lr, s)


OPTIMIZERS: dict[str, Optimizer] = {
    o.kind: o
    for o in (
        Optimizer("adagrad", common_pb2.OPTIMIZER_KIND_ADAGRAD, _adagrad),
        Optimizer("sgd", common_pb2.OPTIMIZER_KIND_SGD, _sgd),
    )
}
KINDS = tuple(OPTIMIZERS)


def get(kind: str) -> Optimizer:
    """The optimizer registered as ``kind``; ValueError naming the kinds there are."""
    try:
        return OPTIMIZERS[kind]
    except KeyError:
        raise ValueError(f"optimizer.kind={kind!r} is unknown; allowed: {', '.join(KINDS)}") from None


def update(
    config: OptimizerConfig, w: np.ndarray, state: np.ndarray, g: np.ndarray, scratch: Scratch | None = None
) -> None:
    """Apply ``g`` to ``w`` (and its ``state``) in place with ``config``'s rule."""
    get(config.kind).update(w, state, g, config, scratch)


def check(config: OptimizerConfig) -> None:
    """ValueError unless ``config`` can be applied: a known kind, lr > 0, eps >= 0, accumulator >= 0.

    (A job asks more, eps > 0: see downpour.config. eps = 0 is left to a shard
    for exact arithmetic in tests.)
    """
    get(config.kind)
    if not config.lr > 0:
        raise ValueError(f"optimizer.lr={config.lr} must be > 0")
    if not config.eps >= 0:
        raise ValueError(f"optimizer.eps={config.eps} must be >= 0")
    if not config.initial_accumulator >= 0:
        raise ValueError(f"optimizer.initial_accumulator={config.initial_accumulator} must be >= 0")


# -- the wire form --------------------------------------------------------------------


def to_proto(config: OptimizerConfig) -> common_pb2.OptimizerSpec:
    """The ``OptimizerSpec`` for ``config`` (what the coordinator sends the shards and workers)."""
    return common_pb2.OptimizerSpec(
        kind=get(config.kind).proto_kind,
        learning_rate=config.lr,
        eps=config.eps,
        initial_accumulator=config.initial_accumulator,
    )


def from_proto(spec: common_pb2.OptimizerSpec) -> OptimizerConfig:
    """The config an ``OptimizerSpec`` describes, checked (ValueError when it cannot be applied)."""
    kinds = {o.proto_kind: o.kind for o in OPTIMIZERS.values()}
    if spec.kind not in kinds:
        raise ValueError(f"optimizer kind {spec.kind} is unknown; allowed: {', '.join(KINDS)}")
    config = OptimizerConfig(kinds[spec.kind], spec.learning_rate, spec.eps, spec.initial_accumulator)
    check(config)
    return config
