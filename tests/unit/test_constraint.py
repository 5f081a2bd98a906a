"""The scale constraints (nn.constraint) under the job's Adagrad: exact unit norms, a tied decoder, the pullback.

A constraint is a reparametrisation: the stored blocks stay free under the shards' plain
Adagrad (optim.update, in process here) and the stage computes with normalised weights. So
after any number of updates the effective constrained norms are 1 to float32 rounding while
the stored ones drift, and the pulled-back gradient has no component along its stored row.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from downpour import optim
from downpour.nn import Network, NetworkSpec, constraint
from downpour.nn.presets import get as preset

STEPS = 5
UNIT_TOL = 1e-5


def constrained(kind: str) -> NetworkSpec:
    """The tiny preset (three untied stages) with ``kind`` on every stage."""
    spec = preset("tiny")
    return dataclasses.replace(spec, stages=tuple(dataclasses.replace(s, constraint=kind) for s in spec.stages))


def batch(spec: NetworkSpec, n: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *spec.input)).astype(np.float32)


def train(kind: str, steps: int = STEPS, lr: float = 0.05):
    """``steps`` Adagrad updates of the tiny network on fresh batches: (net, stored blocks, initial blocks)."""
    net = Network(constrained(kind))
    params = net.init_params(0)
    initial = {k: v.copy() for k, v in params.items()}
    cfg = optim.OptimizerConfig(lr=lr)
    state = {k: optim.get(cfg.kind).init(v.size, cfg) for k, v in params.items()}
    for step in range(steps):
        _, grads, _ = net.tica(params, batch(net.spec, seed=step))
        for k, g in grads.items():
            optim.update(cfg, params[k], state[k], g)
    return net, params, initial


def effective(net: Network, params, st):
    f = st.filter
    w1, w2 = constraint.effective_blocks(
        st.spec.constraint, np, params[f"{st.name}.W1"], params.get(f"{st.name}.W2"), f.weight_shape, f.decoder_shape
    )
    return w1.reshape(f.weight_shape), w2.reshape(f.decoder_shape)


# (the constrained block, its axis of one unit's weights) per unit constraint
UNIT = {"unit_encoder": ("W1", constraint.ENCODER_AXIS), "unit_decoder": ("W2", constraint.DECODER_AXIS)}


@pytest.mark.parametrize("kind", sorted(UNIT))
def test_unit_norms_exact_after_adagrad_while_stored_norms_drift(kind):
    net, params, initial = train(kind)
    block, axis = UNIT[kind]
    for st in net.stages:
        w1, w2 = effective(net, params, st)
        eff = w1 if block == "W1" else w2
        n_eff = np.sqrt((eff.astype(np.float64) ** 2).sum(axis=axis))
        assert np.abs(n_eff - 1).max() < UNIT_TOL, f"{st.name}: effective {block} norms {n_eff.min()}..{n_eff.max()}"
        shape = st.filter.weight_shape if block == "W1" else st.filter.decoder_shape
        stored = params[f"{st.name}.{block}"].reshape(shape)
        n_stored = np.sqrt((stored.astype(np.float64) ** 2).sum(axis=axis))
        off = np.abs(n_stored - 1)
        assert np.median(off) > 1e-3 and off.max() > 1e-2, f"{st.name}: the stored {block} is not normalised itself"
        assert not np.array_equal(stored, initial[f"{st.name}.{block}"].reshape(shape)), "the updates moved it"
        # the other block is free: its norms are whatever Adagrad made them
        other = w2 if block == "W1" else w1
        assert np.abs(np.sqrt((other**2).sum(axis=-2 if block == "W1" else -1)) - 1).max() > 1e-3


def test_tied_decoder_is_the_encoder_transposed_and_has_no_block():
    net, params, _ = train("tied_decoder")
    for st in net.stages:
        assert f"{st.name}.W2" not in params and f"{st.name}.W2" not in net.param_shapes()
        w1, w2 = effective(net, params, st)
        np.testing.assert_array_equal(w2, w1.swapaxes(-1, -2))  # per location: W2[l] = W1[l]^T


def test_free_keeps_the_stored_blocks():
    net, params, _ = train("free")
    for st in net.stages:
        w1, w2 = effective(net, params, st)
        np.testing.assert_array_equal(w1.reshape(-1), params[f"{st.name}.W1"])
        np.testing.assert_array_equal(w2.reshape(-1), params[f"{st.name}.W2"])


@pytest.mark.parametrize("kind", sorted(UNIT))
def test_pulled_back_gradient_is_orthogonal_to_the_stored_rows(kind):
    """dV = (dw - w (w . dw)) / |V| has V . dV = 0 per row (or column): a step moves along the sphere."""
    net = Network(constrained(kind))
    params = net.init_params(1)
    # stored blocks of non-unit, uneven norms, so that |V| matters in the pullback
    rng = np.random.default_rng(2)
    params = {k: (v * rng.uniform(0.3, 3.0, v.size).astype(np.float32)) for k, v in params.items()}
    _, grads, _ = net.tica(params, batch(net.spec))
    block, axis = UNIT[kind]
    for st in net.stages:
        shape = st.filter.weight_shape if block == "W1" else st.filter.decoder_shape
        v = params[f"{st.name}.{block}"].reshape(shape).astype(np.float64)
        dv = grads[f"{st.name}.{block}"].reshape(shape).astype(np.float64)
        dots = (v * dv).sum(axis=axis)
        scale = np.sqrt((v**2).sum(axis=axis) * (dv**2).sum(axis=axis))
        assert np.abs(dots).max() <= 1e-5 * scale.max() + 1e-12, f"{st.name}: max |v . dv| {np.abs(dots).max()}"
        assert np.abs(dv).max() > 0, "a non-trivial gradient"


@pytest.mark.parametrize("kind", sorted(UNIT))
def test_pullback_matches_the_formula(kind):
    """The stage's stored-block gradient is the free stage's gradient in the effective weights, pulled back."""
    net = Network(constrained(kind))
    params = net.init_params(3)
    free = Network(constrained("free"))
    x = batch(net.spec, seed=4)
    _, grads, _ = net.tica(params, x)
    # the free network evaluated at the effective weights gives dL/dw
    eff = {}
    for st in net.stages:
        w1, w2 = effective(net, params, st)
        eff[f"{st.name}.W1"], eff[f"{st.name}.W2"] = w1.reshape(-1).copy(), w2.reshape(-1).copy()
    _, g_eff, _ = free.tica(eff, x)
    block, axis = UNIT[kind]
    for st in net.stages:
        shape = st.filter.weight_shape if block == "W1" else st.filter.decoder_shape
        v = params[f"{st.name}.{block}"].reshape(shape).astype(np.float64)
        n = np.sqrt((v**2).sum(axis=axis, keepdims=True))
        w = v / n
        dw = g_eff[f"{st.name}.{block}"].reshape(shape).astype(np.float64)
        expected = (dw - w * (w * dw).sum(axis=axis, keepdims=True)) / n
        got = grads[f"{st.name}.{block}"].reshape(shape)
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
