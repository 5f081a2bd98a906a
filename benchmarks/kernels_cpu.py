"""CPU kernel benchmark: downpour.nn layers against PyTorch computing the same thing.

    .venv/bin/python benchmarks/kernels_cpu.py [--reps N] [--warmup N]

Three workloads, forward + backward each:

* ``LocalFilter``: B=32, 3x64x64 input, 12x12 field, stride 2, 8 maps
  (untied weights, 27x27 output locations).
* ``L2Pool + LCN`` on (B, C, H, W) = (32, 8, 27, 27): L2 pooling 3x3 stride 1
  (eps 1e-2) to 25x25, then LCN with a 5x5 Gaussian (sigma = 5/4).
* ``TICA rec``: the reconstruction part of a first-stage TICA step on the
  LocalFilter shape: z = W1 x, r = decode(W2, z) (col2im of W2 z), loss
  sum((r - x)^2) / B, gradients of W1 and W2 (no dx: a first stage does not
  need it). PyTorch: the (L, K, B) patch stack + bmm, F.fold for col2im.

Layouts: each side gets its natural layout, converted outside the timed
region. Ours is (H, W, C, B), weights (L, M, K) with K in (dy, dx, c) order.
PyTorch is timed in several formulations (NCHW with Tensor.unfold + einsum,
and the fastest found, a (L, K, B) patch stack + bmm in our layout; conv2d and
pooling ops for L2Pool+LCN), all with autograd for backward; the fastest of
each family is the reference. Both sides must agree on outputs and all
gradients (float32, relative to the norm) or the run fails.

Timings are medians over repetitions after warm-up, on the same process, with
torch.set_num_threads equal to the BLAS threads numpy uses. The roofline is
numpy sgemm (1024^3, and the shape-matched stack of per-location GEMMs) from
the same run. The last line is JSON with the ratios torch_ms / ours_ms.

OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, when set, make current OpenBLAS pick a
slower kernel; this script re-executes itself once without both (for this
process only) and prints the kernel threadpoolctl reports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
if any(k in os.environ for k in _BLAS_ENV) and os.environ.get("_KERNELS_CPU_REEXEC") != "1":
    env = {k: v for k, v in os.environ.items() if k not in _BLAS_ENV}
    env["_KERNELS_CPU_REEXEC"] = "1"
    print(f"note: re-running without {', '.join(_BLAS_ENV)} for this benchmark only", flush=True)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

import numpy as np  # noqa: E402 - after the thread count is pinned above
import torch  # noqa: E402 - after the thread count is pinned above
import torch.nn.functional as F  # noqa: E402 - after the thread count is pinned above
from threadpoolctl import threadpool_info  # noqa: E402 - after the thread count is pinned above

from downpour.nn import LCN, LocalFilter, Pool  # noqa: E402 - after the thread count is pinned above
from downpour.nn.lcn import _inside, gaussian_1d  # noqa: E402 - after the thread count is pinned above

RTOL = 1e-4


def median_ms(fn, reps: int, warmup: int) -> float:
    return interleaved_ms([fn], reps, warmup)[0]


def interleaved_ms(fns, reps: int, warmup: int) -> list[float]:
    """Median ms of each function, calling them in turn every repetition so
    that all of them see the same load on a shared, noisy machine."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    ts = [[] for _ in fns]
    for _ in range(reps):
        for fn, t in zip(fns, ts):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [float(np.median(t) * 1e3) for t in ts]


def check(name: str, ours, ref) -> float:
    """Relative error ||ours - ref|| / ||ref||; raises on a mismatch."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        raise SystemExit(f"MISMATCH {name}: shape {ours.shape} vs {ref.shape}")
    err = float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))
    if not err <= RTOL:
        raise SystemExit(f"MISMATCH {name}: relative error {err:.3e} > {RTOL:.0e}")
    return err


def blas_info() -> tuple[int, str]:
    for lib in threadpool_info():
        if lib.get("user_api") == "blas":
            desc = f"{lib.get('internal_api')} {lib.get('version')} kernel={lib.get('architecture')}"
            return int(lib["num_threads"]), desc
    return os.cpu_count() or 1, "unknown BLAS"


# --------------------------------------------------------------------------- LocalFilter
def bench_local_filter(rng, reps, warmup, rows):
    B, C, H, W, k, s, M = 32, 3, 64, 64, 12, 2, 8
    lf = LocalFilter((C, H, W), M, k, s)
    Ho, Wo, L, K = lf.Ho, lf.Wo, lf.L, lf.K
    x = rng.standard_normal((H, W, C, B)).astype(np.float32)  # ours: (H, W, C, B)
    w = (rng.standard_normal(lf.weight_shape) * 0.05).astype(np.float32)  # (L, M, K), K = (dy, dx, c)
    g = rng.standard_normal((Ho, Wo, M, B)).astype(np.float32)  # upstream gradient

    def ours():
        y, ctx = lf.forward(w, x)
        dx, dw = lf.backward(w, ctx, g)
        return y, dx, dw

    y, dx, dw = ours()

    # Torch A: NCHW, Tensor.unfold + einsum; weight (Ho, Wo, M, C, kh, kw).
    xt = torch.from_numpy(x.transpose(3, 2, 0, 1).copy()).requires_grad_()
    wt = torch.from_numpy(w.reshape(Ho, Wo, M, k, k, C).transpose(0, 1, 2, 5, 3, 4).copy()).requires_grad_()
    gt = torch.from_numpy(g.transpose(3, 2, 0, 1).copy())  # (B, M, Ho, Wo)

    def torch_nchw():
        xt.grad = wt.grad = None
        xu = xt.unfold(2, k, s).unfold(3, k, s)  # (B, C, Ho, Wo, kh, kw), a view
        yt = torch.einsum("bchwyx,hwmcyx->bmhw", xu, wt)
        yt.backward(gt)
        return yt

    # Torch B: our layout, (L, K, B) patch stack from Tensor.unfold + bmm.
    xh = torch.from_numpy(x.copy()).requires_grad_()
    wh = torch.from_numpy(w.copy()).requires_grad_()
    gh = torch.from_numpy(g.reshape(L, M, B).copy())

    def torch_hwcb():
        xh.grad = wh.grad = None
        xu = xh.unfold(0, k, s).unfold(1, k, s)  # (Ho, Wo, C, B, kh, kw)
        P = xu.permute(0, 1, 4, 5, 2, 3).reshape(L, K, B)
        yt = torch.bmm(wh, P)
        yt.backward(gh)
        return yt

    yt = torch_nchw()
    errs = [
        check("LocalFilter y (nchw)", y, yt.detach().numpy().transpose(2, 3, 1, 0)),
        check("LocalFilter dx (nchw)", dx, xt.grad.numpy().transpose(2, 3, 1, 0)),
        check("LocalFilter dW (nchw)", dw, wt.grad.numpy().transpose(0, 1, 2, 4, 5, 3).reshape(L, M, K)),
    ]
    yt = torch_hwcb()
    errs += [
        check("LocalFilter y (hwcb)", y.reshape(L, M, B), yt.detach().numpy()),
        check("LocalFilter dx (hwcb)", dx, xh.grad.numpy()),
        check("LocalFilter dW (hwcb)", dw, wh.grad.numpy()),
    ]

    flops = 3 * 2 * L * M * K * B  # forward 2LMKB, backward (dW and dx) twice that
    t_ours, t_a, t_b = interleaved_ms([ours, torch_nchw, torch_hwcb], reps, warmup)
    t_torch = min(t_a, t_b)
    rows += [
        ("LocalFilter f+b", "ours (H,W,C,B), row-blocked", t_ours, flops),
        ("LocalFilter f+b", "torch NCHW unfold+einsum", t_a, flops),
        ("LocalFilter f+b", "torch (L,K,B) unfold+bmm", t_b, flops),
    ]
    return t_torch / t_ours, max(errs), (L, M, K, B)


# --------------------------------------------------------------------------- TICA reconstruction
def bench_tica_rec(rng, reps, warmup, rows):
    B, C, H, W, k, s, M = 32, 3, 64, 64, 12, 2, 8
    lf = LocalFilter((C, H, W), M, k, s)
    L, K = lf.L, lf.K
    x = rng.standard_normal((H, W, C, B)).astype(np.float32)
    w1 = (rng.standard_normal(lf.weight_shape) * 0.05).astype(np.float32)  # (L, M, K)
    w2 = (rng.standard_normal(lf.decoder_shape) * 0.05).astype(np.float32)  # (L, K, M)

    def ours():
        z, ctx = lf.forward(w1, x)
        err = lf.decode(w2, z) - x
        loss = float(np.vdot(err.ravel(), err.ravel())) / B
        dr = err * np.float32(2.0 / B)
        dz, dw2 = lf.decode_backward(w2, z, dr)
        _, dw1 = lf.backward(w1, ctx, dz, need_dx=False)
        return loss, dw1, dw2

    loss, dw1, dw2 = ours()

    xh = torch.from_numpy(x.copy())
    xn = torch.from_numpy(x.transpose(3, 2, 0, 1).copy())  # (B, C, H, W) for the error
    w1h = torch.from_numpy(w1.copy()).requires_grad_()
    w2h = torch.from_numpy(w2.copy()).requires_grad_()

    def torch_bmm_fold():
        w1h.grad = w2h.grad = None
        P = xh.unfold(0, k, s).unfold(1, k, s).permute(0, 1, 4, 5, 2, 3).reshape(L, K, B)
        z = torch.bmm(w1h, P)  # (L, M, B)
        R = torch.bmm(w2h, z)  # (L, K, B), K = (dy, dx, c)
        cols = R.reshape(L, k, k, C, B).permute(4, 3, 1, 2, 0).reshape(B, C * k * k, L)
        r = F.fold(cols, (H, W), k, stride=s)
        lt = ((r - xn) ** 2).sum() / B
        lt.backward()
        return lt

    lt = torch_bmm_fold()
    errs = [
        check("TICA rec loss", loss, lt.item()),
        check("TICA rec dW1", dw1, w1h.grad.numpy()),
        check("TICA rec dW2", dw2, w2h.grad.numpy()),
    ]
    flops = 4 * 2 * L * M * K * B  # forward, decode, decode_backward (2x), dW1
    t_ours, t_torch = interleaved_ms([ours, torch_bmm_fold], reps, warmup)
    rows += [
        ("TICA rec f+b", "ours (H,W,C,B), row-blocked", t_ours, flops),
        ("TICA rec f+b", "torch (L,K,B) bmm+fold", t_torch, flops),
    ]
    return t_torch / t_ours, max(errs)


# --------------------------------------------------------------------------- L2Pool + LCN
def bench_pool_lcn(rng, reps, warmup, rows):
    B, C, H, W = 32, 8, 27, 27
    p, ps, peps, lsize, leps = 3, 1, 1e-2, 5, 1e-4
    pool = Pool((C, H, W), p, ps, "l2", peps)
    Hp, Wp = pool.Ho, pool.Wo
    lcn = LCN((C, Hp, Wp), lsize, 0.0, leps)
    x = rng.standard_normal((H, W, C, B)).astype(np.float32)
    g = rng.standard_normal((Hp, Wp, C, B)).astype(np.float32)

    def ours():
        h, pctx = pool.forward(x)
        y, lctx = lcn.forward(h)
        dh = lcn.backward(lctx, g)
        return y, pool.backward(pctx, dh)

    y, dx = ours()

    # The same Gaussian and border renormaliser as downpour.nn.lcn, in float32.
    g1 = gaussian_1d(lsize, lcn.sigma)
    inv = torch.from_numpy((1.0 / np.outer(_inside(g1, Hp), _inside(g1, Wp))).astype(np.float32))[None, None]
    g2 = torch.from_numpy(np.outer(g1, g1).astype(np.float32))[None, None]  # (1, 1, 5, 5)
    gv = torch.from_numpy(g1.astype(np.float32)).view(1, 1, lsize, 1)
    gh = torch.from_numpy(g1.astype(np.float32)).view(1, 1, 1, lsize)
    r = lsize // 2

    def blur2d(u):  # (B, 1, H, W) zero-padded same-size Gaussian, one 5x5 conv
        return F.conv2d(u, g2, padding=r)

    def blur_sep(u):  # two 1-D passes
        return F.conv2d(F.conv2d(u, gv, padding=(r, 0)), gh, padding=(0, r))

    def make(blur):
        def f(xt):
            h = torch.sqrt(F.avg_pool2d(xt * xt, p, ps) * float(p * p) + peps)
            m = blur(h.mean(dim=1, keepdim=True)) * inv
            v = h - m
            sig = torch.sqrt(torch.clamp(blur((v * v).mean(dim=1, keepdim=True)) * inv, min=0))
            c = sig.mean(dim=(2, 3), keepdim=True)
            d = torch.clamp(torch.maximum(sig, c), min=leps)
            return v / d

        return f

    xt = torch.from_numpy(x.transpose(3, 2, 0, 1).copy()).requires_grad_()
    gt = torch.from_numpy(g.transpose(3, 2, 0, 1).copy())
    variants = [("torch NCHW 5x5 conv2d", make(blur2d)), ("torch NCHW separable conv2d", make(blur_sep))]
    errs, runs = [], []
    flops = 3 * B * (pool.flops() + lcn.flops())  # forward from the layers' counts; backward ~2x
    for name, f in variants:

        def run(f=f):
            xt.grad = None
            yt = f(xt)
            yt.backward(gt)
            return yt

        yt = run()
        errs += [
            check(f"L2Pool+LCN y ({name})", y, yt.detach().numpy().transpose(2, 3, 1, 0)),
            check(f"L2Pool+LCN dx ({name})", dx, xt.grad.numpy().transpose(2, 3, 1, 0)),
        ]
        runs.append(run)
    t_ours, *times = interleaved_ms([ours, *runs], reps, warmup)
    rows.append(("L2Pool+LCN f+b", "ours (H,W,C,B)", t_ours, flops))
    rows += [("L2Pool+LCN f+b", name, t, flops) for (name, _), t in zip(variants, times)]
    return min(times) / t_ours, max(errs)


def roofline(rng, reps, warmup, shape):
    L, M, K, B = shape
    a = rng.standard_normal((1024, 1024)).astype(np.float32)
    t_big = median_ms(lambda: a @ a, reps, warmup)
    wa = rng.standard_normal((L, M, K)).astype(np.float32)
    pa = rng.standard_normal((L, K, B)).astype(np.float32)
    out = np.empty((L, M, B), np.float32)
    t_loc = median_ms(lambda: np.matmul(wa, pa, out=out), reps, warmup)
    return 2 * 1024**3 / t_big / 1e6, 2 * L * M * K * B / t_loc / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    nthreads, desc = blas_info()
    torch.set_num_threads(nthreads)
    print(
        f"numpy {np.__version__} BLAS: {desc}, threads={nthreads}; torch {torch.__version__} "
        f"threads={torch.get_num_threads()}"
    )
    rng = np.random.default_rng(args.seed)
    rows: list = []
    lf_ratio, lf_err, shape = bench_local_filter(rng, args.reps, args.warmup, rows)
    pl_ratio, pl_err = bench_pool_lcn(rng, args.reps, args.warmup, rows)
    tr_ratio, tr_err = bench_tica_rec(rng, args.reps, args.warmup, rows)
    gemm_big, gemm_loc = roofline(rng, args.reps, args.warmup, shape)

    print(f"{'workload':<17}{'implementation':<32}{'ms':>9}{'GFLOP/s':>10}")
    for wl, impl, ms, fl in rows:
        print(f"{wl:<17}{impl:<32}{ms:>9.2f}{fl / ms / 1e6:>10.1f}")
    print(
        f"roofline: numpy sgemm 1024^3 {gemm_big:.1f} GFLOP/s; "
        f"per-location stack (L,M,K)@(L,K,B)={shape[0]}x({shape[1]}x{shape[2]})@({shape[2]}x{shape[3]}) "
        f"{gemm_loc:.1f} GFLOP/s"
    )
    print(f"agreement: max relative error LocalFilter {lf_err:.1e}, L2Pool+LCN {pl_err:.1e} (limit {RTOL:.0e})")
    print(f"agreement: max relative error TICA rec {tr_err:.1e} (limit {RTOL:.0e})")
    print(
        json.dumps(
            {
                "local_filter_speedup": round(lf_ratio, 3),
                "l2pool_lcn_speedup": round(pl_ratio, 3),
                "tica_rec_speedup": round(tr_ratio, 3),
                "sgemm_gflops": round(gemm_big, 1),
                "targets": {"local_filter": 2.0, "l2pool_lcn": 1.5},
            }
        )
    )


if __name__ == "__main__":
    main()
