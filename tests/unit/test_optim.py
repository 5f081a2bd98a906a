"""downpour.optim against the formulas evaluated in float64."""

from __future__ import annotations

import numpy as np
import pytest

from downpour import optim


@pytest.mark.parametrize("n", [1, 1000, optim.TILE + 3])
def test_adagrad_matches_formula(n):
    rng = np.random.default_rng(n)
    w = rng.standard_normal(n).astype(np.float32)
    acc = rng.random(n).astype(np.float32)
    w64, acc64 = w.astype(np.float64), acc.astype(np.float64)
    for _ in range(3):
        g = rng.standard_normal(n).astype(np.float32)
        optim.adagrad_(w, acc, g, lr=0.05, eps=1e-6)
        acc64 += g.astype(np.float64) ** 2
        w64 -= 0.05 * g / (np.sqrt(acc64) + 1e-6)
    np.testing.assert_allclose(acc, acc64, rtol=1e-6)
    np.testing.assert_allclose(w, w64, rtol=1e-5, atol=1e-6)


def test_adagrad_exact_on_representable_values():
    w, acc = np.ones(4, np.float32), np.zeros(4, np.float32)
    optim.adagrad_(w, acc, np.full(4, 2.0, np.float32), lr=0.5, eps=0.0)
    # acc = 4, w = 1 - 0.5 * 2 / 2
    np.testing.assert_array_equal(acc, 4.0)
    np.testing.assert_array_equal(w, 0.5)


def test_adagrad_chunkwise_equals_whole():
    rng = np.random.default_rng(1)
    w, acc, g = (rng.random(5000).astype(np.float32) for _ in range(3))
    w2, acc2 = w.copy(), acc.copy()
    optim.adagrad_(w, acc, g, 0.1, 1e-8)
    for a in range(0, 5000, 777):
        b = min(5000, a + 777)
        optim.adagrad_(w2[a:b], acc2[a:b], g[a:b], 0.1, 1e-8)
    np.testing.assert_array_equal(w, w2)
    np.testing.assert_array_equal(acc, acc2)


def test_sgd():
    w = np.ones(3, np.float32)
    optim.sgd_(w, np.array([1, 2, 4], np.float32), lr=0.25)
    np.testing.assert_array_equal(w, [0.75, 0.5, 0.0])


def test_all_finite():
    assert optim.all_finite(np.ones(10, np.float32))
    assert optim.all_finite(np.full(10, 3e38, np.float32))  # sum overflows, values do not
    for bad in (np.nan, np.inf, -np.inf):
        a = np.ones(10, np.float32)
        a[7] = bad
        assert not optim.all_finite(a)
