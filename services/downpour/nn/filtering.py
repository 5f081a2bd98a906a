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

from downpour.kernels import LocalFilterKernels

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
                out[i * stride : i * stride + field, j * stride : j * stride + field] += c6[i, j]
    else:
        # Many locations: one strided add per offset inside the field.
        for dy in range(field):
            for dx in range(field):
                out[dy : dy + hspan : stride, dx : dx + wspan : stride] += c6[:, :, dy, dx]
    return out


class LocalFilter:
    """Locally connected filtering of an (H, W, C, B) input into (Ho, Wo, M, B).

    Parameters: ``W`` of shape (L, M, K), or (1, M, K) when ``tied``.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        maps: int,
        field: int,
        stride: int = 1,
        tied: bool = False,
        xp: ModuleType = numpy,
    ):
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
        # CuPy: the raw kernels of downpour.kernels; NumPy: the code below.
        self.accel = None
        if xp is not numpy:
            self.accel = LocalFilterKernels(self)

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
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not match (H, W, C) = {(self.H, self.W, self.C)} (+ batch)"
            )

    # row walks ----------------------------------------------------------------
    # Every direction walks the Ho rows of output locations instead of
    # building an (L, K, B) patch matrix (40 MB at the kernel benchmark
    # shape), so that copies, GEMMs and col2im adds stay in cache.
    #
    # The GEMM-only walks (forward, dW, decode_backward) go one row at a
    # time: a row's patches (Wo, K, B) are at most ~1.5 MB at these shapes
    # and the GEMMs read them while they are hot; measured, one row beat
    # blocks of 2..Ho rows at the ``small`` and kernel benchmark shapes. The
    # col2im walks (decode, dx) go in blocks of rows of
    # about ``COL2IM_BYTES``: a block of n >= k/s rows needs (k/s)^2 adds
    # where n single rows need n*k/s, and on small layers the per-call cost
    # of those adds (a few us each) is what dominates.
    COL2IM_BYTES = 4 << 20
    # Below this, a GEMM walk takes all rows at once: the per-row NumPy calls
    # cost more than the copy saves (tiny layers, e.g. the ``tiny`` preset).
    GEMM_WHOLE_BYTES = 512 << 10

    def _gemm_rows(self, B: int, itemsize: int) -> int:
        return self.Ho if self.L * self.K * B * itemsize <= self.GEMM_WHOLE_BYTES else 1

    def _col2im_rows(self, B: int, itemsize: int) -> int:
        row = self.Wo * self.K * B * itemsize
        nmax = max(1, min(self.Ho, self.COL2IM_BYTES // max(row, 1)))
        nblocks = -(-self.Ho // nmax)
        return -(-self.Ho // nblocks)  # even blocks: no short tail block

    def _row_patches(self, view, i0, n, out):
        """Copy the patches of output rows i0..i0+n-1 into ``out``; (n*Wo, K, B)."""
        out = out[: n * self.Wo]
        out.reshape(n, *view.shape[1:])[...] = view[i0 : i0 + n]  # (a reshape of the view would copy)
        return out.reshape(n * self.Wo, self.K, out.shape[-1])

    def _patches(self, x):
        """Read-only (Ho, Wo, k, k, C, B) view of every patch of x; no copy."""
        return sliding_view(self.xp, x, (0, 1), (self.k, self.k), (self.s, self.s))

    def _groups(self):
        """Offsets inside the field, grouped for col2im: (start, width) runs.

        Offsets d = s*t + e with a whole run of s offsets land location j on
        positions s*(j+t) .. s*(j+t)+s-1: one reshaped view per run. Offsets
        left over when s does not divide k (or s > k) go one at a time.
        """
        k, s = self.k, self.s
        return [(s * t, s) for t in range(k // s)] + [(d, 1) for d in range(s * (k // s), k)]

    def _add_block_cols(self, rows, T, n: int):
        """col2im of a row block: add T (n*Wo, k, k, C, B) into rows, the
        (s*(n-1)+k, W, C, B) input rows that output rows i0..i0+n-1 cover."""
        s, Wo = self.s, self.Wo
        T = T.reshape(n, Wo, *T.shape[1:])
        gx, gy = self._groups(), self._groups()
        if n < len(gy):
            # Few rows: row by row, each add covering the field's whole
            # height (one output row's k offsets dy land on distinct rows).
            for i in range(n):
                self._add_cols(rows[s * i : s * i + self.k], T[i : i + 1], None, gx)
        else:
            self._add_cols(rows, T, gy, gx)

    def _add_cols(self, rows, T, gy, gx):
        """Add T (n, Wo, k, k, C, B) into rows; ``gy`` None: one row, all k dy at once."""
        s, Wo, n = self.s, self.Wo, T.shape[0]
        for a, wy in gy or [(0, self.k)]:
            if gy is None:
                dy_view = rows[None]  # (1, k, W, C, B)
            elif wy == s:
                dy_view = rows[a : a + s * n].reshape(n, s, *rows.shape[1:])
            else:
                dy_view = rows[a : a + s * (n - 1) + 1 : s, None]
            for b, wx in gx:
                if wx == s:
                    dst = dy_view[:, :, b : b + s * Wo].reshape(n, wy, Wo, s, *dy_view.shape[3:])
                else:
                    dst = dy_view[:, :, b : b + s * (Wo - 1) + 1 : s, None]
                dst += T[:, :, a : a + wy, b : b + wx].transpose(0, 2, 1, 3, 4, 5)

    def _gemm_col2im(self, wt, Z, r):
        """r += col2im(wt @ Z) for wt (1 or L, K, M) (any strides), Z (L, M, B)."""
        xp, Wo, K, k, s = self.xp, self.Wo, self.K, self.k, self.s
        B = Z.shape[2]
        nr = self._col2im_rows(B, r.dtype.itemsize)
        if self.C == 1 and s == 1:
            # One map, stride 1: the GEMMs write offset-major (K, n*Wo, B)
            # (row stride n*Wo*B), so that every offset's (n, Wo, B) block is
            # contiguous and lands on contiguous runs of Wo*B in r; with the
            # (n*Wo, K, B) layout each add moves runs of only B values.
            T = self._scratch("TK", (K * nr * Wo * B,), r.dtype)
        else:
            T = self._scratch("T", (nr * Wo, k, k, self.C, B), r.dtype)
        for i0 in range(0, self.Ho, nr):
            n = min(nr, self.Ho - i0)
            loc = slice(i0 * Wo, (i0 + n) * Wo)
            rows = r[s * i0 : s * (i0 + n - 1) + k]
            wi = wt[0] if self.tied else wt[loc]
            if self.C == 1 and s == 1:
                Tk = T[: K * n * Wo * B].reshape(k, k, n, Wo, 1, B)
                xp.matmul(wi, Z[loc], out=Tk.reshape(K, n * Wo, B).transpose(1, 0, 2))
                if n < k:
                    for i in range(n):
                        for dx in range(k):
                            rows[i : i + k, dx : dx + Wo] += Tk[:, dx, i]
                else:
                    for dy in range(k):
                        for dx in range(k):
                            rows[dy : dy + n, dx : dx + Wo] += Tk[dy, dx]
            else:
                Tb = T[: n * Wo]
                xp.matmul(wi, Z[loc], out=Tb.reshape(n * Wo, K, B))
                self._add_block_cols(rows, Tb, n)
        return r

    # encoder ------------------------------------------------------------------
    def forward(self, w, x):
        """y = W @ im2col(x). Returns (y as (Ho, Wo, M, B), context for backward)."""
        if self.accel is not None:
            return self.accel.forward(w, x)
        self._check(x)
        B = x.shape[3]
        xp, Ho, Wo, M, k, C = self.xp, self.Ho, self.Wo, self.M, self.k, self.C
        w3 = w.reshape(self.weight_shape)
        y = xp.empty((Ho, Wo, M, B), dtype=xp.result_type(w3.dtype, x.dtype))
        Y = y.reshape(self.L, M, B)
        nr = self._gemm_rows(B, x.dtype.itemsize)
        pr = self._scratch("Pr", (nr * Wo, k, k, C, B), x.dtype)
        view = self._patches(x)
        for i0 in range(0, Ho, nr):
            loc = slice(i0 * Wo, (i0 + nr) * Wo)
            xp.matmul(w3[0] if self.tied else w3[loc], self._row_patches(view, i0, nr, pr), out=Y[loc])
        # The patches are rebuilt row by row in backward, so the context is the
        # input itself: no patch matrix outlives the call.
        return y, x

    def backward(self, w, P, dy, need_dx: bool = True):
        """Gradients of forward: (dx or None, dW with W's shape). ``P`` is forward's context."""
        if self.accel is not None:
            return self.accel.backward(w, P, dy, need_dx)
        xp, Ho, Wo, M, K, k, C = self.xp, self.Ho, self.Wo, self.M, self.K, self.k, self.C
        x = P
        B = dy.shape[3]
        dt = xp.result_type(w.dtype, x.dtype, dy.dtype)
        w3 = w.reshape(self.weight_shape)
        dY = dy.reshape(self.L, M, B)
        # dW_l = dY_l P_l^T is computed as (P_l dY_l^T)^T: BLAS runs the
        # (K x B)(B x M) product ~2.5x faster than (M x B)(B x K) with a
        # transposed operand, and the transpose back is a cheap in-cache copy.
        dYT = self._scratch("dYT", (self.L, B, M), dy.dtype)
        dYT[...] = dY.transpose(0, 2, 1)
        nr = self._gemm_rows(B, max(x.dtype.itemsize, dt.itemsize))
        pr = self._scratch("Pr", (nr * Wo, k, k, C, B), x.dtype)
        R = self._scratch("R", (nr * Wo, K, M), dt)
        view = self._patches(x)
        dW = xp.empty(self.weight_shape, dtype=dt)
        if self.tied:
            dW[...] = 0
        for i0 in range(0, Ho, nr):
            loc = slice(i0 * Wo, (i0 + nr) * Wo)
            xp.matmul(self._row_patches(view, i0, nr, pr), dYT[loc], out=R)
            if self.tied:
                dW[0] += R.sum(axis=0).T
            else:
                dW[loc] = R.transpose(0, 2, 1)
        if not need_dx:  # stage 1 never needs dx: no buffer, GEMM or col2im
            return None, dW
        # dx = col2im(W^T dY): the decoder's computation with W^T for W2.
        dx = xp.zeros((self.H, self.W, C, B), dtype=dt)
        return self._gemm_col2im(w3.swapaxes(-1, -2), dY, dx), dW

    # decoder (the transpose) --------------------------------------------------
    # decode is backward's dx path with W2 in place of W1^T; decode_backward
    # is forward plus backward's dW on the patches of dr. Neither materialises
    # an (L, K, B) matrix.
    def decode(self, w2, z):
        """r = col2im(W2 @ z): maps (Ho, Wo, M, B) responses back to (H, W, C, B)."""
        if self.accel is not None:
            return self.accel.decode(w2, z)
        xp = self.xp
        B = z.shape[3]
        w3 = w2.reshape(self.decoder_shape)
        r = xp.zeros((self.H, self.W, self.C, B), dtype=xp.result_type(w3.dtype, z.dtype))
        return self._gemm_col2im(w3, z.reshape(self.L, self.M, B), r)

    def decode_backward(self, w2, z, dr):
        """Gradients of decode: (dz as (Ho, Wo, M, B), dW2 with W2's shape)."""
        if self.accel is not None:
            return self.accel.decode_backward(w2, z, dr)
        xp, Ho, Wo, M, K, k, C = self.xp, self.Ho, self.Wo, self.M, self.K, self.k, self.C
        B = z.shape[3]
        w3 = w2.reshape(self.decoder_shape)
        dt = xp.result_type(dr.dtype, z.dtype)
        # dW2_l = dR_l Z_l^T, written straight into dW2. With Z transposed
        # once up front the (K x B)(B x M) GEMMs run ~1.4x faster at K >= 288;
        # at small K the copy costs more than it saves.
        ZT = z.reshape(self.L, M, B).transpose(0, 2, 1)
        if K >= 128:
            ZT = self._scratch("ZT", (self.L, B, M), z.dtype)
            ZT[...] = z.reshape(self.L, M, B).transpose(0, 2, 1)
        dz = xp.empty((Ho, Wo, M, B), dtype=xp.result_type(w3.dtype, dr.dtype))
        dZ = dz.reshape(self.L, M, B)
        nr = self._gemm_rows(B, max(dr.dtype.itemsize, dt.itemsize))
        pr = self._scratch("Pr", (nr * Wo, k, k, C, B), dr.dtype)
        view = self._patches(dr)
        w2t = w3.swapaxes(-1, -2)  # (1 or L, M, K)
        if self.tied:
            dW2 = xp.zeros(self.decoder_shape, dtype=dt)
            R = self._scratch("R", (nr * Wo, K, M), dt)
        else:
            dW2 = xp.empty(self.decoder_shape, dtype=dt)
        for i0 in range(0, Ho, nr):
            loc = slice(i0 * Wo, (i0 + nr) * Wo)
            P = self._row_patches(view, i0, nr, pr)
            if self.tied:
                xp.matmul(P, ZT[loc], out=R)
                dW2[0] += R.sum(axis=0)
                xp.matmul(w2t[0], P, out=dZ[loc])
            else:
                xp.matmul(P, ZT[loc], out=dW2[loc])
                xp.matmul(w2t[loc], P, out=dZ[loc])
        return dz, dW2
