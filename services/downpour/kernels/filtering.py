"""Local filtering on the GPU: im2col / col2im raw kernels around batched GEMMs.

The per-location products are ``xp.matmul`` over stacks of (M, K) x (K, B)
matrices, which CuPy hands to cuBLAS as one strided batched GEMM. The patch
matrix of a large layer does not fit comfortably (le2012's first stage at
B=256 would need 33 GB), so every direction walks blocks of output rows whose
patches take at most ``CHUNK_BYTES``, reusing one buffer: gather the block's
patches, run its GEMMs, and for the adjoints add the block's columns back
with ``col2im_add``, which gathers per input element (no atomics; blocks are
added one after the other, so sums have a fixed order).

``LocalFilterKernels(layer)`` provides the four directions of
``downpour.nn.LocalFilter`` with the same arguments and results; the NumPy
layer is its reference.
"""

from __future__ import annotations

from collections.abc import Callable

from .launch import Launcher, launcher_for

CHUNK_BYTES = 256 << 20


class LocalFilterKernels:
    def __init__(self, layer, launcher: Callable[[object], Launcher] | None = None):
        self.f = layer
        self.xp = layer.xp
        self._launcher = launcher or (lambda dtype: launcher_for(self.xp, dtype))

    # helpers --------------------------------------------------------------------
    def _rows(self, B: int, itemsize: int) -> int:
        """Output rows per block: as many as keep the block's patches under CHUNK_BYTES."""
        f = self.f
        row = f.Wo * f.K * B * itemsize
        n = max(1, min(f.Ho, CHUNK_BYTES // max(row, 1)))
        nblocks = -(-f.Ho // n)
        return -(-f.Ho // nblocks)  # even blocks

    def _blocks(self, B: int, itemsize: int):
        n = self._rows(B, itemsize)
        for i0 in range(0, self.f.Ho, n):
            yield i0, min(n, self.f.Ho - i0)

    def _contig(self, a, dtype):
        return self.xp.ascontiguousarray(a, dtype=dtype)

    def _im2col(self, launch, x, i0: int, n: int, buf):
        f = self.f
        B = x.shape[3]
        P = buf[: n * f.Wo * f.K * B].reshape(n * f.Wo, f.K, B)
        launch("im2col", P.size, x, P, f.W, f.C, B, f.Wo, f.k, f.s, i0 * f.Wo, P.size)
        return P

    def _col2im_add(self, launch, cols, i0: int, n: int, out):
        f = self.f
        B = out.shape[3]
        h0, h1 = i0 * f.s, (i0 + n - 1) * f.s + f.k
        count = (h1 - h0) * f.W * f.C * B
        launch("col2im_add", count, cols, out, f.W, f.C, B, f.Wo, f.k, f.s, i0, i0 + n, h0, count)

    def _buffer(self, B: int, dtype):
        n = self._rows(B, dtype.itemsize)
        return self.xp.empty(n * self.f.Wo * self.f.K * B, dtype=dtype)

    def _begin(self, *arrays):
        """(the element type the arrays combine to, the launcher for it): how every direction starts."""
        dt = self.xp.result_type(*(a.dtype for a in arrays))
        return dt, self._launcher(dt)

    def _per_location(self, a, dtype):
        """Codes or their gradient, (Ho, Wo, M, B), as (L, M, B) of ``dtype``."""
        return self._contig(a, dtype).reshape(self.f.L, self.f.M, a.shape[3])

    def _transposed(self, w, shape, dtype):
        """Weights reshaped to ``shape`` (1 or L, rows, cols), as (1 or L, cols, rows) of ``dtype``."""
        return w.reshape(shape).astype(dtype, copy=False).transpose(0, 2, 1)

    def _weight_grad(self, shape, dtype):
        # tied: every block adds into the one shared location, so it starts at zero
        return self.xp.zeros(shape, dtype=dtype) if self.f.tied else self.xp.empty(shape, dtype=dtype)

    def _add_weight_grad(self, dW, loc: slice, g) -> None:
        """Store one block's per-location weight gradient ``g`` (summed over locations when tied)."""
        if self.f.tied:
            dW[0] += g.sum(axis=0)
        else:
            dW[loc] = g

    # the four directions ----------------------------------------------------------
    def forward(self, w, x):
        f, xp = self.f, self.xp
        f._check(x)
        dt, launch = self._begin(w, x)
        x = self._contig(x, dt)
        B = x.shape[3]
        w3 = w.reshape(f.weight_shape).astype(dt, copy=False)
        Y = xp.empty((f.L, f.M, B), dtype=dt)
        buf = self._buffer(B, dt)
        for i0, n in self._blocks(B, dt.itemsize):
            loc = slice(i0 * f.Wo, (i0 + n) * f.Wo)
            P = self._im2col(launch, x, i0, n, buf)
            Y[loc] = xp.matmul(w3 if f.tied else w3[loc], P)
        return Y.reshape(f.Ho, f.Wo, f.M, B), x

    def backward(self, w, x, dy, need_dx: bool = True):
        f, xp = self.f, self.xp
        dt, launch = self._begin(w, x, dy)
        x = self._contig(x, dt)
        B = dy.shape[3]
        dY = self._per_location(dy, dt)
        dW = self._weight_grad(f.weight_shape, dt)
        dx = xp.zeros((f.H, f.W, f.C, B), dtype=dt) if need_dx else None
        wt = self._transposed(w, f.weight_shape, dt)  # (1 or L, K, M)
        buf = self._buffer(B, dt)
        for i0, n in self._blocks(B, dt.itemsize):
            loc = slice(i0 * f.Wo, (i0 + n) * f.Wo)
            P = self._im2col(launch, x, i0, n, buf)
            self._add_weight_grad(dW, loc, xp.matmul(dY[loc], P.transpose(0, 2, 1)))  # (n*Wo, M, K)
            if need_dx:
                cols = self._contig(xp.matmul(wt if f.tied else wt[loc], dY[loc]), dt)  # (n*Wo, K, B)
                self._col2im_add(launch, cols, i0, n, dx)
        return dx, dW

    def decode(self, w2, z):
        f, xp = self.f, self.xp
        dt, launch = self._begin(w2, z)
        B = z.shape[3]
        w3 = w2.reshape(f.decoder_shape).astype(dt, copy=False)
        Z = self._per_location(z, dt)
        r = xp.zeros((f.H, f.W, f.C, B), dtype=dt)
        for i0, n in self._blocks(B, dt.itemsize):
            loc = slice(i0 * f.Wo, (i0 + n) * f.Wo)
            cols = self._contig(xp.matmul(w3 if f.tied else w3[loc], Z[loc]), dt)
            self._col2im_add(launch, cols, i0, n, r)
        return r

    def decode_backward(self, w2, z, dr):
        f, xp = self.f, self.xp
        dt, launch = self._begin(w2, z, dr)
        dr = self._contig(dr, dt)
        B = z.shape[3]
        Z = self._per_location(z, dt)
        w2t = self._transposed(w2, f.decoder_shape, dt)  # (1 or L, M, K)
        dZ = xp.empty((f.L, f.M, B), dtype=dt)
        dW2 = self._weight_grad(f.decoder_shape, dt)
        buf = self._buffer(B, dt)
        for i0, n in self._blocks(B, dt.itemsize):
            loc = slice(i0 * f.Wo, (i0 + n) * f.Wo)
            P = self._im2col(launch, dr, i0, n, buf)
            dZ[loc] = xp.matmul(w2t if f.tied else w2t[loc], P)
            self._add_weight_grad(dW2, loc, xp.matmul(P, Z[loc].transpose(0, 2, 1)))  # (n*Wo, K, M)
        return dZ.reshape(f.Ho, f.Wo, f.M, B), dW2
