"""Pooling per map over p x p spatial neighbourhoods, on (H, W, C, B) arrays.

L2 pooling (the default, Le et al. 2012): h = sqrt(eps + sum of squares over
the window). Max and average pooling are options. Windows are "valid": an
output exists only where the whole window fits, so with a stride that does
not divide the input the last rows and columns are left out.

Every kind is a sum of p*p strided slices of the input, which keeps the work
in a few large vectorised operations instead of a Python loop per location.
"""

from __future__ import annotations

from types import ModuleType

import numpy

from downpour.kernels import L2PoolKernels


class Pool:
    def __init__(
        self,
        in_shape: tuple[int, int, int],
        size: int,
        stride: int = 1,
        kind: str = "l2",
        eps: float = 1e-2,
        xp: ModuleType = numpy,
    ):
        C, H, W = in_shape
        if kind not in ("l2", "max", "avg"):
            raise ValueError(f"pool kind={kind!r} is unknown; allowed: l2, max, avg")
        if size < 1 or size > min(H, W):
            raise ValueError(f"pool size={size} does not fit the {H}x{W} input; allowed: 1..{min(H, W)}")
        if stride < 1:
            raise ValueError(f"pool stride={stride} must be >= 1")
        self.xp, self.kind, self.p, self.s, self.eps = xp, kind, size, stride, eps
        self.C, self.H, self.W = C, H, W
        self.Ho, self.Wo = (H - size) // stride + 1, (W - size) // stride + 1
        # CuPy: L2 pooling by the raw kernels of downpour.kernels; NumPy and the
        # other kinds: the array code below.
        self.accel = None
        if xp is not numpy and kind == "l2":
            self.accel = L2PoolKernels(self)

    @property
    def out_shape(self) -> tuple[int, int, int]:
        return (self.C, self.Ho, self.Wo)

    def flops(self) -> int:
        return 2 * self.C * self.Ho * self.Wo * self.p * self.p

    def _windows(self):
        """The (dy, dx) offsets with their strided slices into the input."""
        hs, ws = self.s * (self.Ho - 1) + 1, self.s * (self.Wo - 1) + 1
        for dy in range(self.p):
            for dx in range(self.p):
                yield dy, dx, (slice(dy, dy + hs, self.s), slice(dx, dx + ws, self.s))

    def forward(self, x):
        """Returns (y as (Ho, Wo, C, B), context for backward)."""
        xp = self.xp
        if x.shape[:3] != (self.H, self.W, self.C):
            raise ValueError(
                f"pool input of shape {tuple(x.shape)} does not match (H, W, C) = {(self.H, self.W, self.C)} (+ batch)"
            )
        if self.accel is not None:
            return self.accel.forward(x)
        B = x.shape[3]
        acc = xp.zeros((self.Ho, self.Wo, self.C, B), dtype=x.dtype)
        if self.kind == "l2":
            sq = x * x
            for _, _, sl in self._windows():
                acc += sq[sl]
            acc += self.eps
            y = xp.sqrt(acc, out=acc)
            return y, (x, y)
        if self.kind == "avg":
            for _, _, sl in self._windows():
                acc += x[sl]
            acc *= 1.0 / (self.p * self.p)
            return acc, (x,)
        # max: keep which offset won, the first one on ties
        acc[...] = -xp.inf
        arg = xp.zeros(acc.shape, dtype=xp.int32)
        for dy, dx, sl in self._windows():
            v = x[sl]
            better = v > acc
            acc = xp.where(better, v, acc)
            arg = xp.where(better, dy * self.p + dx, arg)
        return acc, (x, arg)

    def backward(self, ctx, dy):
        """dx of the same shape as the input."""
        if self.accel is not None:
            return self.accel.backward(ctx, dy)
        xp = self.xp
        x = ctx[0]
        dx = xp.zeros(x.shape, dtype=dy.dtype)
        if self.kind == "l2":
            # d sqrt(eps + sum x^2) / dx = x / y: spread dy / y, then multiply by x.
            g = dy / ctx[1]
            for _, _, sl in self._windows():
                dx[sl] += g
            dx *= x
            return dx
        if self.kind == "avg":
            g = dy * (1.0 / (self.p * self.p))
            for _, _, sl in self._windows():
                dx[sl] += g
            return dx
        arg = ctx[1]
        for dy_, dx_, sl in self._windows():
            dx[sl] += xp.where(arg == dy_ * self.p + dx_, dy, 0)
        return dx
