"""Training: plain SGD on TICA lowers `tiny`'s loss on natural-image patches."""

from __future__ import annotations

import numpy as np
import pytest

from downpour.nn import Network
from downpour.nn.presets import get as preset

skimage_data = pytest.importorskip("skimage.data")
skimage_color = pytest.importorskip("skimage.color")

SIZE = 16


def natural_patches(n_per_image=300, seed=0):
    """16x16 grey patches from scikit-image's bundled photographs, standardised per patch."""
    images = [
        skimage_data.camera(),
        skimage_color.rgb2gray(skimage_data.astronaut()),
        skimage_color.rgb2gray(skimage_data.coffee()),
        skimage_color.rgb2gray(skimage_data.chelsea()),
        skimage_data.moon(),
    ]
    rng = np.random.default_rng(seed)
    out = []
    for im in images:
        im = np.asarray(im, dtype=np.float64)
        im = im / im.max()
        for _ in range(n_per_image):
            i = rng.integers(0, im.shape[0] - SIZE + 1)
            j = rng.integers(0, im.shape[1] - SIZE + 1)
            out.append(im[i : i + SIZE, j : j + SIZE])
    p = np.stack(out)
    p = p - p.mean(axis=(1, 2), keepdims=True)
    std = p.std(axis=(1, 2), keepdims=True)
    p = p[std[:, 0, 0] > 1e-3] / std[std[:, 0, 0] > 1e-3]  # drop the few perfectly flat patches
    return p[:, None].astype(np.float32)  # (N, 1, 16, 16)


def test_patches_are_standardised_natural_images():
    p = natural_patches(50)
    assert p.shape[1:] == (1, SIZE, SIZE) and len(p) > 200
    np.testing.assert_allclose(p.mean(axis=(1, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(p.std(axis=(1, 2, 3)), 1, atol=1e-4)
    # natural images: neighbouring pixels are strongly correlated, unlike noise
    a, b = p[:, 0, :, :-1].ravel(), p[:, 0, :, 1:].ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.5


def test_tiny_tica_loss_falls_30_percent_in_200_sgd_steps():
    patches = natural_patches()
    net = Network(preset("tiny"), dtype=np.float32)
    params = net.init_params(seed=0)
    rng = np.random.default_rng(1)
    lr, batch = 1e-3, 32
    losses = []
    for _ in range(200):
        x = patches[rng.choice(len(patches), batch, replace=False)]
        loss, grads, info = net.tica(params, x)
        assert np.isfinite(loss)
        losses.append(loss)
        for k in params:
            params[k] -= lr * grads[k]
            assert params[k].dtype == np.float32
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    assert last <= 0.7 * first, (first, last)
    # every stage's terms are still finite and non-negative
    assert all(np.isfinite(v) and v >= 0 for v in info.values())
