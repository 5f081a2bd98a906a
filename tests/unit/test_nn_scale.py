"""nn.scale: the rescalings each parametrisation admits, and the check built on them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from downpour.nn import Network, presets, scale


def _net(constraint, training="joint"):
    base = presets.get("tiny")
    stages = tuple(dataclasses.replace(s, constraint=constraint) for s in base.stages)
    return Network(dataclasses.replace(base, stages=stages, training=training), dtype=np.float64)


def _x(n=6):
    return np.random.default_rng(0).normal(size=(n, 1, 16, 16))


def test_the_free_form_keeps_its_reconstruction_and_loses_sparsity_under_a_w1_w2_over_a():
    net = _net("free")
    params = net.init_params(0)
    x = _x()
    info = net.tica(params, x)[2]
    for a in (0.25, 0.5, 2.0):
        r = scale.rescaled(params, "stage1", "free", a)
        got = net.tica(r, x)[2]
        assert got["stage1.reconstruction"] == pytest.approx(info["stage1.reconstruction"], rel=1e-12)
        # L2 pooling sqrt(eps + a^2 sum z^2): the sparsity scales by about a (exactly, as eps -> 0)
        ratio = got["stage1.sparsity"] / info["stage1.sparsity"]
        assert ratio < 1 if a < 1 else ratio > 1
    gains = scale.rescale_gains(net, params, x, [0.25])
    quarter = net.tica(scale.rescaled(params, "stage1", "free", 0.25), x)[2]
    before = info["stage1.reconstruction"] + info["stage1.sparsity"]
    fall = (info["stage1.sparsity"] - quarter["stage1.sparsity"]) / before  # all of it from the sparsity
    assert gains["stage1"]["fall"] == pytest.approx(fall, rel=1e-9) and fall > 0.1
    assert gains["stage1"]["factor"] == 0.25 and gains["stage1"]["loss"] == pytest.approx(before)


@pytest.mark.parametrize(
    "kind, moved, kept",
    [("unit_decoder", ["W1"], ["W2"]), ("unit_encoder", ["W2"], ["W1"]), ("tied_decoder", ["W1"], [])],
)
def test_each_constraint_admits_its_own_rescaling(kind, moved, kept):
    net = _net(kind)
    params = net.init_params(1)
    r = scale.rescaled(params, "stage2", kind, 3.0)
    for b in moved:
        np.testing.assert_allclose(r[f"stage2.{b}"], 3.0 * params[f"stage2.{b}"])
    for b in kept:
        assert r[f"stage2.{b}"] is params[f"stage2.{b}"]
    assert all(r[k] is params[k] for k in params if not k.startswith("stage2."))


def test_rescale_gains_reports_no_fall_at_a_minimum_along_the_rescaling():
    # A stage's loss along its admitted rescaling, at the factor that minimises it on a grid: no
    # factor of the grid relative to that point lowers it.
    net = _net("tied_decoder")
    params = net.init_params(2)
    x = _x()
    grid = np.geomspace(0.25, 4.0, 41)
    losses = [scale.stage_losses(net, scale.rescaled(params, "stage1", "tied_decoder", a), x)["stage1"] for a in grid]
    best = scale.rescaled(params, "stage1", "tied_decoder", grid[int(np.argmin(losses))])
    gains = scale.rescale_gains(net, best, x, grid / grid[int(np.argmin(losses))])
    assert gains["stage1"]["fall"] == 0.0 and gains["stage1"]["factor"] == 1.0
