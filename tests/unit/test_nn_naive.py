"""Naive reference implementations of the downpour.nn layers and objectives.

Written from the definitions, with explicit Python loops over output
locations and window offsets (vectorised over the batch only), so that they
share no code and no index arithmetic with the vectorised layers under test.
Arrays are in the internal (H, W, C, B) layout unless a name says otherwise.

The other ``test_nn_*`` modules import these helpers; the tests at the bottom
check the references themselves on cases small enough to work out by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

# ------------------------------------------------------------------ layers


def naive_filter(w, x, field, stride, tied=False):
    """y[i, j, m] = sum_{dy, dx, c} W[l, m, (dy*k + dx)*C + c] * x[i*s + dy, j*s + dx, c]."""
    H, W, C, B = x.shape
    k, s = field, stride
    Ho, Wo = (H - k) // s + 1, (W - k) // s + 1
    M = w.shape[-2]
    w = w.reshape(-1, M, k * k * C)
    y = np.zeros((Ho, Wo, M, B))
    for i in range(Ho):
        for j in range(Wo):
            wl = w[0] if tied else w[i * Wo + j]
            for m in range(M):
                acc = np.zeros(B)
                for dy in range(k):
                    for dx in range(k):
                        for c in range(C):
                            acc = acc + wl[m, (dy * k + dx) * C + c] * x[i * s + dy, j * s + dx, c]
                y[i, j, m] = acc
    return y


def naive_decode(w2, z, in_shape, field, stride, tied=False):
    """r[i*s + dy, j*s + dx, c] += sum_m W2[l, (dy*k + dx)*C + c, m] * z[i, j, m], over all l = (i, j)."""
    C, H, W = in_shape
    Ho, Wo, M, B = z.shape
    k, s = field, stride
    w2 = w2.reshape(-1, k * k * C, M)
    r = np.zeros((H, W, C, B))
    for i in range(Ho):
        for j in range(Wo):
            wl = w2[0] if tied else w2[i * Wo + j]
            for dy in range(k):
                for dx in range(k):
                    for c in range(C):
                        for m in range(M):
                            r[i * s + dy, j * s + dx, c] += wl[(dy * k + dx) * C + c, m] * z[i, j, m]
    return r


def naive_pool(x, size, stride, kind, eps=1e-2):
    """Valid p x p windows per map: l2 = sqrt(eps + sum x^2), max (first max wins), avg."""
    H, W, C, B = x.shape
    p, s = size, stride
    Ho, Wo = (H - p) // s + 1, (W - p) // s + 1
    y = np.zeros((Ho, Wo, C, B))
    for i in range(Ho):
        for j in range(Wo):
            for c in range(C):
                for b in range(B):
                    vals = [x[i * s + dy, j * s + dx, c, b] for dy in range(p) for dx in range(p)]
                    if kind == "l2":
                        y[i, j, c, b] = math.sqrt(eps + sum(v * v for v in vals))
                    elif kind == "avg":
                        y[i, j, c, b] = sum(vals) / len(vals)
                    elif kind == "max":
                        best = vals[0]
                        for v in vals[1:]:
                            if v > best:
                                best = v
                        y[i, j, c, b] = best
                    else:
                        raise AssertionError(kind)
    return y


def naive_pool_argmax(x, size, stride):
    """For max pooling: the (row, col) in x that each window's (first) maximum comes from."""
    H, W, C, B = x.shape
    p, s = size, stride
    Ho, Wo = (H - p) // s + 1, (W - p) // s + 1
    where = {}
    for i in range(Ho):
        for j in range(Wo):
            for c in range(C):
                for b in range(B):
                    best, at = None, None
                    for dy in range(p):
                        for dx in range(p):
                            v = x[i * s + dy, j * s + dx, c, b]
                            if best is None or v > best:
                                best, at = v, (i * s + dy, j * s + dx)
                    where[(i, j, c, b)] = at
    return where


def gaussian_window(size, sigma=0.0):
    """The 2-D window: outer product of the normalised 1-D Gaussian (sigma 0 -> size / 4)."""
    sigma = sigma if sigma > 0 else size / 4.0
    r = size // 2
    g = np.array([math.exp(-0.5 * ((t - r) / sigma) ** 2) for t in range(size)])
    g = g / g.sum()
    return np.outer(g, g)


def naive_lcn_parts(x, size, sigma=0.0, eps=1e-4):
    """LCN and its pieces: (y, v, sigma map (H, W, B), c (B,))."""
    H, W, C, B = x.shape
    g = gaussian_window(size, sigma)
    r = size // 2

    def weighted_mean(u):  # (H, W, C, B) -> (H, W, B): mean over the window and all maps
        out = np.zeros((H, W, B))
        for i in range(H):
            for j in range(W):
                num = np.zeros(B)
                den = 0.0
                for p in range(size):
                    for q in range(size):
                        ii, jj = i + p - r, j + q - r
                        if 0 <= ii < H and 0 <= jj < W:
                            den += g[p, q]
                            for c in range(C):
                                num = num + g[p, q] * u[ii, jj, c]
                out[i, j] = num / (C * den)
        return out

    v = x - weighted_mean(x)[:, :, None, :]
    sig = np.sqrt(weighted_mean(v * v))
    c = np.array([sig[:, :, b].mean() for b in range(B)])
    y = np.zeros_like(x)
    for i in range(H):
        for j in range(W):
            for b in range(B):
                y[i, j, :, b] = v[i, j, :, b] / max(sig[i, j, b], c[b], eps)
    return y, v, sig, c


def naive_lcn(x, size, sigma=0.0, eps=1e-4):
    return naive_lcn_parts(x, size, sigma, eps)[0]


# ------------------------------------------------------------------ whole networks


def bchw_to_hwcb(x):
    B, C, H, W = x.shape
    out = np.zeros((H, W, C, B))
    for b in range(B):
        for c in range(C):
            out[:, :, c, b] = x[b, c]
    return out


def hwcb_to_bchw(x):
    H, W, C, B = x.shape
    out = np.zeros((B, C, H, W))
    for b in range(B):
        for c in range(C):
            out[b, c] = x[:, :, c, b]
    return out


def _geometry(spec):
    """Per stage: (C, H, W) of its input, computed directly from the spec."""
    c, h, w = spec.input
    shapes = []
    for st in spec.stages:
        shapes.append((c, h, w))
        if st.filter is not None:
            h = (h - st.filter.field) // st.filter.stride + 1
            w = (w - st.filter.field) // st.filter.stride + 1
            c = st.filter.maps
        if st.pool is not None:
            h = (h - st.pool.size) // st.pool.stride + 1
            w = (w - st.pool.size) // st.pool.stride + 1
    return shapes, (c, h, w)


def naive_effective(constraint, W1, raw_w2, w2_shape):
    """The weights a stage computes with (see nn.constraint), one row or column at a time."""
    W1 = W1.copy()
    L, M, K = W1.shape
    if constraint == "unit_encoder":
        for l in range(L):
            for m in range(M):
                W1[l, m] /= np.sqrt(sum(float(v) ** 2 for v in W1[l, m]))
    if constraint == "tied_decoder":
        W2 = np.empty(w2_shape)
        for l in range(L):
            W2[l] = W1[l].T
        return W1, W2
    W2 = np.asarray(raw_w2, dtype=np.float64).reshape(w2_shape).copy()
    if constraint == "unit_decoder":
        for l in range(L):
            for m in range(M):
                W2[l, :, m] /= np.sqrt(sum(float(v) ** 2 for v in W2[l, :, m]))
    return W1, W2


def naive_forward(spec, params, x_bchw):
    """Every stage's activations: list of dicts with x (input), z, pooled, out (all HWCB)."""
    shapes, _ = _geometry(spec)
    h = bchw_to_hwcb(np.asarray(x_bchw, dtype=np.float64))
    stages = []
    for n, (st, in_shape) in enumerate(zip(spec.stages, shapes), 1):
        rec = {"x": h}
        if st.filter is not None:
            f = st.filter
            c, hh, ww = in_shape
            K = f.field * f.field * c
            L = 1 if f.tied else ((hh - f.field) // f.stride + 1) * ((ww - f.field) // f.stride + 1)
            W1 = np.asarray(params[f"stage{n}.W1"], dtype=np.float64).reshape(L, f.maps, K)
            W1, W2 = naive_effective(st.constraint, W1, params.get(f"stage{n}.W2"), (L, K, f.maps))
            h = naive_filter(W1, h, f.field, f.stride, f.tied)
            rec["z"] = h
            rec["W2"] = W2
            rec["in_shape"] = in_shape
        if st.pool is not None:
            h = naive_pool(h, st.pool.size, st.pool.stride, st.pool.kind, st.pool.eps)
            rec["pooled"] = h
        if st.lcn is not None:
            h = naive_lcn(h, st.lcn.size, st.lcn.sigma, st.lcn.eps)
        rec["out"] = h
        stages.append(rec)
    return stages


def naive_tica_loss(spec, params, x_bchw):
    """Sum over filter stages of mean_b ||decode(W2, z) - x||^2 + lam * mean_b sum L2pool(z)."""
    B = x_bchw.shape[0]
    total = 0.0
    for st, rec in zip(spec.stages, naive_forward(spec, params, x_bchw)):
        if st.filter is None:
            continue
        f = st.filter
        r = naive_decode(rec["W2"], rec["z"], rec["in_shape"], f.field, f.stride, f.tied)
        total += float(((r - rec["x"]) ** 2).sum()) / B
        if st.lam > 0:
            if st.pool is not None:
                size, stride, eps = st.pool.size, st.pool.stride, st.pool.eps
            else:
                size, stride, eps = 1, 1, 1e-2
            total += st.lam * float(naive_pool(rec["z"], size, stride, "l2", eps).sum()) / B
    return total


def naive_logits(spec, params, x_bchw):
    """(B, classes): head.W @ (last output flattened in (H, W, C) order) + head.b."""
    out = naive_forward(spec, params, x_bchw)[-1]["out"]
    H, W, C, B = out.shape
    D = H * W * C
    Wh = np.asarray(params["head.W"], dtype=np.float64).reshape(spec.classes, D)
    bh = np.asarray(params["head.b"], dtype=np.float64)
    logits = np.zeros((B, spec.classes))
    for b in range(B):
        feats = [out[i, j, c, b] for i in range(H) for j in range(W) for c in range(C)]
        for k in range(spec.classes):
            logits[b, k] = sum(Wh[k, d] * feats[d] for d in range(D)) + bh[k]
    return logits


def naive_cross_entropy(logits, y):
    total = 0.0
    for row, label in zip(logits, y):
        top = max(row)
        lse = top + math.log(sum(math.exp(v - top) for v in row))
        total += lse - row[label]
    return total / len(y)


# ------------------------------------------------------------------ finite differences


def fd_grad(f, arr, h=1e-5, indices=None):
    """Central differences of the scalar f() w.r.t. entries of ``arr`` (perturbed in place)."""
    flat = arr.reshape(-1)
    assert np.shares_memory(flat, arr), "arr must be contiguous so that it can be perturbed in place"
    out = np.zeros(arr.size)
    for i in range(arr.size) if indices is None else indices:
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        out[i] = (fp - fm) / (2 * h)
    return out.reshape(arr.shape)


def fd_directional(f, arrs, dirs, h=1e-5):
    """(f(a + h d) - f(a - h d)) / 2h for several arrays moved together, in place."""
    olds = [a.copy() for a in arrs]
    for a, o, d in zip(arrs, olds, dirs):
        a[...] = o + h * d
    fp = f()
    for a, o, d in zip(arrs, olds, dirs):
        a[...] = o - h * d
    fm = f()
    for a, o in zip(arrs, olds):
        a[...] = o
    return (fp - fm) / (2 * h)


def rel_err(analytic, numeric):
    """max |a - n| relative to the largest entry of either (0 when both vanish)."""
    a = np.asarray(analytic, dtype=np.float64)
    n = np.asarray(numeric, dtype=np.float64)
    scale = max(np.max(np.abs(a), initial=0.0), np.max(np.abs(n), initial=0.0))
    if scale == 0.0:
        return 0.0
    return float(np.max(np.abs(a - n)) / scale)


# ------------------------------------------------------------------ the references themselves


def test_naive_filter_by_hand():
    # 1 map, 3x3 single-channel input, 2x2 field, stride 1: four locations.
    x = np.arange(9.0).reshape(3, 3, 1, 1)
    w = np.zeros((4, 1, 4))
    w[:, 0] = [1.0, 10.0, 100.0, 1000.0]  # (dy, dx) = (0,0), (0,1), (1,0), (1,1)
    w[3, 0] = [1.0, 0.0, 0.0, 0.0]  # location (1, 1) only reads its top-left pixel
    y = naive_filter(w, x, 2, 1)
    assert y[:, :, 0, 0].tolist() == [[0 + 10 + 300 + 4000, 1 + 20 + 400 + 5000], [3 + 40 + 600 + 7000, 4]]
    # Two channels: K is flattened (dy, dx, c), so channel varies fastest.
    x2 = np.zeros((2, 2, 2, 1))
    x2[0, 1, 1, 0] = 1.0  # dy=0, dx=1, c=1 -> index (0*2 + 1)*2 + 1 = 3
    w2 = np.zeros((1, 1, 8))
    w2[0, 0, 3] = 7.0
    assert naive_filter(w2, x2, 2, 1)[0, 0, 0, 0] == 7.0


def test_naive_filter_stride_and_tied():
    x = np.arange(25.0).reshape(5, 5, 1, 1)
    w = np.ones((1, 1, 1))
    y = naive_filter(w, x, 1, 2, tied=True)  # picks every other pixel
    assert y[:, :, 0, 0].tolist() == [[0, 2, 4], [10, 12, 14], [20, 22, 24]]


def test_naive_decode_is_the_adjoint_of_naive_filter():
    rng = np.random.default_rng(0)
    C, H, W, M, k, s, B = 2, 5, 6, 3, 3, 2, 2
    Ho, Wo = (H - k) // s + 1, (W - k) // s + 1
    w = rng.normal(size=(Ho * Wo, M, k * k * C))
    x = rng.normal(size=(H, W, C, B))
    z = rng.normal(size=(Ho, Wo, M, B))
    lhs = np.sum(naive_filter(w, x, k, s) * z)
    rhs = np.sum(x * naive_decode(w.transpose(0, 2, 1), z, (C, H, W), k, s))
    assert lhs == pytest.approx(rhs, rel=1e-12)


def test_naive_pool_by_hand():
    x = np.array([[1.0, 5.0, 2.0], [3.0, -4.0, 0.0], [2.0, 2.0, 9.0]]).reshape(3, 3, 1, 1)
    assert naive_pool(x, 2, 1, "max")[:, :, 0, 0].tolist() == [[5, 5], [3, 9]]
    assert naive_pool(x, 2, 1, "avg")[:, :, 0, 0].tolist() == [[1.25, 0.75], [0.75, 1.75]]
    assert naive_pool(x, 3, 1, "l2", eps=0.0)[0, 0, 0, 0] == pytest.approx(math.sqrt(144.0))
    assert naive_pool(x, 2, 2, "l2", eps=1.0)[0, 0, 0, 0] == pytest.approx(math.sqrt(52.0))
    ties = np.array([[1.0, 2.0], [2.0, 0.0]]).reshape(2, 2, 1, 1)
    assert naive_pool_argmax(ties, 2, 1)[(0, 0, 0, 0)] == (0, 1)


def test_naive_lcn_by_hand():
    # size 1: the window is one pixel, so m is the mean over maps and sigma the std over maps.
    x = np.array([1.0, 3.0, 8.0, 0.0]).reshape(1, 2, 2, 1)  # H=1, W=2, C=2
    y, v, sig, c = naive_lcn_parts(x, 1)
    assert v[0, 0, :, 0].tolist() == [-1.0, 1.0]
    assert v[0, 1, :, 0].tolist() == [4.0, -4.0]
    assert sig[0, :, 0].tolist() == [1.0, 4.0]
    assert c[0] == 2.5
    assert y[0, 0, :, 0].tolist() == [-1.0 / 2.5, 1.0 / 2.5]
    assert y[0, 1, :, 0].tolist() == [1.0, -1.0]
    # Border renormalisation: a constant image has zero v everywhere, corners included.
    yc, vc, _, _ = naive_lcn_parts(np.full((4, 5, 2, 1), 3.0), 5)
    assert np.abs(vc).max() < 1e-12 and np.abs(yc).max() < 1e-8
    g = gaussian_window(5)
    assert g.sum() == pytest.approx(1.0) and g[2, 2] == g.max() and g[0, 1] == g[1, 0]


def test_fd_helpers():
    a = np.array([1.0, -2.0, 0.5])
    f = lambda: float(np.sum(a**3))
    assert rel_err(3 * a**2, fd_grad(f, a)) < 1e-9
    d = np.array([0.3, 0.1, -1.0])
    assert fd_directional(f, [a], [d]) == pytest.approx(float(np.dot(3 * a**2, d)), rel=1e-9)
    assert a.tolist() == [1.0, -2.0, 0.5]
