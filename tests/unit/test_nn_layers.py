"""Each downpour.nn layer against the naive loops and against central differences (float64)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from downpour.nn import LCN, LocalFilter, Pool, col2im, im2col, to_external, to_internal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_nn_naive import (
    fd_grad,
    naive_decode,
    naive_filter,
    naive_lcn,
    naive_lcn_parts,
    naive_pool,
    naive_pool_argmax,
    rel_err,
)

TOL = 1e-6  # relative error of analytic vs finite-difference gradients


def distinct(rng, shape, gap=1e-3):
    """Random values, pairwise at least ``gap`` apart (no ties for max pooling)."""
    n = int(np.prod(shape))
    vals = (np.arange(n) - n / 2) * gap * 3 + rng.uniform(-gap, gap, n)
    return rng.permutation(vals).reshape(shape)


# ------------------------------------------------------------------ layout


def test_internal_layout_roundtrip():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5)  # (B, C, H, W)
    xi = to_internal(np, x)
    assert xi.shape == (4, 5, 3, 2) and xi.flags.c_contiguous
    assert xi[1, 2, 0, 1] == x[1, 0, 1, 2]
    assert np.array_equal(to_external(np, xi), x)


def test_im2col_col2im_are_adjoint():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 6, 2, 3))
    cols = im2col(np, x, 3, 2)
    assert cols.shape == (3 * 2, 3 * 3 * 2, 3)
    c = rng.normal(size=cols.shape)
    back = col2im(np, c, x.shape, 3, 2)
    assert np.sum(cols * c) == pytest.approx(np.sum(x * back), rel=1e-12)


# ------------------------------------------------------------------ local filtering

FILTER_CASES = [
    # (C, H, W, maps, field, stride, tied, B)
    (1, 5, 5, 2, 3, 1, False, 2),
    (2, 6, 7, 3, 3, 2, False, 3),  # stride that does not divide: the last column is left out
    (3, 5, 4, 2, 2, 2, False, 1),
    (2, 6, 6, 2, 6, 1, False, 2),  # one location: the field covers the input
    (1, 4, 4, 3, 1, 1, False, 2),  # 1x1 fields
    (2, 6, 5, 3, 3, 1, True, 2),  # tied: a convolution
    (1, 7, 7, 2, 3, 3, True, 3),
]


def _filter_setup(case, seed=0):
    C, H, W, M, k, s, tied, B = case
    layer = LocalFilter((C, H, W), M, k, s, tied)
    rng = np.random.default_rng(seed)
    w = rng.normal(size=layer.weight_shape)
    x = rng.normal(size=(H, W, C, B))
    return layer, w, x, rng


@pytest.mark.parametrize("case", FILTER_CASES)
def test_filter_shapes_and_counts(case):
    C, H, W, M, k, s, tied, B = case
    layer = LocalFilter((C, H, W), M, k, s, tied)
    Ho, Wo = (H - k) // s + 1, (W - k) // s + 1
    assert layer.out_shape == (M, Ho, Wo)
    assert layer.weight_shape == (1 if tied else Ho * Wo, M, k * k * C)
    assert layer.decoder_shape == (1 if tied else Ho * Wo, k * k * C, M)
    assert layer.connections == Ho * Wo * M * k * k * C


@pytest.mark.parametrize("case", FILTER_CASES)
def test_filter_forward_matches_naive(case):
    layer, w, x, _ = _filter_setup(case)
    C, H, W, M, k, s, tied, B = case
    y, _ = layer.forward(w, x)
    assert y.shape == (layer.Ho, layer.Wo, M, B)
    np.testing.assert_allclose(y, naive_filter(w, x, k, s, tied), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", FILTER_CASES)
def test_filter_backward_matches_finite_differences(case):
    layer, w, x, rng = _filter_setup(case)
    R = rng.normal(size=(layer.Ho, layer.Wo, layer.M, x.shape[3]))
    f = lambda: float(np.sum(layer.forward(w, x)[0] * R))
    _, P = layer.forward(w, x)
    dx, dw = layer.backward(w, P, R)
    assert dx.shape == x.shape and dw.shape == w.shape
    assert rel_err(dw, fd_grad(f, w)) < TOL
    assert rel_err(dx, fd_grad(f, x)) < TOL
    # without dx, dW is unchanged
    _, P = layer.forward(w, x)
    dx2, dw2 = layer.backward(w, P, R, need_dx=False)
    assert dx2 is None and np.allclose(dw2, dw, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("case", FILTER_CASES)
def test_decode_matches_naive(case):
    layer, _, _, rng = _filter_setup(case)
    C, H, W, M, k, s, tied, B = case
    w2 = rng.normal(size=layer.decoder_shape)
    z = rng.normal(size=(layer.Ho, layer.Wo, M, B))
    r = layer.decode(w2, z)
    assert r.shape == (H, W, C, B)
    np.testing.assert_allclose(r, naive_decode(w2, z, (C, H, W), k, s, tied), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", FILTER_CASES)
def test_decode_backward_matches_finite_differences(case):
    layer, _, _, rng = _filter_setup(case)
    C, H, W, M, k, s, tied, B = case
    w2 = rng.normal(size=layer.decoder_shape)
    z = rng.normal(size=(layer.Ho, layer.Wo, M, B))
    R = rng.normal(size=(H, W, C, B))
    f = lambda: float(np.sum(layer.decode(w2, z) * R))
    dz, dw2 = layer.decode_backward(w2, z, R)
    assert dz.shape == z.shape and dw2.shape == w2.shape
    assert rel_err(dw2, fd_grad(f, w2)) < TOL
    assert rel_err(dz, fd_grad(f, z)) < TOL


def test_tied_filter_equals_untied_with_copied_weights():
    case = (2, 6, 5, 3, 3, 1, True, 2)
    layer, w, x, rng = _filter_setup(case)
    untied = LocalFilter((2, 6, 5), 3, 3, 1, tied=False)
    wu = np.repeat(w, untied.L, axis=0)
    np.testing.assert_allclose(layer.forward(w, x)[0], untied.forward(wu, x)[0], rtol=1e-12, atol=1e-12)
    R = rng.normal(size=(layer.Ho, layer.Wo, 3, 2))
    _, P = layer.forward(w, x)
    _, dw = layer.backward(w, P, R)
    _, Pu = untied.forward(wu, x)
    _, dwu = untied.backward(wu, Pu, R)
    np.testing.assert_allclose(dw[0], dwu.sum(axis=0), rtol=1e-12, atol=1e-12)


def test_filter_output_is_not_the_scratch_buffer():
    # Only P is documented as scratch reused by the next forward; y must survive that call.
    layer, w, x, rng = _filter_setup((2, 6, 6, 2, 3, 1, False, 2))
    y1, _ = layer.forward(w, x)
    keep = y1.copy()
    layer.forward(w, rng.normal(size=x.shape))
    assert np.array_equal(y1, keep)


def test_filter_rejects_bad_geometry_and_input():
    with pytest.raises(ValueError, match="field"):
        LocalFilter((1, 4, 4), 2, 5)
    with pytest.raises(ValueError, match="stride"):
        LocalFilter((1, 4, 4), 2, 3, stride=0)
    layer = LocalFilter((2, 5, 5), 2, 3)
    with pytest.raises(ValueError, match="does not match"):
        layer.forward(np.zeros(layer.weight_shape), np.zeros((5, 5, 3, 1)))


# ------------------------------------------------------------------ pooling

POOL_CASES = [
    # (C, H, W, size, stride, B)
    (1, 5, 5, 2, 1, 2),
    (2, 6, 7, 3, 2, 2),  # stride that does not divide
    (3, 4, 4, 2, 2, 1),  # non-overlapping
    (2, 5, 6, 1, 1, 2),
    (1, 5, 5, 5, 1, 3),  # one window over everything
]


@pytest.mark.parametrize("kind", ["l2", "max", "avg"])
@pytest.mark.parametrize("case", POOL_CASES)
def test_pool_forward_matches_naive(kind, case):
    C, H, W, p, s, B = case
    rng = np.random.default_rng(2)
    x = distinct(rng, (H, W, C, B), gap=1e-2) if kind == "max" else rng.normal(size=(H, W, C, B))
    layer = Pool((C, H, W), p, s, kind, eps=0.05)
    y, _ = layer.forward(x)
    assert layer.out_shape == (C, (H - p) // s + 1, (W - p) // s + 1)
    np.testing.assert_allclose(y, naive_pool(x, p, s, kind, eps=0.05), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["l2", "max", "avg"])
@pytest.mark.parametrize("case", POOL_CASES)
def test_pool_backward_matches_finite_differences(kind, case):
    C, H, W, p, s, B = case
    rng = np.random.default_rng(3)
    # max: values at least 1e-3 apart, so a step of 1e-5 never changes the winner
    x = distinct(rng, (H, W, C, B)) if kind == "max" else rng.normal(size=(H, W, C, B))
    layer = Pool((C, H, W), p, s, kind, eps=0.01)
    R = rng.normal(size=(layer.Ho, layer.Wo, C, B))
    f = lambda: float(np.sum(layer.forward(x)[0] * R))
    _, ctx = layer.forward(x)
    dx = layer.backward(ctx, R)
    assert dx.shape == x.shape
    assert rel_err(dx, fd_grad(f, x)) < TOL


def test_max_pool_ties_go_to_the_first_maximum():
    x = np.zeros((3, 3, 1, 1))
    x[0, 1] = x[1, 0] = x[1, 1] = 2.0  # three tied maxima in window (0, 0)
    layer = Pool((1, 3, 3), 2, 1, "max")
    y, ctx = layer.forward(x)
    assert y[0, 0, 0, 0] == 2.0
    dy = np.zeros_like(y)
    dy[0, 0, 0, 0] = 1.0
    dx = layer.backward(ctx, dy)
    assert naive_pool_argmax(x, 2, 1)[(0, 0, 0, 0)] == (0, 1)
    expect = np.zeros_like(x)
    expect[0, 1] = 1.0
    assert np.array_equal(dx, expect)


def test_max_pool_routes_to_argmax_of_every_window():
    rng = np.random.default_rng(4)
    x = distinct(rng, (6, 7, 2, 2))
    layer = Pool((2, 6, 7), 3, 2, "max")
    y, ctx = layer.forward(x)
    R = rng.normal(size=y.shape)
    dx = layer.backward(ctx, R)
    expect = np.zeros_like(x)
    for (i, j, c, b), (r, q) in naive_pool_argmax(x, 3, 2).items():
        expect[r, q, c, b] += R[i, j, c, b]
    np.testing.assert_allclose(dx, expect, rtol=1e-14, atol=0)


def test_l2_pool_is_smooth_at_zero():
    layer = Pool((1, 3, 3), 2, 1, "l2", eps=0.01)
    x = np.zeros((3, 3, 1, 2))
    y, ctx = layer.forward(x)
    np.testing.assert_allclose(y, 0.1)
    dx = layer.backward(ctx, np.ones_like(y))
    assert np.array_equal(dx, np.zeros_like(x))


def test_pool_rejects_bad_settings():
    with pytest.raises(ValueError, match="kind"):
        Pool((1, 4, 4), 2, 1, "median")
    with pytest.raises(ValueError, match="size"):
        Pool((1, 4, 4), 5)
    with pytest.raises(ValueError, match="stride"):
        Pool((1, 4, 4), 2, 0)


# ------------------------------------------------------------------ local contrast normalisation

LCN_CASES = [
    # (C, H, W, size, sigma, B)
    (1, 6, 6, 3, 0.0, 2),
    (3, 5, 7, 5, 0.0, 2),  # window wider than the border: renormalisation everywhere
    (2, 4, 5, 5, 1.7, 1),
    (2, 3, 3, 7, 0.0, 2),  # window larger than the whole map
    (3, 4, 4, 1, 0.0, 2),  # one pixel: mean and std over maps only
]


def kink_margin(x, size, sigma, eps):
    """Smallest relative distance between sigma and c (the kink of max(sigma, c))."""
    _, _, sig, c = naive_lcn_parts(x, size, sigma, eps)
    return float(np.min(np.abs(sig - c[None, None, :]) / c[None, None, :]))


@pytest.mark.parametrize("case", LCN_CASES)
def test_lcn_forward_matches_naive(case):
    C, H, W, n, sigma, B = case
    rng = np.random.default_rng(5)
    x = rng.normal(size=(H, W, C, B)) * 2 + 1
    layer = LCN((C, H, W), n, sigma)
    y, _ = layer.forward(x)
    assert layer.out_shape == (C, H, W)
    np.testing.assert_allclose(y, naive_lcn(x, n, sigma), rtol=1e-10, atol=1e-12)


def _lcn_fd(layer, x, rng):
    R = rng.normal(size=x.shape)
    f = lambda: float(np.sum(layer.forward(x)[0] * R))
    _, ctx = layer.forward(x)
    dx = layer.backward(ctx, R)
    assert dx.shape == x.shape
    return rel_err(dx, fd_grad(f, x, h=1e-6))


@pytest.mark.parametrize("case", LCN_CASES)
def test_lcn_backward_matches_finite_differences(case):
    C, H, W, n, sigma, B = case
    rng = np.random.default_rng(6)
    x = rng.normal(size=(H, W, C, B))
    assert kink_margin(x, n, sigma, 1e-4) > 1e-4  # steps of 1e-6 never cross max(sigma, c)
    assert _lcn_fd(LCN((C, H, W), n, sigma), x, rng) < TOL


def test_lcn_both_regimes():
    """A textured half (sigma > c: divide by sigma) and a nearly flat half (c wins)."""
    C, H, W, B = 2, 8, 8, 2
    rng = np.random.default_rng(7)
    x = rng.normal(size=(H, W, C, B)) * 0.01  # flat but not exactly: sigma stays > 0
    x[:, :4] += rng.normal(size=(H, 4, C, B)) * 3.0
    y_ref, v, sig, c = naive_lcn_parts(x, 3)
    above = sig > c[None, None, :]
    assert above.any() and (~above).any()  # both regimes are exercised
    assert above[:, :2].all() and (~above[:, 6:]).all()
    assert kink_margin(x, 3, 0.0, 1e-4) > 1e-3
    layer = LCN((C, H, W), 3)
    y, _ = layer.forward(x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-12)
    # in the flat half the divisor is c, in the textured half sigma
    np.testing.assert_allclose(y[:, 7], v[:, 7] / c[None, None, :], rtol=1e-10)
    np.testing.assert_allclose(y[:, 0], v[:, 0] / sig[:, 0, None, :], rtol=1e-10)
    assert _lcn_fd(layer, x, rng) < TOL


def test_lcn_eps_regime_is_linear():
    """Everything flat to 1e-6: sigma and c both below eps, so y = v / eps."""
    C, H, W, B = 2, 5, 5, 1
    rng = np.random.default_rng(8)
    x = 4.0 + rng.normal(size=(H, W, C, B)) * 1e-6
    layer = LCN((C, H, W), 3, eps=1e-4)
    y, v, sig, c = naive_lcn_parts(x, 3, 0.0, 1e-4)
    assert sig.max() < 1e-4 and c.max() < 1e-4
    np.testing.assert_allclose(layer.forward(x)[0], y, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(y, v / 1e-4, rtol=1e-12)
    R = rng.normal(size=x.shape)
    f = lambda: float(np.sum(layer.forward(x)[0] * R))
    _, ctx = layer.forward(x)
    dx = layer.backward(ctx, R)
    assert rel_err(dx, fd_grad(f, x, h=1e-7)) < TOL


def test_lcn_output_is_normalised():
    # Away from the borders of a large textured map, the output has local mean ~0.
    rng = np.random.default_rng(9)
    x = rng.normal(size=(12, 12, 1, 1)) * 5 + 3
    y, _ = LCN((1, 12, 12), 5).forward(x)
    assert abs(y.mean()) < 0.2
    assert np.isfinite(y).all()


def test_lcn_rejects_even_size():
    with pytest.raises(ValueError, match="odd"):
        LCN((1, 5, 5), 4)


def test_lcn_single_location_where_c_is_sigma():
    """One location: c == sigma exactly, so the divisor is one smooth function, not a kink."""
    rng = np.random.default_rng(10)
    x = rng.normal(size=(1, 1, 4, 2))
    layer = LCN((4, 1, 1), 3)
    y_ref, _, sig, c = naive_lcn_parts(x, 3)
    assert np.array_equal(sig[0, 0], c)
    np.testing.assert_allclose(layer.forward(x)[0], y_ref, rtol=1e-12)
    assert _lcn_fd(layer, x, rng) < TOL  # the gradient must go through one branch, not both


def test_layers_accept_non_contiguous_inputs():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(7, 6, 4, 6))[:, :, ::2, ::2]  # (7, 6, 2, 3), strided view
    assert not x.flags.c_contiguous
    f = LocalFilter((2, 7, 6), 3, 3, 2)
    w = rng.normal(size=f.weight_shape)
    np.testing.assert_allclose(f.forward(w, x)[0], naive_filter(w, x, 3, 2), rtol=1e-12, atol=1e-12)
    for kind in ("l2", "max", "avg"):
        np.testing.assert_allclose(
            Pool((2, 7, 6), 2, 2, kind).forward(x)[0], naive_pool(x, 2, 2, kind), rtol=1e-12, atol=1e-12
        )
    np.testing.assert_allclose(LCN((2, 7, 6), 3).forward(x)[0], naive_lcn(x, 3), rtol=1e-10, atol=1e-12)
