"""Adagrad and plain SGD on flat float32 blocks, in place, in NumPy.

Adagrad, exactly as the parameter servers apply it::

    acc += g * g
    w   -= lr * g / (sqrt(acc) + eps)

Updates work on any contiguous slice of a block, so a shard can apply a
gradient chunk by chunk as it arrives. Inside a slice the work is done in
tiles of ``TILE`` elements so that the temporaries stay in the L2 cache: the
five NumPy passes then cost little more than one pass over main memory.
"""

from __future__ import annotations

import numpy as np

TILE = 1 << 16  # elements; 256 KiB per temporary (fastest of 2^12..2^16 here)


class Scratch:
    """Two reusable temporaries of TILE float32 (one per applying thread)."""

    def __init__(self, tile: int = TILE) -> None:
        self.tile = tile
        self.a = np.empty(tile, np.float32)
        self.b = np.empty(tile, np.float32)


def adagrad_(w: np.ndarray, acc: np.ndarray, g: np.ndarray, lr: float, eps: float,
             scratch: Scratch | None = None) -> None:
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
