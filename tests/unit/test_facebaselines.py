"""The face-neuron baselines (evals.facebaselines): spherical k-means on whitened patches and a
small autoencoder, checked against analytic answers and naive re-computations."""

from __future__ import annotations

import numpy as np
import pytest

from downpour.evals import facebaselines as F


def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def blobs(rng, n_per=200, d=16, k=5, spread=0.1):
    dirs = np.linalg.qr(rng.standard_normal((d, d)))[0][:k]  # orthonormal: well-separated directions
    labels = np.repeat(np.arange(k), n_per)
    z = 4.0 * dirs[labels] + spread * rng.standard_normal((len(labels), d))
    return z, labels, dirs


# ---- spherical k-means


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_finds_the_true_centres(seed):
    z, labels, dirs = blobs(np.random.default_rng(seed))
    cent, assign, hist = F.spherical_kmeans(z, 5, init="kmeans++", seed=seed)
    match = (cent @ dirs.T).argmax(axis=1)  # each found centroid's true centre
    assert sorted(match) == list(range(5)), "two centroids share a blob"
    assert (cent @ dirs.T).max(axis=1).min() > 0.99
    # the clustering is exact, so each centroid is its blob's normalised sum
    for c in range(5):
        np.testing.assert_allclose(cent[c], unit(z[labels == match[c]].sum(axis=0)), atol=1e-10)
        assert (assign[labels == match[c]] == c).all()
    assert hist["changed"][-1] == 0  # stopped because the assignments stopped changing


def test_inertia_is_the_residual_and_never_increases():
    rng = np.random.default_rng(2)
    z = (rng.standard_normal((20, 10))[rng.integers(20, size=600)] + rng.standard_normal((600, 10))).astype(np.float64)
    init = rng.standard_normal((12, 10))
    _, _, hist = F.spherical_kmeans(z, 12, init=init, iters=40)
    inertia = np.array(hist["inertia"])
    assert len(inertia) > 3
    assert (np.diff(inertia) <= 1e-9 * inertia[0]).all(), inertia
    # the first value, from the initial centroids, recomputed naively
    w = [v / np.sqrt(sum(t * t for t in v)) for v in init]
    naive = sum(np.sqrt(zi @ zi) - max(float(zi @ wc) for wc in w) for zi in z)
    assert inertia[0] == pytest.approx(naive, rel=1e-10)


def test_empty_cluster_is_reseeded_at_the_worst_served_row():
    rng = np.random.default_rng(3)
    z = np.abs(rng.standard_normal((50, 6))) + 0.1  # all in the positive orthant
    init = np.stack([z[0], z[1], -np.ones(6)])  # the third centroid points away from every row
    cent, _, hist = F.spherical_kmeans(z, 3, init=init, iters=1)
    assert hist["reseeded"] == 1
    w = unit(init[:2])
    residual = np.linalg.norm(z, axis=1) - (z @ w.T).max(axis=1)
    np.testing.assert_allclose(cent[2], unit(z[residual.argmax()]))
    cent, assign, _ = F.spherical_kmeans(z, 3, init=init, iters=20)
    assert np.bincount(assign, minlength=3).min() > 0


# ---- patch normalisation and whitening


def test_zca_whitens_to_identity_and_shrinks_as_documented():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5000, 8)) @ rng.standard_normal((8, 8)) + rng.standard_normal(8)
    mean, W = F.zca(x, eps=1e-12)
    z = (x - mean) @ W
    np.testing.assert_allclose(z.T @ z / len(z), np.eye(8), atol=1e-8)
    np.testing.assert_allclose(W, W.T, atol=1e-10)  # ZCA, not a rotated (PCA) whitening
    mean, W = F.zca(x, eps=0.1)
    s = np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True))
    z = (x - mean) @ W
    np.testing.assert_allclose(np.linalg.eigvalsh(z.T @ z / len(z)), np.sort(s / (s + 0.1 * s.mean())), atol=1e-10)


def test_normalize_patches():
    rng = np.random.default_rng(5)
    p = rng.standard_normal((40, 25)) * rng.uniform(0.01, 3, (40, 1)) + 7
    out = F.normalize_patches(p, eps=0.01)
    var = p.var(axis=1)
    np.testing.assert_allclose(out.mean(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=1), var / (var + 0.01), rtol=1e-10)


# ---- KMeansFeatures


def test_frame_features_are_unit_centroid_responses_to_whitened_frames():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((60, 1, 8, 8)).astype(np.float32)
    m = F.KMeansFeatures(k=10, patch=None, seed=0).fit(x)
    a = m.activations(x[:20])["kmeans.centroid"]
    assert a.shape == (20, 10) and a.dtype == np.float32
    z = (F.normalize_patches(x[:20].reshape(20, -1).astype(np.float64)) - m.zca_mean) @ m.zca_matrix
    np.testing.assert_allclose(np.linalg.norm(m.centroids, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(a, z @ m.centroids.T, rtol=1e-4, atol=1e-4)
    assert (np.abs(a) <= np.linalg.norm(z, axis=1)[:, None] + 1e-4).all()  # Cauchy-Schwarz
    info = m.info()
    assert info["k"] == 10 and info["patch"] == "frame" and info["inertia_last"] <= info["inertia_first"]
    again = F.KMeansFeatures(k=10, patch=None, seed=0).fit(x).activations(x[:20])["kmeans.centroid"]
    np.testing.assert_array_equal(a, again)
    other = F.KMeansFeatures(k=10, patch=None, seed=1).fit(x).activations(x[:20])["kmeans.centroid"]
    assert not np.array_equal(a, other)


def test_small_patches_max_pool_over_positions():
    rng = np.random.default_rng(7)
    pool = rng.standard_normal((40, 1, 24, 24)).astype(np.float32)
    m = F.KMeansFeatures(k=8, patch=6, stride=1, n_patches=2000, seed=0).fit(pool)
    pattern = rng.standard_normal((4, 4)).astype(np.float32)
    x = np.zeros((2, 1, 24, 24), np.float32)
    x[0, 0, 6:10, 6:10] = pattern  # both at least patch - 1 from every edge: the same windows see it
    x[1, 0, 12:16, 14:18] = pattern
    a = m.activations(x)["kmeans.centroid"]
    np.testing.assert_allclose(a[0], a[1], rtol=1e-5, atol=1e-5)
    # against a naive loop over the positions of a stride-2 grid
    m.stride = 2
    img = pool[:3]
    got = m.activations(img)["kmeans.centroid"]
    for i in range(3):
        resp = []
        for r in range(0, 24 - 6 + 1, 2):
            for c in range(0, 24 - 6 + 1, 2):
                p = F.normalize_patches(img[i, :, r : r + 6, c : c + 6].reshape(1, -1).astype(np.float64))
                resp.append(((p - m.zca_mean) @ m.zca_matrix @ m.centroids.T)[0])
        np.testing.assert_allclose(got[i], np.max(resp, axis=0), rtol=1e-4, atol=1e-4)


def test_patches_are_drawn_from_the_frames_and_the_default_is_three_quarters(monkeypatch):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((5, 2, 8, 8)).astype(np.float32)
    seen = {}
    real = F.spherical_kmeans

    def spy(z, k, **kw):
        seen["z"] = z
        return real(z, k, **kw)

    monkeypatch.setattr(F, "spherical_kmeans", spy)
    m = F.KMeansFeatures(k=4, n_patches=50, seed=0).fit(x)
    assert m.size == 6 and m.info()["patch"] == 6 and m.info()["patches_clustered"] == 50
    rows = seen["z"].astype(np.float64) @ np.linalg.inv(m.zca_matrix) + m.zca_mean  # undo the whitening
    windows = [x[i, :, r : r + 6, c : c + 6].reshape(-1) for i in range(5) for r in range(3) for c in range(3)]
    windows = F.normalize_patches(np.array(windows, np.float64))
    dist = ((rows[:, None] - windows[None]) ** 2).sum(axis=2).min(axis=1)
    assert dist.max() < 1e-6  # every clustered row is a normalised window of a frame, both channels
    with pytest.raises(ValueError, match="patch must be"):
        F.KMeansFeatures(patch=1.5)


# ---- autoencoder


def test_autoencoder_gradient_matches_finite_differences():
    rng = np.random.default_rng(8)
    params = F.init_params((6, 5, 4, 3, 4, 5, 6), rng, dtype=np.float64)
    for b in params[1::2]:
        b[:] = rng.normal(0, 0.3, b.shape)  # non-zero biases exercise their gradients
    x = rng.standard_normal((7, 6))
    _, grads = F.ae_loss_grad(params, x, weight_decay=0.01)
    h = 1e-6
    for p, g in zip(params, grads, strict=True):
        assert g.shape == p.shape
        fd = np.empty_like(p)
        for idx in np.ndindex(p.shape):
            old = p[idx]
            p[idx] = old + h
            up = F.ae_loss_grad(params, x, 0.01)[0]
            p[idx] = old - h
            down = F.ae_loss_grad(params, x, 0.01)[0]
            p[idx] = old
            fd[idx] = (up - down) / (2 * h)
        rel = np.abs(g - fd) / np.maximum(np.abs(g) + np.abs(fd), 1e-7)
        assert rel.max() < 1e-5, (p.shape, rel.max())


def test_autoencoder_learns_low_rank_data_and_is_deterministic():
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((300, 3)) @ rng.standard_normal((3, 16))).reshape(300, 1, 4, 4).astype(np.float32)
    kw = dict(hidden=(8, 6, 3), steps=400, batch=32, lr=1e-2, log_every=20)
    m = F.AutoencoderFeatures(**kw, seed=0).fit(x)
    info = m.info()
    assert info["loss_last"] < 0.1 * info["loss_first"], info
    assert len(m.history["loss"]) == 20 and m.history["step"][-1] == 400
    a = m.activations(x[:11])
    assert {k: v.shape for k, v in a.items()} == {"ae.hidden1": (11, 8), "ae.hidden2": (11, 6), "ae.hidden3": (11, 3)}
    assert all(v.dtype == np.float32 and np.abs(v).max() <= 1 for v in a.values())  # tanh units
    b = F.AutoencoderFeatures(**kw, seed=0).fit(x).activations(x[:11])
    c = F.AutoencoderFeatures(**kw, seed=1).fit(x).activations(x[:11])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        assert not np.array_equal(a[k], c[k])


# ---- bad input


@pytest.mark.parametrize(
    "make", [lambda: F.KMeansFeatures(k=3, n_patches=500), lambda: F.AutoencoderFeatures(hidden=(4, 3, 2), steps=2)]
)
def test_bad_input_is_named(make):
    x = np.random.default_rng(10).standard_normal((20, 1, 4, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        make().fit(x[:, 0])
    bad = x.copy()
    bad[3, 0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        make().fit(bad)
    with pytest.raises(ValueError, match="fit before"):
        make().activations(x)
    m = make().fit(x)
    with pytest.raises(ValueError, match="NaN"):
        m.activations(bad)
    with pytest.raises(ValueError, match="fitted on"):
        m.activations(x[:, :, :3, :3])


def test_kmeans_settings_are_checked():
    x = np.random.default_rng(11).standard_normal((20, 1, 8, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="number of patches"):
        F.KMeansFeatures(k=21, patch=None).fit(x)
    with pytest.raises(ValueError, match="number of patches"):
        F.KMeansFeatures(k=500, patch=4, n_patches=100).fit(x)
    with pytest.raises(ValueError, match="larger than the frames"):
        F.KMeansFeatures(k=2, patch=9).fit(x)
    with pytest.raises(ValueError, match="init"):
        F.spherical_kmeans(x.reshape(20, -1), 2, init="nope")
