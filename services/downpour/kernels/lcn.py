"""The Gaussian blurs of local contrast normalisation on the GPU.

``downpour.nn.LCN`` blurs (H, W, B) arrays four times per forward and
backward pass; its array code pads and adds ``size`` shifted copies per axis.
Here each axis is one raw kernel pass that reads the taps in place and skips
those outside the image (the same zero padding), with no padded copies. The
rest of LCN is elementwise work and reductions that CuPy runs as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy

from .launch import Launcher, launcher_for


class LCNKernels:
    def __init__(self, layer, launcher: Callable[[object], Launcher] | None = None):
        self.n = layer
        self.xp = layer.xp
        self._launcher = launcher or (lambda dtype: launcher_for(self.xp, dtype))
        self._taps: dict = {}

    def _g(self, dtype):
        g = self._taps.get(dtype.str)
        if g is None:
            g = self._taps[dtype.str] = self.xp.asarray(numpy.asarray(self.n._g, dtype=dtype))
        return g

    def blur(self, u):
        """Zero-padded, same-size separable Gaussian of an (H, W, B) array."""
        xp, n = self.xp, self.n
        u = xp.ascontiguousarray(u)
        H, W, B = u.shape
        launch, g = self._launcher(u.dtype), self._g(u.dtype)
        t = xp.empty_like(u)
        launch("blur_axis", u.size, u, g, t, n.size, H, W * B, u.size)
        out = xp.empty_like(u)
        launch("blur_axis", u.size, t, g, out, n.size, W, B, u.size)
        return out
