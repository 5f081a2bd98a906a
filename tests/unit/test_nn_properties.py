"""Property tests: random shapes, fields, strides, pool sizes, channels and batch sizes.

Each layer's forward must match the naive loops, and its backward must agree
with a central-difference directional derivative (inputs and weights moved
together along a random direction).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from downpour.nn import LCN, FilterSpec, LCNSpec, LocalFilter, Network, NetworkSpec, Pool, PoolSpec, StageSpec
from downpour.nn.spec import CONSTRAINTS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_nn_naive import (
    fd_directional,
    naive_decode,
    naive_filter,
    naive_lcn_parts,
    naive_pool,
    naive_tica_loss,
)

TOL = 1e-6
FAST = settings(max_examples=30, deadline=None)


def _close(analytic, numeric):
    return abs(analytic - numeric) <= TOL * max(abs(numeric), abs(analytic), 1e-8)


@st.composite
def filter_cases(draw):
    C = draw(st.integers(1, 3))
    k = draw(st.integers(1, 4))
    s = draw(st.integers(1, k + 1))  # includes strides that skip pixels and ones that do not divide
    H = draw(st.integers(k, k + 6))
    W = draw(st.integers(k, k + 6))
    M = draw(st.integers(1, 3))
    B = draw(st.integers(1, 3))
    tied = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return C, H, W, M, k, s, tied, B, seed


@FAST
@given(filter_cases())
def test_filter_forward_and_backward(case):
    C, H, W, M, k, s, tied, B, seed = case
    rng = np.random.default_rng(seed)
    layer = LocalFilter((C, H, W), M, k, s, tied)
    w = rng.normal(size=layer.weight_shape)
    x = rng.normal(size=(H, W, C, B))
    y, P = layer.forward(w, x)
    np.testing.assert_allclose(y, naive_filter(w, x, k, s, tied), rtol=1e-11, atol=1e-11)
    R = rng.normal(size=y.shape)
    dx, dw = layer.backward(w, P, R)
    dir_x, dir_w = rng.normal(size=x.shape), rng.normal(size=w.shape)
    num = fd_directional(lambda: float(np.sum(layer.forward(w, x)[0] * R)), [x, w], [dir_x, dir_w])
    assert _close(float(np.sum(dx * dir_x) + np.sum(dw * dir_w)), num)


@FAST
@given(filter_cases())
def test_decode_forward_and_backward(case):
    C, H, W, M, k, s, tied, B, seed = case
    rng = np.random.default_rng(seed)
    layer = LocalFilter((C, H, W), M, k, s, tied)
    w2 = rng.normal(size=layer.decoder_shape)
    z = rng.normal(size=(layer.Ho, layer.Wo, M, B))
    r = layer.decode(w2, z)
    np.testing.assert_allclose(r, naive_decode(w2, z, (C, H, W), k, s, tied), rtol=1e-11, atol=1e-11)
    R = rng.normal(size=r.shape)
    dz, dw2 = layer.decode_backward(w2, z, R)
    dir_z, dir_w = rng.normal(size=z.shape), rng.normal(size=w2.shape)
    num = fd_directional(lambda: float(np.sum(layer.decode(w2, z) * R)), [z, w2], [dir_z, dir_w])
    assert _close(float(np.sum(dz * dir_z) + np.sum(dw2 * dir_w)), num)


@FAST
@given(
    C=st.integers(1, 3),
    p=st.integers(1, 4),
    extra_h=st.integers(0, 5),
    extra_w=st.integers(0, 5),
    stride_extra=st.integers(0, 4),
    B=st.integers(1, 3),
    kind=st.sampled_from(["l2", "max", "avg"]),
    eps=st.sampled_from([1e-3, 1e-2, 0.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_pool_forward_and_backward(C, p, extra_h, extra_w, stride_extra, B, kind, eps, seed):
    s = 1 + stride_extra % p  # 1..p, as a spec allows
    H, W = p + extra_h, p + extra_w
    rng = np.random.default_rng(seed)
    if kind == "max":  # distinct values, gaps far larger than the FD step
        n = H * W * C * B
        x = rng.permutation((np.arange(n) - n / 2) * 1e-2 + rng.uniform(-2e-3, 2e-3, n)).reshape(H, W, C, B)
    else:
        x = rng.normal(size=(H, W, C, B))
    layer = Pool((C, H, W), p, s, kind, eps)
    y, ctx = layer.forward(x)
    np.testing.assert_allclose(y, naive_pool(x, p, s, kind, eps), rtol=1e-12, atol=1e-12)
    R = rng.normal(size=y.shape)
    dx = layer.backward(ctx, R)
    d = rng.normal(size=x.shape)
    num = fd_directional(lambda: float(np.sum(layer.forward(x)[0] * R)), [x], [d], h=1e-6)
    assert _close(float(np.sum(dx * d)), num)


@FAST
@given(
    C=st.integers(1, 3),
    H=st.integers(1, 7),
    W=st.integers(1, 7),
    half=st.integers(0, 3),
    sigma=st.sampled_from([0.0, 0.6, 2.0]),
    B=st.integers(1, 3),
    scale=st.sampled_from([1e-2, 1.0, 30.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_lcn_forward_and_backward(C, H, W, half, sigma, B, scale, seed):
    n = 2 * half + 1
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(H, W, C, B)) * scale + rng.normal()
    y_ref, v, sig, c = naive_lcn_parts(x, n, sigma)
    # skip points within reach of the kinks of max(sigma, c, eps) and of sqrt at 0
    assume(sig.min() > 1e-3 * scale)
    assume(np.min(np.abs(sig - c[None, None, :])) > 1e-4 * scale)
    assume(c.min() > 1e-3)
    layer = LCN((C, H, W), n, sigma)
    y, ctx = layer.forward(x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-9, atol=1e-10)
    R = rng.normal(size=x.shape)
    dx = layer.backward(ctx, R)
    d = rng.normal(size=x.shape)
    # x carries an O(1) offset: a step below ~1e-7 drowns in rounding of x itself.
    num = fd_directional(lambda: float(np.sum(layer.forward(x)[0] * R)), [x], [d], h=max(1e-6 * scale, 1e-7))
    assert _close(float(np.sum(dx * d)), num)


@st.composite
def small_specs(draw):
    C = draw(st.integers(1, 2))
    H = draw(st.integers(5, 9))
    W = draw(st.integers(5, 9))
    k = draw(st.integers(1, 4))
    s = draw(st.integers(1, k))
    tied = draw(st.booleans())
    maps = draw(st.integers(1, 3))
    ho, wo = (H - k) // s + 1, (W - k) // s + 1
    pool = None
    if draw(st.booleans()) and min(ho, wo) >= 1:
        p = draw(st.integers(1, min(3, ho, wo)))
        pool = PoolSpec(
            size=p,
            stride=draw(st.integers(1, p)),
            kind=draw(st.sampled_from(["l2", "max", "avg"])),
            eps=draw(st.sampled_from([1e-2, 0.1])),
        )
    lcn = LCNSpec(size=draw(st.sampled_from([1, 3, 5]))) if draw(st.booleans()) else None
    lam = draw(st.sampled_from([0.0, 0.1, 0.5]))
    kinds = st.sampled_from(CONSTRAINTS)
    stage = StageSpec(
        filter=FilterSpec(maps=maps, field=k, stride=s, tied=tied), pool=pool, lcn=lcn, lam=lam, constraint=draw(kinds)
    )
    top = StageSpec(filter=FilterSpec(maps=2, field=1), pool=None, lcn=None, lam=0.1, constraint=draw(kinds))
    # joint: the gradient checked is the summed objective's
    spec = NetworkSpec(input=(C, H, W), stages=(stage, top), training="joint")
    return spec, draw(st.integers(1, 3)), draw(st.integers(0, 2**31 - 1))


@settings(max_examples=25, deadline=None)
@given(small_specs())
def test_network_tica_forward_and_directional_gradient(case):
    spec, B, seed = case
    rng = np.random.default_rng(seed)
    net = Network(spec, dtype=np.float64)
    params = net.init_params(seed % 1000)
    x = rng.normal(size=(B, *spec.input))
    loss, grads, _ = net.tica(params, x)
    assert abs(loss - naive_tica_loss(spec, params, x)) <= 1e-10 * max(1.0, abs(loss))
    names = sorted(params)
    dirs = [rng.normal(size=params[k].shape) for k in names]
    analytic = sum(float(np.dot(grads[k], d)) for k, d in zip(names, dirs))
    num = fd_directional(lambda: net.tica(params, x)[0], [params[k] for k in names], dirs, h=1e-6)
    # max pooling or LCN can put a kink within reach of the step on rare draws: those are
    # the only places where the two may disagree, and then by far more than rounding
    ok = _close(analytic, num)
    if not ok:
        num2 = fd_directional(lambda: net.tica(params, x)[0], [params[k] for k in names], dirs, h=1e-8)
        kinky = (spec.stages[0].pool is not None and spec.stages[0].pool.kind == "max") or spec.stages[0].lcn
        assert kinky and abs(num2 - num) > 1e-7 * max(1.0, abs(num)), (analytic, num, num2)
