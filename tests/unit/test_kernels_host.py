"""downpour.kernels on the host: the CUDA source built as C++, against downpour.nn's NumPy code.

No GPU is needed: ``kernel_host`` compiles the kernels' source with a host
prelude and runs every thread of a small grid in turn. The layers' GPU
classes then run with NumPy arrays and these host kernels, so what is checked
here is the kernels' index arithmetic and the GPU code around them (row
blocks, GEMMs, transposes, kernel arguments), against the NumPy layers (each
kernel's reference) in float64 to rounding and in float32. What CuPy itself
does on a device is for tests/unit/test_kernels_gpu.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from downpour import kernels
from downpour.kernels import filtering as kfiltering
from downpour.nn import LCN, LocalFilter, Network, Pool, col2im, im2col, presets
from downpour.nn.spec import from_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_host

pytestmark = pytest.mark.skipif(kernel_host.compiler() is None, reason="no C++ compiler (g++ or clang++) on PATH")

TOL = {np.float64: 1e-12, np.float32: 2e-5}


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    d = tmp_path_factory.mktemp("kernels")
    return {dt: kernel_host.HostLauncher(kernel_host.build(d, dt), dt) for dt in (np.float64, np.float32)}


def close(a, b, dtype):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]:.0e}"


def gpu_filter(f, host):
    f.accel = kernels.LocalFilterKernels(f, launcher=lambda dt: host[np.dtype(dt).type])
    return f


GEOMETRIES = [  # (C, H, W, maps, field, stride, tied, B)
    (1, 9, 9, 3, 3, 1, False, 2),
    (3, 11, 10, 4, 4, 2, False, 3),
    (2, 12, 13, 2, 5, 3, False, 1),  # stride does not divide the field or the input
    (3, 8, 8, 2, 2, 4, False, 2),  # stride larger than the field: some pixels in no patch
    (2, 10, 9, 3, 4, 1, True, 2),  # tied: a convolution
    (1, 16, 16, 4, 5, 1, False, 4),  # tiny's first stage
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("chunk", ["one block", "row blocks"])
def test_local_filter_kernels_match_numpy(host, geom, dtype, chunk, monkeypatch):
    C, H, W, M, k, s, tied, B = geom
    if chunk == "row blocks":  # a few rows per block: offsets i0 > 0, sums across blocks
        monkeypatch.setattr(kfiltering, "CHUNK_BYTES", 1)
    rng = np.random.default_rng(7)
    ref = LocalFilter((C, H, W), M, k, s, tied)
    gpu = gpu_filter(LocalFilter((C, H, W), M, k, s, tied), host)
    x = rng.standard_normal((H, W, C, B)).astype(dtype)
    w1 = rng.standard_normal(ref.weight_shape).astype(dtype).ravel()
    w2 = rng.standard_normal(ref.decoder_shape).astype(dtype).ravel()
    dy = rng.standard_normal((ref.Ho, ref.Wo, M, B)).astype(dtype)
    dr = rng.standard_normal((H, W, C, B)).astype(dtype)
    host[dtype].calls.clear()

    y_ref, ctx_ref = ref.forward(w1, x)
    y, ctx = gpu.forward(w1, x)
    close(y, y_ref, dtype)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    dx_ref, dw_ref = ref.backward(w1, ctx_ref, dy)
    dx, dw = gpu.backward(w1, ctx, dy)
    close(dx, dx_ref, dtype)
    close(dw, dw_ref, dtype)
    none, dw_only = gpu.backward(w1, ctx, dy, need_dx=False)
    assert none is None
    close(dw_only, dw_ref, dtype)
    close(gpu.decode(w2, dy), ref.decode(w2, dy), dtype)
    dz_ref, dw2_ref = ref.decode_backward(w2, dy, dr)
    dz, dw2 = gpu.decode_backward(w2, dy, dr)
    close(dz, dz_ref, dtype)
    close(dw2, dw2_ref, dtype)
    # the kernels ran (the GPU path, not a fallback), and in row blocks when asked
    calls = host[dtype].calls
    assert {"im2col", "col2im_add"} <= set(calls)
    nblocks = -(-ref.Ho // gpu.accel._rows(B, np.dtype(dtype).itemsize))
    assert nblocks == (1 if chunk == "one block" else ref.Ho)
    assert calls.count("im2col") == 4 * nblocks  # forward, backward x2, decode_backward


def test_im2col_and_col2im_kernels_match_the_numpy_ones(host):
    rng = np.random.default_rng(1)
    H, W, C, B, k, s = 13, 11, 3, 2, 4, 3
    x = rng.standard_normal((H, W, C, B))
    Ho, Wo = (H - k) // s + 1, (W - k) // s + 1
    launch = host[np.float64]
    P = np.full((Ho * Wo, k * k * C, B), np.nan)
    launch("im2col", P.size, x, P, W, C, B, Wo, k, s, 0, P.size)
    np.testing.assert_array_equal(P, im2col(np, x, k, s))
    # one block of rows in the middle, scattered back on top of existing values
    cols = rng.standard_normal((Ho * Wo, k * k * C, B))
    out = rng.standard_normal((H, W, C, B))
    expect = out + col2im(np, cols, (H, W, C, B), k, s)
    for i0 in range(Ho):  # row by row: each call adds only its row's patches
        h0 = i0 * s
        n = ((i0 * s + k) - h0) * W * C * B
        launch(
            "col2im_add",
            n,
            np.ascontiguousarray(cols[i0 * Wo : (i0 + 1) * Wo]),
            out,
            W,
            C,
            B,
            Wo,
            k,
            s,
            i0,
            i0 + 1,
            h0,
            n,
        )
    np.testing.assert_allclose(out, expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("geom", [(3, 9, 9, 3, 1, 2), (2, 11, 10, 3, 2, 3), (1, 12, 12, 5, 3, 2), (4, 7, 8, 2, 3, 1)])
def test_l2pool_kernels_match_numpy(host, geom, dtype):
    C, H, W, p, s, B = geom
    rng = np.random.default_rng(3)
    ref = Pool((C, H, W), p, s, "l2", eps=1e-2)
    gpu = Pool((C, H, W), p, s, "l2", eps=1e-2)
    gpu.accel = kernels.L2PoolKernels(gpu, launcher=lambda dt: host[np.dtype(dt).type])
    x = rng.standard_normal((H, W, C, B)).astype(dtype)
    dy = rng.standard_normal((ref.Ho, ref.Wo, C, B)).astype(dtype)
    y_ref, c_ref = ref.forward(x)
    y, c = gpu.forward(x)
    close(y, y_ref, dtype)
    close(gpu.backward(c, dy), ref.backward(c_ref, dy), dtype)


def test_l2pool_kernels_refuse_other_kinds():
    with pytest.raises(ValueError, match="L2 pooling"):
        kernels.L2PoolKernels(Pool((1, 4, 4), 2, 1, "max"))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("geom", [(3, 9, 10, 5, 2), (1, 6, 7, 3, 3), (2, 4, 5, 7, 1), (2, 5, 5, 1, 2)])
def test_lcn_blur_kernels_match_numpy(host, geom, dtype):
    C, H, W, size, B = geom  # size 7 on a 4x5 map: taps past both borders at once
    rng = np.random.default_rng(5)
    ref = LCN((C, H, W), size)
    gpu = LCN((C, H, W), size)
    gpu.accel = kernels.LCNKernels(gpu, launcher=lambda dt: host[np.dtype(dt).type])
    u = rng.standard_normal((H, W, B)).astype(dtype)
    close(gpu._blur(u), ref._blur(u), dtype)
    x = rng.standard_normal((H, W, C, B)).astype(dtype)
    dy = rng.standard_normal((H, W, C, B)).astype(dtype)
    y_ref, c_ref = ref.forward(x)
    y, c = gpu.forward(x)
    close(y, y_ref, dtype)
    close(gpu.backward(c, dy), ref.backward(c_ref, dy), dtype)


def accelerate(net: Network, host) -> Network:
    """Every layer of ``net`` on the GPU classes with host kernels."""
    pick = lambda dt: host[np.dtype(dt).type]
    for st in net.stages:
        if st.filter is not None:
            st.filter.accel = kernels.LocalFilterKernels(st.filter, launcher=pick)
        for pool in {id(p): p for p in (st.pool, st.sparsity_pool) if p is not None}.values():
            if pool.kind == "l2":
                pool.accel = kernels.L2PoolKernels(pool, launcher=pick)
        if st.lcn is not None:
            st.lcn.accel = kernels.LCNKernels(st.lcn, launcher=pick)
    return net


MIXED = {
    "input": [2, 14, 13],
    "classes": 3,
    "stages": [
        {
            "filter": {"maps": 3, "field": 4, "stride": 2},
            "pool": {"size": 2, "stride": 1, "kind": "l2"},
            "lcn": {"size": 3},
            "lam": 0.1,
        },
        {
            "filter": {"maps": 2, "field": 2, "stride": 1, "tied": True},
            "pool": {"size": 2, "kind": "max"},
            "lcn": None,
            "lam": 0.2,
        },
    ],
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("which", ["tiny", "mixed"])
def test_network_tica_and_supervised_steps_match_numpy(host, which, dtype):
    spec = presets.get("tiny") if which == "tiny" else from_dict(MIXED)
    ref = Network(spec, dtype=dtype)
    gpu = accelerate(Network(spec, dtype=dtype), host)
    params = ref.init_params(seed=4)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, *spec.input)).astype(dtype)
    loss_ref, g_ref, _ = ref.tica(params, x)
    loss, g, _ = gpu.tica(params, x)
    assert abs(loss - loss_ref) <= TOL[dtype] * abs(loss_ref) * 10
    assert set(g) == set(g_ref)
    for k in g_ref:
        close(g[k], g_ref[k], dtype)
    if spec.classes:
        y = rng.integers(0, spec.classes, 5)
        loss_ref, g_ref, _ = ref.supervised(params, x, y)
        loss, g, _ = gpu.supervised(params, x, y)
        assert abs(loss - loss_ref) <= TOL[dtype] * abs(loss_ref) * 10
        for k in g_ref:
            close(g[k], g_ref[k], dtype)
    acts_ref, acts = ref.forward(params, x), gpu.forward(params, x)
    for k in acts_ref:
        close(acts[k], acts_ref[k], dtype)


def test_launcher_checks_arguments(host):
    launch = host[np.float32]
    x = np.zeros((4, 4, 1, 2), np.float32)
    out = np.zeros((9, 4, 2), np.float32)
    args = (x, out, 4, 1, 2, 3, 2, 1, 0, out.size)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        launch("im2col", out.size, x.astype(np.float64), *args[1:])
    with pytest.raises(ValueError, match="not contiguous"):
        launch("im2col", out.size, np.zeros((4, 4, 1, 4), np.float32)[..., ::2], *args[1:])
    with pytest.raises(TypeError, match="takes 10 arguments"):
        launch("im2col", out.size, *args[:-1])
    with pytest.raises(OverflowError, match="W=4294967296 does not fit int32"):
        launch("im2col", out.size, x, out, 2**32, *args[3:])
    with pytest.raises(KeyError, match="no kernel 'nope'"):
        launch("nope", 1)
    launch("im2col", out.size, *args)
    np.testing.assert_array_equal(out, im2col(np, x, 2, 1))


def test_source_signatures_use_only_launchable_types():
    sig = kernels.signatures()
    assert set(sig) == {"im2col", "col2im_add", "l2pool_fwd", "l2pool_bwd", "blur_axis"}
    with pytest.raises(ValueError, match="parameter type 'float' is not one of"):
        kernels.signatures('extern "C" __global__ void f(float a) {')


def test_kernels_import_no_grpc_no_threads_and_no_cupy():
    """downpour.kernels is math: no gRPC, no threads; CuPy only arrives with a CuPy backend."""
    import subprocess

    code = (
        "import sys, downpour.kernels, downpour.nn; "
        "bad = [m for m in ('grpc', 'downpour.rpc', 'downpour.worker', 'concurrent.futures', 'threading', 'cupy') "
        "if m in sys.modules and not (m == 'threading' and sys.modules[m].active_count() == 1)]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
