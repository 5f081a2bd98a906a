"""The CUDA source of every raw kernel, and the signatures read from it.

One source, compiled once per element type with ``-Dreal=float`` or
``-Dreal=double`` (NVRTC through CuPy on a GPU; the tests also build it as
plain C++ on the host and run it on NumPy arrays, which checks the index
arithmetic without a device). Layouts are those of ``downpour.nn``:
activations (H, W, C, B) with the batch innermost, patches (L, K, B) with
L = i*Wo + j and K = (dy*k + dx)*C + c.

Every kernel is a grid-stride loop over independent output elements: no
shared memory, no atomics, no synchronisation. Consecutive threads take
consecutive batch entries, so reads and writes are coalesced. The adjoints
(col2im, pooling backward) gather over the windows that cover an element
instead of scattering into it, so sums are formed in a fixed order and the
result does not depend on scheduling.

Parameters use only ``const real*``, ``real*``, ``int``, ``long long`` and
``real``: ``signatures()`` parses them so that launchers convert Python
arguments to exactly those C types.
"""

from __future__ import annotations

import re
import string

_TEMPLATE = r"""
__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }
/* First window start i (stride s, size k) with i*s + k > pos, i >= 0. */
__device__ __forceinline__ int first_cover(int pos, int k, int s) {
    int d = pos - k + 1;
    return d <= 0 ? 0 : (d + s - 1) / s;
}

/* Patches of output rows i0.. as (n*Wo, K, B), n = count / (Wo*K*B).
   x: (H, W, C, B). */
extern "C" __global__ void im2col(const real* __restrict__ x, real* __restrict__ out,
                                  int W, int C, int B, int Wo, int k, int s, int l0, long long count) {
    const int K = k * k * C;
${GRID_STRIDE}
        const int b = (int)(t % B);
        const long long r = t / B;
        const int kk = (int)(r % K);
        const int l = (int)(r / K) + l0;
        const int c = kk % C, q = kk / C;
        const int dx = q % k, dy = q / k;
        const int h = (l / Wo) * s + dy, w = (l % Wo) * s + dx;
        out[t] = x[(((long long)h * W + w) * C + c) * B + b];
    }
}

/* out[h, w, c, b] += the patch entries of output rows i0..i1-1 that land on
   (h, w, c, b), for input rows h = h0 .. h0 + count/(W*C*B) - 1. cols holds
   those rows' patches as ((i - i0)*Wo + j, K, B); out is (H, W, C, B). */
extern "C" __global__ void col2im_add(const real* __restrict__ cols, real* __restrict__ out,
                                      int W, int C, int B, int Wo, int k, int s,
                                      int i0, int i1, int h0, long long count) {
    const int K = k * k * C;
${HWCB_COL2IM}
        const int ilo = imax(first_cover(h, k, s), i0), ihi = imin(h / s, i1 - 1);
        const int jlo = first_cover(w, k, s), jhi = imin(w / s, Wo - 1);
        real acc = 0;
        for (int i = ilo; i <= ihi; ++i) {
            const int dy = h - i * s;
            for (int j = jlo; j <= jhi; ++j) {
                const int dx = w - j * s;
                const long long loc = (long long)(i - i0) * Wo + j;
                acc += cols[(loc * K + (dy * k + dx) * C + c) * B + b];
            }
        }
        out[(((long long)h * W + w) * C + c) * B + b] += acc;
    }
}

/* y[i, j, c, b] = sqrt(eps + sum over the p x p window of x^2); x (H, W, C, B),
   y (Ho, Wo, C, B), count = Ho*Wo*C*B. */
extern "C" __global__ void l2pool_fwd(const real* __restrict__ x, real* __restrict__ y,
                                      int W, int C, int B, int Wo, int p, int s, real eps,
                                      long long count) {
${HWCB_POOL_OUT}
        real acc = 0;
        for (int dy = 0; dy < p; ++dy) {
            const long long row = (long long)(i * s + dy) * W;
            for (int dx = 0; dx < p; ++dx) {
                const real v = x[((row + j * s + dx) * C + c) * B + b];
                acc += v * v;
            }
        }
        y[t] = sqrt(acc + eps);
    }
}

/* dx[h, w, c, b] = x[h, w, c, b] * sum over the windows covering (h, w) of
   dy / y; count = H*W*C*B. */
extern "C" __global__ void l2pool_bwd(const real* __restrict__ x, const real* __restrict__ y,
                                      const real* __restrict__ dy, real* __restrict__ dx,
                                      int W, int C, int B, int Ho, int Wo, int p, int s,
                                      long long count) {
${HWCB_POOL_IN}
        const int ihi = imin(h / s, Ho - 1), jhi = imin(w / s, Wo - 1);
        const int jlo = first_cover(w, p, s);
        real acc = 0;
        for (int i = first_cover(h, p, s); i <= ihi; ++i) {
            for (int j = jlo; j <= jhi; ++j) {
                const long long o = (((long long)i * Wo + j) * C + c) * B + b;
                acc += dy[o] / y[o];
            }
        }
        dx[t] = x[t] * acc;
    }
}

/* Zero-padded 1-D blur with ``size`` taps g along one axis of a contiguous
   array: out[e] = sum_q g[q] * u[e + (q - size/2) * step] where the position
   along the axis, (e / step) % n, plus q - size/2 stays inside 0..n-1. */
extern "C" __global__ void blur_axis(const real* __restrict__ u, const real* __restrict__ g,
                                     real* __restrict__ out, int size, int n, long long step,
                                     long long count) {
    const int r = size / 2;
${GRID_STRIDE}
        const int pos = (int)((t / step) % n);
        const int qlo = imax(0, r - pos), qhi = imin(size - 1, n - 1 - pos + r);
        real acc = 0;
        for (int q = qlo; q <= qhi; ++q) acc += g[q] * u[t + (q - r) * step];
        out[t] = acc;
    }
}
"""


def _unravel_hwcb(x: str, width: str, y: str, offset: str = "") -> str:
    """The grid-stride loop over the elements t of a (.., width, C, B) array, with t's
    position in it: b, c, then ``x`` < ``width`` and ``y`` (plus ``offset``)."""
    return _GRID_STRIDE + (
        "        const int b = (int)(t % B);\n"
        "        long long r = t / B;\n"
        "        const int c = (int)(r % C);\n"
        "        r /= C;\n"
        f"        const int {x} = (int)(r % {width});\n"
        f"        const int {y} = (int)(r / {width}){offset};\n"
    )


# Every kernel walks its elements with this loop (written once here, expanded into the source).
_GRID_STRIDE = (
    "    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < count;\n"
    "         t += (long long)blockDim.x * gridDim.x) {\n"
)
SOURCE = string.Template(_TEMPLATE).substitute(
    GRID_STRIDE=_GRID_STRIDE.rstrip("\n"),
    HWCB_COL2IM=_unravel_hwcb("w", "W", "h", " + h0").rstrip("\n"),  # input rows h0..
    HWCB_POOL_OUT=_unravel_hwcb("j", "Wo", "i").rstrip("\n"),
    HWCB_POOL_IN=_unravel_hwcb("w", "W", "h").rstrip("\n"),
)

# C type -> the kind a launcher converts a Python argument to.
_KINDS = {"const real*": "array", "real*": "array", "int": "int32", "long long": "int64", "real": "real"}
_KERNEL = re.compile(r'extern "C" __global__ void (\w+)\((.*?)\)\s*\{', re.S)


def signatures(source: str = SOURCE) -> dict[str, list[tuple[str, str]]]:
    """Kernel name -> [(kind, parameter name)], kind one of array, int32, int64, real."""
    out: dict[str, list[tuple[str, str]]] = {}
    for name, params in _KERNEL.findall(source):
        args = []
        for p in params.split(","):
            words = p.replace("__restrict__", "").replace("*", "* ").split()
            ctype = " ".join(words[:-1]).replace(" *", "*")
            if ctype not in _KINDS:
                raise ValueError(f"kernel {name}: parameter type {ctype!r} is not one of {sorted(_KINDS)}")
            args.append((_KINDS[ctype], words[-1]))
        out[name] = args
    return out


KERNELS = tuple(signatures())
