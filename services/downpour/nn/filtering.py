"""Local filtering: locally connected layers (untied weights) and convolution.

Activations in ``downpour.nn`` are laid out (H, W, C, B): batch innermost, so
that a patch of every example is one contiguous run and the per-location
products are plain GEMMs over the batch. A field of k x k pixels over all C
maps is flattened in (kh, kw, C) order: K = k*k*C.

Forward is a batched matrix product over the L = Ho*Wo output locations:

    patches[L, K, B] = im2col(x);   y[L, M, B] = W[L, M, K] @ patches

With ``tied`` the weight stack has one entry, broadcast over L: an ordinary
convolution through the same code. The transpose (``decode``) is what the
TICA decoder uses: r = col2im(W2[L, K, M] @ z).
"""

from __future__ import annotations

from types import ModuleType

import numpy

from .backend import sliding_view


def im2col(xp: ModuleType, x, field: int, stride: int, out=None):
    """(H, W, C, B) -> (L, K, B) patches; copies into ``out`` when given."""
    H, W, C, B = x.shape
    view = sliding_view(xp, x, (0, 1), (field, field), (stride, stride))  # (Ho, Wo, k, k, C, B)
    Ho, Wo = view.shape[:2]
    if out is None:
        out = xp.empty((Ho, Wo, field, field, C, B), dtype=x.dtype)
    else:
        out = out.reshape(Ho, Wo, field, field, C, B)
    out[...] = view
    return out.reshape(Ho * Wo, field * field * C, B)


def col2im(xp: ModuleType, cols, in_shape: tuple[int, int, int, int], field: int, stride: int, out=None):
    """Adjoint of im2col: scatter-add (L, K, B) patches back into (H, W, C, B)."""
    H, W, C, B = in_shape
    Ho, Wo = (H - field) // stride + 1, (W - field) // stride + 1
    c6 = cols.reshape(Ho, Wo, field, field, C, B)
    if out is None:
        out = xp.zeros(in_shape, dtype=cols.dtype)
    else:
        out[...] = 0
    hspan, wspan = stride * (Ho - 1) + 1, stride * (Wo - 1) + 1
    if Ho * Wo < field * field:
        # Few locations, big fields: add one whole patch per location.
        for i in range(Ho):
            for j in range(Wo):
                out[i * stride:i * stride + field, j * stride:j * stride + field] += c6[i, j]
    else:
        # Many locations: one strided add per offset inside the field.
        for dy in range(field):
            for dx in range(field):
                out[dy:dy + hspan:stride, dx:dx + wspan:stride] += c6[:, :, dy, dx]
    return out


class LocalFilter:
    """Locally connected filtering of an (H, W, C, B) input into (Ho, Wo, M, B).

    Parameters: ``W`` of shape (L, M, K), or (1, M, K) when ``tied``.
    """

    def __init__(self, in_shape: tuple[int, int, int], maps: int, field: int,
                 stride: int = 1, tied: bool = False, xp: ModuleType = numpy):
        C, H, W = in_shape
        if field > min(H, W) or field < 1:
            raise ValueError(f"field={field} does not fit the {H}x{W} input; allowed: 1..{min(H, W)}")
        if stride < 1:
            raise ValueError(f"stride={stride} must be >= 1")
        self.xp = xp
        self.C, self.H, self.W = C, H, W
        self.M, self.k, self.s, self.tied = maps, field, stride, tied
        self.Ho, self.Wo = (H - field) // stride + 1, (W - field) // stride + 1
        self.L = self.Ho * self.Wo
        self.K = field * field * C
        self._buf: dict = {}

    # shapes -----------------------------------------------------------------
    @property
    def weight_shape(self) -> tuple[int, int, int]:
        return (1 if self.tied else self.L, self.M, self.K)

    @property
    def decoder_shape(self) -> tuple[int, int, int]:
        return (1 if self.tied else self.L, self.K, self.M)

    @property
    def out_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the output."""
        return (self.M, self.Ho, self.Wo)

    @property
    def connections(self) -> int:
        return self.L * self.M * self.K

    def flops(self) -> int:
        """Multiply-adds x 2 of one forward pass, per example."""
        return 2 * self.connections

    def _scratch(self, key, shape, dtype):
        # Reused buffers: the patch matrix of a large layer is tens of MB and
        # allocating it every step costs page faults, not just malloc.
        buf = self._buf.get(key)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self.xp.empty(shape, dtype=dtype)
            self._buf[key] = buf
        return buf

    def _check(self, x) -> None:
        if x.shape[:3] != (self.H, self.W, self.C):
            raise ValueError(f"input of shape {tuple(x.shape)} does not match (H, W, C) = "
                             f"{(self.H, self.W, self.C)} (+ batch)")

    # encoder ------------------------------------------------------------------
    # Both directions walk the Ho rows of output locations. One row's patches
    # (Wo, K, B) are ~1.5 MB at the benchmark shape, so the im2col copy, the
    # GEMMs that read it and the col2im adds all stay in L2 instead of
    # streaming a 40 MB patch matrix (and its gradient) through memory.
    def _row_patches(self, x, i, out):
        """Copy the patches of output row i, (Wo, k, k, C, B), into ``out``."""
        k, s = self.k, self.s
        out[...] = sliding_view(self.xp, x[s * i:s * i + k], (0, 1), (k, k), (s, s))[0]
        return out.reshape(self.Wo, self.K, x.shape[3])

    def _add_row_cols(self, rows, T):
        """col2im of one output row: add T (Wo, k, k, C, B) into rows (k, W, C, B)."""
        k, s, Wo = self.k, self.s, self.Wo
        # Offsets dx = s*t + e with a whole block of s columns: location j lands
        # on columns s*(j+t) .. s*(j+t)+s-1, one (k, Wo, s*C*B) view per t.
        nt = k // s
        for t in range(nt):
            dst = rows[:, s * t:s * t + s * Wo].reshape(k, Wo, s, *rows.shape[2:])
            dst += T[:, :, s * t:s * t + s].transpose(1, 0, 2, 3, 4)
        for d in range(s * nt, k):  # the offsets left over when s does not divide k
            rows[:, d:d + s * (Wo - 1) + 1:s] += T[:, :, d].transpose(1, 0, 2, 3)

    def forward(self, w, x):
        """y = W @ im2col(x). Returns (y as (Ho, Wo, M, B), context for backward)."""
        self._check(x)
        B = x.shape[3]
        xp, Ho, Wo, M, K, k, C = self.xp, self.Ho, self.Wo, self.M, self.K, self.k, self.C
        w3 = w.reshape(self.weight_shape)
        y = xp.empty((Ho, Wo, M, B), dtype=xp.result_type(w3.dtype, x.dtype))
        pr = self._scratch("Pr", (Wo, k, k, C, B), x.dtype)
        for i in range(Ho):
            wi = w3[0] if self.tied else w3[i * Wo:(i + 1) * Wo]
            xp.matmul(wi, self._row_patches(x, i, pr), out=y[i])
        # The patches are rebuilt row by row in backward, so the context is the
        # input itself: no patch matrix outlives the call.
        return y, x

    def backward(self, w, P, dy, need_dx: bool = True):
        """Gradients of forward: (dx or None, dW with W's shape). ``P`` is forward's context."""
        xp, Ho, Wo, M, K, k, C = self.xp, self.Ho, self.Wo, self.M, self.K, self.k, self.C
        x = P
        B = dy.shape[3]
        dt = xp.result_type(w.dtype, x.dtype, dy.dtype)
        w3 = w.reshape(self.weight_shape)
        dY = dy.reshape(Ho, Wo, M, B)
        # dW_l = dY_l P_l^T is computed as (P_l dY_l^T)^T: BLAS runs the
        # (K x B)(B x M) product ~2.5x faster than (M x B)(B x K) with a
        # transposed operand, and the transpose back is a cheap in-cache copy.
        dYT = self._scratch("dYT", (Ho, Wo, B, M), dy.dtype)
        dYT[...] = dY.transpose(0, 1, 3, 2)
        pr = self._scratch("Pr", (Wo, k, k, C, B), x.dtype)
        R = self._scratch("R", (Wo, K, M), dt)
        dW = xp.empty(self.weight_shape, dtype=dt)
        if self.tied:
            dW[...] = 0
        dx = None
        if need_dx:
            dx = xp.zeros((self.H, self.W, C, B), dtype=dt)
            T = self._scratch("T", (Wo, k, k, C, B), dt)
        for i in range(Ho):
            loc = slice(i * Wo, (i + 1) * Wo)
            xp.matmul(self._row_patches(x, i, pr), dYT[i], out=R)
            if self.tied:
                dW[0] += R.sum(axis=0).T
            else:
                dW[loc] = R.transpose(0, 2, 1)
            if need_dx:
                wt = (w3[0] if self.tied else w3[loc]).swapaxes(-1, -2)  # (K, M) or (Wo, K, M)
                xp.matmul(wt, dY[i], out=T.reshape(Wo, K, B))
                self._add_row_cols(dx[self.s * i:self.s * i + k], T)
        return dx, dW

    # decoder (the transpose) --------------------------------------------------
    def decode(self, w2, z):
        """r = col2im(W2 @ z): maps (Ho, Wo, M, B) responses back to (H, W, C, B)."""
        B = z.shape[3]
        Z = z.reshape(self.L, self.M, B)
        R = self.xp.matmul(w2.reshape(self.decoder_shape), Z)  # (L, K, B)
        return col2im(self.xp, R, (self.H, self.W, self.C, B), self.k, self.s)

    def decode_backward(self, w2, z, dr):
        """Gradients of decode: (dz as (Ho, Wo, M, B), dW2 with W2's shape)."""
        xp = self.xp
        B = z.shape[3]
        dR = im2col(xp, dr, self.k, self.s, out=self._scratch("dR", (self.L * self.K * B,), dr.dtype))
        Z = z.reshape(self.L, self.M, B)
        dW2 = xp.matmul(dR, Z.transpose(0, 2, 1))  # (L, K, M)
        if self.tied:
            dW2 = dW2.sum(axis=0, keepdims=True)
        dz = xp.matmul(w2.reshape(self.decoder_shape).transpose(0, 2, 1), dR)  # (L, M, B)
        return dz.reshape(self.Ho, self.Wo, self.M, B), dW2
