"""Local contrast normalisation (Jarrett et al. 2009) on (H, W, C, B) arrays.

    v = x - m,           m = G(x): Gaussian-weighted mean over a size x size
                         window and all C maps (one value per location)
    sigma = sqrt(G(v^2))
    y = v / max(c, sigma, eps),   c = mean of sigma over the map, per example

G uses a normalised Gaussian window, zero outside the image, and divides by
the weight that falls inside the image, so border locations average over what
exists instead of over zeros. The window is separable: two 1-D passes.
"""

from __future__ import annotations

from types import ModuleType

import numpy

from downpour.kernels import LCNKernels


def gaussian_1d(size: int, sigma: float) -> numpy.ndarray:
    r = numpy.arange(size, dtype=numpy.float64) - (size - 1) / 2.0
    g = numpy.exp(-0.5 * (r / sigma) ** 2)
    return g / g.sum()


def _inside(g: numpy.ndarray, n: int) -> numpy.ndarray:
    """For each of n positions, the window weight that lands inside 0..n-1."""
    r = len(g) // 2
    return numpy.array([sum(g[t] for t in range(len(g)) if 0 <= i + t - r < n) for i in range(n)])


class LCN:
    def __init__(
        self,
        in_shape: tuple[int, int, int],
        size: int = 5,
        sigma: float = 0.0,
        eps: float = 1e-4,
        xp: ModuleType = numpy,
    ):
        C, H, W = in_shape
        if size < 1 or size % 2 == 0:
            raise ValueError(f"lcn size={size} must be odd and >= 1; allowed: 1, 3, 5, ...")
        self.xp, self.size, self.eps = xp, size, eps
        self.sigma = sigma if sigma > 0 else size / 4.0
        self.C, self.H, self.W = C, H, W
        g = gaussian_1d(size, self.sigma)
        self._g = [float(v) for v in g]
        # Weight inside the image for each row / column: the border renormaliser.
        nh, nw = _inside(g, H), _inside(g, W)
        self._inv_norm: dict[numpy.dtype, object] = {}  # the renormaliser per dtype, on xp's device
        self._inv_norm_np = (1.0 / numpy.outer(nh, nw))[:, :, None]  # (H, W, 1)
        # CuPy: the blurs by the raw kernels of downpour.kernels; NumPy: _blur below.
        self.accel = None
        if xp is not numpy:
            self.accel = LCNKernels(self)

    @property
    def out_shape(self) -> tuple[int, int, int]:
        return (self.C, self.H, self.W)

    def flops(self) -> int:
        # two separable Gaussian passes each for m and sigma, plus elementwise work
        return self.H * self.W * (4 * 2 * self.size + 8 * self.C)

    def _inv(self, dtype):
        inv = self._inv_norm.get(dtype)
        if inv is None:
            inv = self.xp.asarray(self._inv_norm_np.astype(dtype))
            self._inv_norm[dtype] = inv
        return inv

    def _blur(self, u):
        """Zero-padded, same-size separable Gaussian of an (H, W, B) array."""
        if self.accel is not None:
            return self.accel.blur(u)
        xp, r, H, W = self.xp, self.size // 2, self.H, self.W
        if r == 0:
            return u * self._g[0]
        B = u.shape[2]
        pad = xp.zeros((H + 2 * r, W, B), dtype=u.dtype)
        pad[r : r + H] = u
        t = pad[0:H] * self._g[0]
        for i in range(1, self.size):
            t += pad[i : i + H] * self._g[i]
        pad = xp.zeros((H, W + 2 * r, B), dtype=u.dtype)
        pad[:, r : r + W] = t
        out = pad[:, 0:W] * self._g[0]
        for i in range(1, self.size):
            out += pad[:, i : i + W] * self._g[i]
        return out

    def _G(self, x):
        """Weighted mean over the window and all maps: (H, W, C, B) -> (H, W, B)."""
        return self._blur(x.sum(axis=2) * (1.0 / self.C)) * self._inv(x.dtype)

    def _GT(self, u):
        """Adjoint of _G: (H, W, B) -> (H, W, 1, B), the same for every map."""
        # The Gaussian is symmetric, so the adjoint of the zero-padded blur is itself.
        return (self._blur(u * self._inv(u.dtype)) * (1.0 / self.C))[:, :, None, :]

    def forward(self, x):
        xp = self.xp
        if x.shape[:3] != (self.H, self.W, self.C):
            raise ValueError(
                f"lcn input of shape {tuple(x.shape)} does not match (H, W, C) = {(self.H, self.W, self.C)} (+ batch)"
            )
        v = x - self._G(x)[:, :, None, :]
        sigma = xp.sqrt(xp.maximum(self._G(v * v), 0))  # (H, W, B); clamp rounding below 0
        c = sigma.mean(axis=(0, 1))  # (B,)
        d = xp.maximum(sigma, c[None, None, :])
        d = xp.maximum(d, self.eps)
        y = v / d[:, :, None, :]
        return y, (v, sigma, c, d)

    def backward(self, ctx, dy):
        xp = self.xp
        v, sigma, c, d = ctx
        inv_d = 1.0 / d
        dv = dy * inv_d[:, :, None, :]
        dd = -(dy * v).sum(axis=2) * inv_d * inv_d  # (H, W, B)
        # d = max(sigma, c, eps): the gradient goes to whichever won (sigma on ties with c).
        use_sigma = (sigma >= c[None, None, :]) & (sigma >= self.eps)
        use_c = (~use_sigma) & (c[None, None, :] >= self.eps)
        dsigma = xp.where(use_sigma, dd, 0)
        dc = xp.where(use_c, dd, 0).sum(axis=(0, 1))  # (B,)
        dsigma = dsigma + dc[None, None, :] * (1.0 / (self.H * self.W))
        # sigma = sqrt(G(v^2)): d/dv = v * G^T(dsigma / sigma)
        safe = xp.where(sigma > 0, sigma, 1)
        dv += 2 * v * self._GT(xp.where(sigma > 0, dsigma / (2 * safe), 0))
        # v = x - G(x) broadcast over maps: dx = dv - G^T(sum over maps of dv)
        return dv - self._GT(dv.sum(axis=2))
