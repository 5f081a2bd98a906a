"""GPU kernel benchmark: downpour.nn on CuPy (downpour.kernels) against PyTorch CUDA, and le2012's training rate.

    PYTHONPATH=services python3 benchmarks/kernels_gpu.py --out results.json [--reps N] [--warmup N]
    PYTHONPATH=services python3 benchmarks/kernels_gpu.py --smoke --out s.json   # no GPU: NumPy, tiny shapes

Workloads, forward + backward each, float32 on both sides (TF32 off for both):

* ``stage``: one stage, local filtering -> L2 pooling -> LCN, then backward
  from an upstream gradient (dW, and dx where a stage needs it). Shapes: the
  CPU benchmark's (benchmarks/kernels_cpu.py: B=32, 3x64x64, 12x12 field,
  stride 2, 8 maps; pooling 3x3 stride 1; LCN 5x5) and le2012's three stages
  (18x18 fields, 8 maps, 5x5 L2 pooling, 5x5 LCN, strides 1, on 3x200x200,
  8x179x179 and 8x158x158 inputs; stage 1 needs no dx), B=32.
* ``tica_rec``: the reconstruction part of a TICA step at the CPU benchmark's
  shape (as there: forward, decode, both gradients of decode, dW1).

PyTorch computes the same functions with autograd in several formulations:
the (L, K, B) patch stack from Tensor.unfold + bmm (our layout), NCHW unfold
+ einsum, and for the LCN blurs separable or 2-D conv2d; the fastest of them
is the reference. Outputs and every gradient must agree (normwise relative
error <= 1e-4) or the run fails. Times are medians over repetitions after
warm-up, each call synchronised, the implementations interleaved.

The roofline of each workload is min(peak, AI * bandwidth): peak is this
run's float32 GEMM rate (8192^3 through cuBLAS), bandwidth a device-to-device
copy, AI the workload's FLOPs over the bytes it must at least move (weights
read for each product that needs them, weight gradient written, activations
in and out).

le2012: the whole network's TICA gradient and an on-device Adagrad update per
step, synthetic 200x200x3 input arriving in host memory each step (as a
worker's batches do), images/s per batch size.

The JSON names the GPU, the versions and every number; ratios are PyTorch ms
over ours (above 1: ours is faster).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np

from downpour.nn import LCN, LocalFilter, Network, Pool, presets
from downpour.nn.lcn import _inside, gaussian_1d

RTOL = 1e-4
TARGETS = {"stage_speedup_vs_torch": 1.5, "le2012_images_per_second": 1400}


class Backend:
    """The array module under test (CuPy, or NumPy for --smoke), its sync, and torch when used."""

    def __init__(self, smoke: bool, use_torch: bool):
        if smoke:
            self.xp = np
        else:
            from downpour import device as devices

            try:
                self.xp = devices.array_module("gpu")
            except devices.DeviceError as e:
                raise SystemExit(f"kernels_gpu: {e}") from None
        self.torch = None
        if use_torch:
            try:
                import torch
            except ImportError as e:
                raise SystemExit(
                    f"kernels_gpu: PyTorch is not installed ({e}); --no-torch measures ours only"
                ) from None

            if not smoke and not torch.cuda.is_available():
                raise SystemExit("PyTorch sees no CUDA device")
            torch.backends.cuda.matmul.allow_tf32 = False  # float32 products on both sides
            torch.backends.cudnn.allow_tf32 = False
            self.torch = torch
            self.tdev = "cpu" if smoke else "cuda"

    def sync(self):
        if self.xp is not np:
            self.xp.cuda.Device().synchronize()
        if self.torch is not None and self.tdev == "cuda":
            self.torch.cuda.synchronize()

    def free(self):
        if self.xp is not np:
            self.xp.get_default_memory_pool().free_all_blocks()
        if self.torch is not None and self.tdev == "cuda":
            self.torch.cuda.empty_cache()

    def host(self, a):
        return self.xp.asnumpy(a) if self.xp is not np else np.asarray(a)

    def t(self, a, grad=False):
        t = self.torch.from_numpy(np.ascontiguousarray(a)).to(self.tdev)
        return t.requires_grad_() if grad else t


def interleaved_ms(be: Backend, fns, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        for fn in fns:
            fn()
    be.sync()
    ts = [[] for _ in fns]
    for _ in range(reps):
        for fn, t in zip(fns, ts):
            be.sync()
            t0 = time.perf_counter()
            fn()
            be.sync()
            t.append(time.perf_counter() - t0)
    return [float(np.median(t) * 1e3) for t in ts]


def sig(v: float, digits: int = 4) -> float:
    """``v`` to ``digits`` significant figures (for the JSON)."""
    return float(f"{v:.{digits}g}")


def check(name: str, ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise SystemExit(f"MISMATCH {name}: shape {ours.shape} vs {ref.shape}")
    err = float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))
    if not err <= RTOL:
        raise SystemExit(f"MISMATCH {name}: relative error {err:.3e} > {RTOL:.0e}")
    return err


# ----------------------------------------------------------------------------- PyTorch formulations
def torch_pool_lcn(be: Backend, lcn: LCN, p: int, ps: int, peps: float, blur2d: bool):
    """(B, M, H, W) -> L2 pooling -> LCN, the formulas of downpour.nn, in torch."""
    torch, F = be.torch, be.torch.nn.functional
    size, r = lcn.size, lcn.size // 2
    g1 = gaussian_1d(size, lcn.sigma)
    inv = be.t((1.0 / np.outer(_inside(g1, lcn.H), _inside(g1, lcn.W))).astype(np.float32))[None, None]
    g2 = be.t(np.outer(g1, g1).astype(np.float32))[None, None]
    gv = be.t(g1.astype(np.float32)).view(1, 1, size, 1)
    gh = be.t(g1.astype(np.float32)).view(1, 1, 1, size)

    def blur(u):
        if blur2d:
            return F.conv2d(u, g2, padding=r)
        return F.conv2d(F.conv2d(u, gv, padding=(r, 0)), gh, padding=(0, r))

    def f(z):
        h = torch.sqrt(F.avg_pool2d(z * z, p, ps) * float(p * p) + peps)
        m = blur(h.mean(dim=1, keepdim=True)) * inv
        v = h - m
        sig = torch.sqrt(torch.clamp(blur((v * v).mean(dim=1, keepdim=True)) * inv, min=0))
        c = sig.mean(dim=(2, 3), keepdim=True)
        d = torch.clamp(torch.maximum(sig, c), min=lcn.eps)
        return v / d

    return f


# ----------------------------------------------------------------------------- stage
def bench_stage(be: Backend, rng, name, C, H, W, M, k, s, pool, pool_s, lcn_size, B, need_dx, reps, warmup):
    xp = be.xp
    f = LocalFilter((C, H, W), M, k, s, xp=xp)
    pl = Pool(f.out_shape, pool, pool_s, "l2", 1e-2, xp=xp)
    ln = LCN(pl.out_shape, lcn_size, 0.0, 1e-4, xp=xp)
    L, K, Ho, Wo, Hp, Wp = f.L, f.K, f.Ho, f.Wo, pl.Ho, pl.Wo
    x = rng.standard_normal((H, W, C, B)).astype(np.float32)
    w = (rng.standard_normal(f.weight_shape) * (1 / np.sqrt(K))).astype(np.float32)
    g = rng.standard_normal((Hp, Wp, M, B)).astype(np.float32)
    X, Wd, G = xp.asarray(x), xp.asarray(w), xp.asarray(g)

    def ours():
        z, fc = f.forward(Wd, X)
        h, pc = pl.forward(z)
        y, lc = ln.forward(h)
        dz = pl.backward(pc, ln.backward(lc, G))
        dx, dw = f.backward(Wd, fc, dz, need_dx=need_dx)
        return y, dx, dw

    y, dx, dw = (None if a is None else be.host(a) for a in ours())
    flops = (3 if need_dx else 2) * 2 * L * M * K * B + 3 * B * (pl.flops() + ln.flops())
    nbytes = 4 * (
        L * M * K * ((2 if need_dx else 1) + 1)
        + H * W * C * B * (2 if need_dx else 1)
        + 2 * Ho * Wo * M * B
        + 2 * Hp * Wp * M * B
    )
    row = {
        "workload": "stage",
        "shape": name,
        "B": B,
        "need_dx": need_dx,
        "L": L,
        "M": M,
        "K": K,
        "flops": flops,
        "min_bytes": nbytes,
        "impls": {},
    }
    fns, names = [ours], ["ours"]
    errs = []
    if be.torch is not None:
        torch = be.torch
        gt = be.t(g.transpose(3, 2, 0, 1))  # (B, M, Hp, Wp)
        variants = []
        # A: our layout, (L, K, B) patch stack + bmm
        xh, wh = be.t(x, need_dx), be.t(w, True)
        for blur2d in (False, True):
            pf = torch_pool_lcn(be, ln, pool, pool_s, 1e-2, blur2d)

            def run_a(pf=pf):
                xh.grad = wh.grad = None
                P = xh.unfold(0, k, s).unfold(1, k, s).permute(0, 1, 4, 5, 2, 3).reshape(L, K, B)
                z = torch.bmm(wh, P).reshape(Ho, Wo, M, B).permute(3, 2, 0, 1)
                yt = pf(z)
                yt.backward(gt)
                return yt, xh.grad, wh.grad

            variants.append(
                (
                    f"torch (L,K,B) unfold+bmm, {'2-D' if blur2d else 'separable'} blur",
                    run_a,
                    lambda a: a.transpose(2, 3, 1, 0),
                    lambda a: a,
                    lambda a: a,
                )
            )
        # B: NCHW, unfold + einsum; weight (Ho, Wo, M, C, kh, kw)
        xn = be.t(x.transpose(3, 2, 0, 1), need_dx)
        wn = be.t(w.reshape(Ho, Wo, M, k, k, C).transpose(0, 1, 2, 5, 3, 4), True)
        pf = torch_pool_lcn(be, ln, pool, pool_s, 1e-2, False)

        def run_b():
            xn.grad = wn.grad = None
            xu = xn.unfold(2, k, s).unfold(3, k, s)
            yt = pf(torch.einsum("bchwyx,hwmcyx->bmhw", xu, wn))
            yt.backward(gt)
            return yt, xn.grad, wn.grad

        variants.append(
            (
                "torch NCHW unfold+einsum, separable blur",
                run_b,
                lambda a: a.transpose(2, 3, 1, 0),
                lambda a: a.transpose(2, 3, 1, 0),
                lambda a: a.transpose(0, 1, 2, 4, 5, 3).reshape(L, M, K),
            )
        )
        for vname, run, ty, tx, tw in variants:
            yt, gx, gw = run()
            errs.append(check(f"{name} y ({vname})", y, ty(yt.detach().cpu().numpy())))
            errs.append(check(f"{name} dW ({vname})", dw, tw(gw.cpu().numpy())))
            if need_dx:
                errs.append(check(f"{name} dx ({vname})", dx, tx(gx.cpu().numpy())))
            fns.append(run)
            names.append(vname)
            del yt, gx, gw
    times = interleaved_ms(be, fns, reps, warmup)
    for n, t in zip(names, times):
        row["impls"][n] = {"ms": sig(t), "tflops": sig(flops / t / 1e9)}
    row["max_rel_err"] = max(errs) if errs else None
    if len(times) > 1:
        best = min(range(1, len(times)), key=lambda i: times[i])
        row["torch_best"] = names[best]
        row["speedup_vs_torch"] = round(times[best] / times[0], 3)
    return row


# ----------------------------------------------------------------------------- TICA reconstruction
def bench_tica_rec(be: Backend, rng, reps, warmup):
    xp = be.xp
    B, C, H, W, k, s, M = 32, 3, 64, 64, 12, 2, 8
    f = LocalFilter((C, H, W), M, k, s, xp=xp)
    L, K = f.L, f.K
    x = rng.standard_normal((H, W, C, B)).astype(np.float32)
    w1 = (rng.standard_normal(f.weight_shape) * 0.05).astype(np.float32)
    w2 = (rng.standard_normal(f.decoder_shape) * 0.05).astype(np.float32)
    X, W1, W2 = xp.asarray(x), xp.asarray(w1), xp.asarray(w2)

    def ours():
        z, ctx = f.forward(W1, X)
        err = f.decode(W2, z) - X
        loss = float(xp.vdot(err.ravel(), err.ravel())) / B
        dz, dw2 = f.decode_backward(W2, z, err * np.float32(2.0 / B))
        _, dw1 = f.backward(W1, ctx, dz, need_dx=False)
        return loss, dw1, dw2

    loss, dw1, dw2 = ours()
    flops = 5 * 2 * L * M * K * B  # forward, decode, decode_backward (2 products), dW1
    row = {
        "workload": "tica_rec",
        "shape": "cpu-benchmark",
        "B": B,
        "L": L,
        "M": M,
        "K": K,
        "flops": flops,
        "min_bytes": 4 * (L * M * K * 5 + 3 * H * W * C * B),
        "impls": {},
    }
    fns, names, errs = [ours], ["ours"], []
    if be.torch is not None:
        torch, F = be.torch, be.torch.nn.functional
        xh, xn = be.t(x), be.t(x.transpose(3, 2, 0, 1))
        w1h, w2h = be.t(w1, True), be.t(w2, True)

        def run():
            w1h.grad = w2h.grad = None
            P = xh.unfold(0, k, s).unfold(1, k, s).permute(0, 1, 4, 5, 2, 3).reshape(L, K, B)
            R = torch.bmm(w2h, torch.bmm(w1h, P))
            cols = R.reshape(L, k, k, C, B).permute(4, 3, 1, 2, 0).reshape(B, C * k * k, L)
            lt = ((F.fold(cols, (H, W), k, stride=s) - xn) ** 2).sum() / B
            lt.backward()
            return lt

        lt = run()
        errs = [
            check("tica_rec loss", loss, lt.item()),
            check("tica_rec dW1", be.host(dw1), w1h.grad.cpu().numpy()),
            check("tica_rec dW2", be.host(dw2), w2h.grad.cpu().numpy()),
        ]
        fns.append(run)
        names.append("torch (L,K,B) bmm+fold")
    times = interleaved_ms(be, fns, reps, warmup)
    for n, t in zip(names, times):
        row["impls"][n] = {"ms": sig(t), "tflops": sig(flops / t / 1e9)}
    row["max_rel_err"] = max(errs) if errs else None
    if len(times) > 1:
        row["torch_best"] = names[1]
        row["speedup_vs_torch"] = round(times[1] / times[0], 3)
    return row


# ----------------------------------------------------------------------------- roofline
def roofline(be: Backend, n: int, copy_bytes: int):
    xp = be.xp
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    c = xp.empty_like(a)
    t_gemm = interleaved_ms(be, [lambda: xp.matmul(a, a, out=c)], 5, 2)[0]
    src = xp.ones(copy_bytes // 4, dtype=np.float32)
    dst = xp.empty_like(src)

    def copy():
        dst[...] = src

    t_copy = interleaved_ms(be, [copy], 10, 3)[0]
    return {
        "fp32_gemm_tflops": sig(2 * n**3 / t_gemm / 1e9),
        "gemm_n": n,
        "copy_gb_per_s": sig(2 * copy_bytes / t_copy / 1e6),
        "copy_bytes": copy_bytes,
    }


def with_roofline(row: dict, roof: dict) -> dict:
    ai = row["flops"] / row["min_bytes"]
    attainable = min(roof["fp32_gemm_tflops"], ai * roof["copy_gb_per_s"] / 1e3)
    ours = row["impls"]["ours"]["tflops"]
    row["arithmetic_intensity"] = sig(ai)
    row["roofline_tflops"] = sig(attainable)
    row["ours_fraction_of_roofline"] = sig(ours / attainable, 3)
    return row


# ----------------------------------------------------------------------------- le2012 training
def le2012_rate(be: Backend, spec, batches: list[int], steps: int, budget_s: float, lr=0.01, eps=1e-6):
    xp = be.xp
    net = Network(spec, xp=xp)
    shapes = net.param_shapes()
    rng = xp.random.default_rng(0) if xp is not np else np.random.default_rng(0)
    params, acc = {}, {}
    for (
        st
    ) in net.stages:  # init on the device (le2012: 1.2 billion values with tied decoders), the scales of init_params
        f = st.filter
        overlap = max(1, -(-f.k // f.s)) ** 2
        for name, scale in ((f"{st.name}.W1", 1 / np.sqrt(f.K)), (f"{st.name}.W2", 1 / np.sqrt(f.M * overlap * f.K))):
            if name not in shapes:  # a tied decoder (W2 = W1^T) has no block of its own
                continue
            n = int(np.prod(shapes[name]))
            params[name] = rng.standard_normal(n, dtype=np.float32) * np.float32(scale)
            acc[name] = xp.zeros(n, dtype=np.float32)
    nparams = sum(int(v.size) for v in params.values())
    conns = sum(st.filter.connections for st in net.stages)
    out = {"preset_input": list(spec.input), "parameters": nparams, "encoder_connections": conns, "runs": []}
    hrng = np.random.default_rng(1)
    t_start = time.perf_counter()
    per_image = None  # seconds per image of the last batch size measured
    for B in batches:
        left = budget_s - (time.perf_counter() - t_start)
        if per_image is not None and 3 * per_image * B > left:  # warm-up, one timed step, the gradient alone
            out["runs"].append(
                {"B": B, "skipped": f"about {3 * per_image * B:.0f} s needed, {left:.0f} s of the time budget left"}
            )
            continue
        x = hrng.standard_normal((B, *spec.input)).astype(np.float32)  # host memory, like a feeder batch

        def step(x=x):  # bound now: each batch size times its own batch
            loss, grads, _ = net.tica(params, x)
            for k, g in grads.items():  # Adagrad, as a shard applies it
                a = acc[k]
                a += g * g
                params[k] -= np.float32(lr) * g / (xp.sqrt(a) + np.float32(eps))
            return loss

        try:
            step()  # warm-up: compiles kernels, sizes buffers
            be.sync()
            times, losses = [], []
            for _ in range(steps):
                t0 = time.perf_counter()
                loss = step()
                be.sync()
                times.append(time.perf_counter() - t0)
                losses.append(loss)
                if time.perf_counter() - t_start > budget_s:
                    break
            # the gradient alone, once more, for the split
            be.sync()
            t0 = time.perf_counter()
            net.tica(params, x)
            be.sync()
            grad_s = time.perf_counter() - t0
            med = float(np.median(times))
            per_image = med / B
            out["runs"].append(
                {
                    "B": B,
                    "steps": len(times),
                    "step_s": sig(med),
                    "gradient_s": sig(grad_s),
                    "images_per_second": sig(B / med),
                    "loss_first": losses[0],
                    "loss_last": losses[-1],
                    "tflops_gradient": sig(net_flops(net, B) / grad_s / 1e12),
                }
            )
        except Exception as e:  # noqa: BLE001 - out of memory at a large batch is a result too
            out["runs"].append({"B": B, "error": f"{type(e).__name__}: {e}"[:300]})
    ok = [r for r in out["runs"] if "images_per_second" in r]
    out["best_images_per_second"] = max((r["images_per_second"] for r in ok), default=None)
    return out


def net_flops(net: Network, B: int) -> int:
    """FLOPs of one TICA gradient: per filter, forward, decode, decode's two gradients, dW1, and dx above stage 1."""
    total = 0
    for i, st in enumerate(net.stages):
        total += (5 + (1 if i > 0 else 0)) * 2 * st.filter.connections * B
    return total


def device_name(be: Backend) -> str:
    if be.xp is np:
        return f"cpu ({platform.processor() or platform.machine()}, smoke run)"
    from downpour import device as devices

    return devices.describe(be.xp)


def write(path: str, result: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--le2012-batches", default="32,128", help="batch sizes for le2012's training rate")
    ap.add_argument("--le2012-steps", type=int, default=4)
    ap.add_argument("--le2012-budget", type=float, default=150.0, help="seconds at most for the le2012 runs")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="no GPU: NumPy in place of CuPy, small shapes, tiny in place of le2012 (checks the script)",
    )
    ap.add_argument("--no-torch", action="store_true", help="ours only (no PyTorch installed)")
    args = ap.parse_args(argv)
    be = Backend(args.smoke, not args.no_torch)
    rng = np.random.default_rng(0)
    result = {
        "device": device_name(be),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "smoke": args.smoke,
        "targets": TARGETS,
    }
    if be.xp is not np:
        result["cupy"] = be.xp.__version__
        result["cuda_runtime"] = be.xp.cuda.runtime.runtimeGetVersion()
        result["cuda_driver"] = be.xp.cuda.runtime.driverGetVersion()
    if be.torch is not None:
        result["torch"] = be.torch.__version__
    print(f"device: {result['device']}", flush=True)
    roof = roofline(be, 1024 if args.smoke else 8192, (64 << 20) if args.smoke else (4 << 30))
    result["roofline"] = roof
    print(f"roofline: {roof}", flush=True)
    if args.smoke:
        shapes = [("cpu-benchmark (smoke: 3x24x24)", 3, 24, 24, 8, 12, 2, 3, 1, 5, 4, True)]
    else:
        shapes = [
            ("cpu-benchmark", 3, 64, 64, 8, 12, 2, 3, 1, 5, 32, True),
            ("le2012 stage1", 3, 200, 200, 8, 18, 1, 5, 1, 5, 32, False),
            ("le2012 stage2", 8, 179, 179, 8, 18, 1, 5, 1, 5, 32, True),
            ("le2012 stage3", 8, 158, 158, 8, 18, 1, 5, 1, 5, 32, True),
        ]
    rows = []
    for sh in shapes:
        row = with_roofline(bench_stage(be, rng, *sh, reps=args.reps, warmup=args.warmup), roof)
        rows.append(row)
        print(json.dumps(row), flush=True)
    row = with_roofline(bench_tica_rec(be, rng, args.reps, args.warmup), roof)
    rows.append(row)
    print(json.dumps(row), flush=True)
    result["workloads"] = rows
    write(args.out, result)  # what is measured so far survives a timeout of what follows
    be.free()  # give the cached memory of both libraries back before le2012's 30 GB of parameters and state
    spec = presets.get("tiny" if args.smoke else "le2012")
    batches = [int(b) for b in args.le2012_batches.split(",") if b]
    result["le2012" if not args.smoke else "tiny"] = le2012_rate(
        be, spec, batches, args.le2012_steps, args.le2012_budget
    )
    print(json.dumps(result.get("le2012", result.get("tiny"))), flush=True)
    stage_ratios = [r["speedup_vs_torch"] for r in rows if r["workload"] == "stage" and "speedup_vs_torch" in r]
    rate = result.get("le2012", {}).get("best_images_per_second")
    result["met"] = {
        "stage_speedup_vs_torch": (min(stage_ratios) >= TARGETS["stage_speedup_vs_torch"]) if stage_ratios else None,
        "le2012_images_per_second": (rate >= TARGETS["le2012_images_per_second"]) if rate else None,
    }
    write(args.out, result)
    print(
        json.dumps(
            {
                "device": result["device"],
                "stage_speedups": stage_ratios,
                "le2012_images_per_second": rate,
                "met": result["met"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
