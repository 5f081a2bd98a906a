"""L2 pooling on the GPU: one raw kernel each way.

Forward computes each output's window sum of squares in registers; backward
gathers dy / y over the windows that cover each input element and multiplies
by x, so neither direction needs the p*p strided passes (and their
temporaries) of the array-level code. Max and average pooling keep
``downpour.nn.Pool``'s array code, which runs on CuPy as it is.
"""

from __future__ import annotations

from collections.abc import Callable

from .launch import Launcher, launcher_for


class L2PoolKernels:
    def __init__(self, layer, launcher: Callable[[object], Launcher] | None = None):
        if layer.kind != "l2":
            raise ValueError(f"L2PoolKernels serves L2 pooling, not {layer.kind!r}")
        self.p = layer
        self.xp = layer.xp
        self._launcher = launcher or (lambda dtype: launcher_for(self.xp, dtype))

    def forward(self, x):
        p, xp = self.p, self.xp
        x = xp.ascontiguousarray(x)
        B = x.shape[3]
        y = xp.empty((p.Ho, p.Wo, p.C, B), dtype=x.dtype)
        self._launcher(x.dtype)("l2pool_fwd", y.size, x, y, p.W, p.C, B, p.Wo, p.p, p.s, p.eps, y.size)
        return y, (x, y)

    def backward(self, ctx, dy):
        p, xp = self.p, self.xp
        x, y = ctx
        dy = xp.ascontiguousarray(dy, dtype=x.dtype)
        B = x.shape[3]
        dx = xp.empty(x.shape, dtype=x.dtype)
        self._launcher(x.dtype)("l2pool_bwd", dx.size, x, y, dy, dx, p.W, p.C, B, p.Ho, p.Wo, p.p, p.s, dx.size)
        return dx
