"""The local contrast normalisation of ``downpour.nn.lcn`` evaluated on regions
of the global map: what a partition needs to normalise its tile.

The Gaussian weights are separable, so every blur is two 1-D passes over a
zero-padded buffer; the per-location normaliser (the weight that falls inside
the map) is computed once for the whole map and cropped per region.
"""

from __future__ import annotations

from types import ModuleType

import numpy

from downpour.nn.lcn import gaussian_1d

from .regions import Region, crop, grow, intersect, size


class TileLCN:
    """The LCN of ``downpour.nn.lcn`` evaluated on regions of the global map."""

    def __init__(self, lcn, xp: ModuleType):
        self.xp, self.C, self.H, self.W, self.eps = xp, lcn.C, lcn.H, lcn.W, lcn.eps
        self.size, self.r = lcn.size, lcn.size // 2
        g = gaussian_1d(lcn.size, lcn.sigma)
        self.g = [float(v) for v in g]
        nh, nw = _inside(g, self.H), _inside(g, self.W)
        self._inv_full = (1.0 / numpy.outer(nh, nw))[:, :, None]
        self._inv: dict = {}

    def grow(self, r: Region, by: int = 1) -> Region:
        return grow(r, by * self.r, self.H, self.W)

    def inv(self, r: Region, dtype):
        key = (r, numpy.dtype(dtype).str)
        out = self._inv.get(key)
        if out is None:
            out = self.xp.asarray(crop(self._inv_full, (0, self.H, 0, self.W), r).astype(dtype))
            self._inv[key] = out
        return out

    def blur(self, u, ru: Region, rout: Region):
        """The zero-padded Gaussian over ``rout`` of u (h, w, B) given on ``ru`` (zero elsewhere)."""
        xp, r = self.xp, self.r
        h, w = size(rout)
        rb = (rout[0] - r, rout[1] + r, rout[2] - r, rout[3] + r)
        buf = xp.zeros((h + 2 * r, w + 2 * r, u.shape[2]), dtype=u.dtype)
        ov = intersect(ru, rb)
        if ov is not None:
            crop(buf, rb, ov)[...] = crop(u, ru, ov)
        t = buf[0:h] * self.g[0]
        for i in range(1, self.size):
            t += buf[i : i + h] * self.g[i]
        out = t[:, 0:w] * self.g[0]
        for i in range(1, self.size):
            out += t[:, i : i + w] * self.g[i]
        return out

    def G(self, x, rx: Region, rout: Region):
        """Weighted mean over window and maps, on ``rout``, of x (h, w, C, B) given on ``rx``."""
        return self.blur(x.sum(axis=2) * (1.0 / self.C), rx, rout) * self.inv(rout, x.dtype)

    def GT(self, u, ru: Region):
        """Adjoint of G for u (h, w, B) on ``ru``: (h', w', 1, B) on ``ru`` grown by r."""
        rout = self.grow(ru)
        return (self.blur(u * self.inv(ru, u.dtype), ru, rout) * (1.0 / self.C))[:, :, None, :], rout


def _inside(g: numpy.ndarray, n: int) -> numpy.ndarray:
    """For every position of an n-long axis, the part of the weights g that falls inside the axis."""
    r = len(g) // 2
    return numpy.array([sum(g[t] for t in range(len(g)) if 0 <= i + t - r < n) for i in range(n)])
