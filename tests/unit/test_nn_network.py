"""Network objectives (TICA, softmax) against a naive composition and central differences."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

from downpour.nn import FilterSpec, LCNSpec, Network, NetworkSpec, PoolSpec, StageSpec
from downpour.nn.presets import get as preset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_nn_naive import (
    fd_directional,
    fd_grad,
    hwcb_to_bchw,
    naive_cross_entropy,
    naive_effective,
    naive_forward,
    naive_logits,
    naive_tica_loss,
    rel_err,
)

TOL = 1e-6
FULL_FD_MAX = 400  # blocks up to this size are checked entry by entry, larger ones on a sample
SAMPLE = 80


def _stage(filter=None, pool=None, lcn=None, lam=0.1, constraint="free"):
    # free (untied, unconstrained W2) unless named: the decoder's own code paths stay covered;
    # the specs train jointly, so that the gradient is the summed objective's (finite differences)
    return StageSpec(filter=filter, pool=pool, lcn=lcn, lam=lam, constraint=constraint)


SPECS = {
    # L2 pooling (shared with the sparsity term), then a stage without pool whose stride
    # does not divide its input.
    "l2_then_nopool": NetworkSpec(
        input=(2, 8, 8),
        training="joint",
        stages=(
            _stage(FilterSpec(maps=3, field=3), PoolSpec(size=2, stride=1), LCNSpec(size=3), lam=0.2),
            _stage(FilterSpec(maps=2, field=2, stride=2), None, LCNSpec(size=3), lam=0.1),
        ),
    ),
    # A tied (convolutional) stage with max pooling, then avg pooling without LCN: both
    # use a separate L2 pool for sparsity.
    "conv_max_avg": NetworkSpec(
        input=(1, 9, 9),
        training="joint",
        stages=(
            _stage(FilterSpec(maps=3, field=3, tied=True), PoolSpec(size=3, stride=2, kind="max"), LCNSpec(size=3)),
            _stage(FilterSpec(maps=2, field=2), PoolSpec(size=2, stride=1, kind="avg", eps=0.05), None, lam=0.3),
        ),
    ),
    # No pool and no LCN; a stage with no filter (pool + LCN only); a reconstruction-only stage.
    "bare_nofilter_lam0": NetworkSpec(
        input=(1, 8, 8),
        training="joint",
        stages=(
            _stage(FilterSpec(maps=2, field=3), None, None, lam=0.1),
            _stage(None, PoolSpec(size=2, stride=2, kind="avg"), LCNSpec(size=3, sigma=1.0)),
            _stage(FilterSpec(maps=2, field=2), PoolSpec(size=2, stride=1), None, lam=0.0),
        ),
    ),
    "tiny": dataclasses.replace(preset("tiny"), training="joint"),
    # Each scale constraint (nn.constraint), on untied and tied (convolutional) filters, with a
    # stride that does not divide the input.
    "unit_decoder": NetworkSpec(
        input=(2, 8, 8),
        training="joint",
        stages=(
            _stage(FilterSpec(maps=3, field=3), PoolSpec(size=2), LCNSpec(size=3), 0.2, "unit_decoder"),
            _stage(FilterSpec(maps=2, field=2, stride=2, tied=True), None, None, 0.1, "unit_decoder"),
        ),
    ),
    "unit_encoder": NetworkSpec(
        input=(2, 8, 8),
        training="joint",
        stages=(
            _stage(FilterSpec(maps=3, field=3, tied=True), PoolSpec(size=2), LCNSpec(size=3), 0.2, "unit_encoder"),
            _stage(FilterSpec(maps=2, field=2, stride=2), PoolSpec(size=2), None, 0.1, "unit_encoder"),
        ),
    ),
    "tied_decoder": NetworkSpec(
        input=(2, 8, 8),
        training="joint",
        stages=(
            _stage(FilterSpec(maps=3, field=3), PoolSpec(size=2), LCNSpec(size=3), 0.2, "tied_decoder"),
            _stage(FilterSpec(maps=2, field=2, stride=2, tied=True), PoolSpec(size=2), None, 0.1, "tied_decoder"),
        ),
    ),
}
TERMS = ("reconstruction", "sparsity")


def _with_head(spec, classes=3):
    return NetworkSpec(input=spec.input, stages=spec.stages, classes=classes)


def _setup(spec, seed=0, B=3):
    net = Network(spec, dtype=np.float64)
    params = net.init_params(seed)
    rng = np.random.default_rng(seed + 100)
    for k in params:
        if k.endswith(".W2"):
            params[k] *= 4.0  # a decoder large enough that reconstruction matters
        if k == "head.b":
            params[k][:] = rng.normal(size=params[k].shape)
    x = rng.normal(size=(B, *spec.input))
    return net, params, x, rng


def _check_grads(f, params, grads, rng, h=1e-6):
    """Every block: entries (all, or a sample for big blocks) and random directions."""
    assert set(grads) <= set(params)
    for name, p in params.items():
        g = grads.get(name)
        if g is None:
            g = np.zeros_like(p)
        assert g.shape == p.shape, name
        if p.size <= FULL_FD_MAX:
            idx = None
            num = fd_grad(f, p, h)
            ana = g
        else:
            idx = np.sort(rng.choice(p.size, SAMPLE, replace=False))
            num = fd_grad(f, p, h, idx)[idx]
            ana = g[idx]
        assert rel_err(ana, num) < TOL, (name, rel_err(ana, num))
        for _ in range(2):
            d = rng.normal(size=p.shape)
            dd = fd_directional(f, [p], [d], h)
            assert abs(float(np.dot(g, d)) - dd) <= TOL * max(abs(dd), np.linalg.norm(g) * 1e-3), name


@pytest.mark.parametrize("name", list(SPECS))
def test_tica_loss_matches_naive(name):
    spec = SPECS[name]
    net, params, x, _ = _setup(spec)
    loss, grads, info = net.tica(params, x)
    assert loss == pytest.approx(naive_tica_loss(spec, params, x), rel=1e-10)
    # info splits the loss per stage with a filter, and watches each such stage's weights
    filtered = [i for i, st in enumerate(spec.stages, 1) if st.filter is not None]
    terms = {k: v for k, v in info.items() if k.endswith(TERMS)}
    assert set(terms) == {f"stage{i}.{t}" for i in filtered for t in TERMS}
    assert sum(terms.values()) == pytest.approx(loss, rel=1e-12)
    for i, st in enumerate(spec.stages, 1):
        if st.filter is not None and st.lam == 0:
            assert info[f"stage{i}.sparsity"] == 0.0
        if st.filter is not None:
            W1, W2 = naive_effective(st.constraint, *_raw(net, params, i))
            for name, arr, axis in (("W1", W1, 2), ("W2", W2, 1)):
                n = np.sqrt((arr**2).sum(axis=axis))
                assert info[f"stage{i}.{name}.norm_mean"] == pytest.approx(n.mean(), rel=1e-9)
                assert info[f"stage{i}.{name}.norm_min"] == pytest.approx(n.min(), rel=1e-9)
                assert info[f"stage{i}.{name}.norm_max"] == pytest.approx(n.max(), rel=1e-9)
                assert info[f"stage{i}.{name}.rms"] == pytest.approx(np.sqrt((arr**2).mean()), rel=1e-9)
        if st.filter is not None and st.lam > 0:
            assert 0.0 <= info[f"stage{i}.dead"] <= 1.0 and 0.0 <= info[f"stage{i}.dense"] <= 1.0
    assert set(grads) == {k for k in params if k.endswith((".W1", ".W2"))}


def _raw(net, params, i):
    st = net.stages[i - 1]
    return params[f"stage{i}.W1"].reshape(st.filter.weight_shape), params.get(f"stage{i}.W2"), st.filter.decoder_shape


@pytest.mark.parametrize("name", list(SPECS))
def test_tica_gradients_match_finite_differences(name):
    spec = SPECS[name]
    net, params, x, rng = _setup(spec, seed=1)
    _, grads, _ = net.tica(params, x)
    grads = {k: v.copy() for k, v in grads.items()}
    _check_grads(lambda: net.tica(params, x)[0], params, grads, rng)


def test_tica_stage_input_gradient_flows_through_lower_stages():
    # The second stage's loss alone moves the first stage's encoder: joint training.
    spec = SPECS["l2_then_nopool"]
    net, params, x, _ = _setup(spec)
    only2 = NetworkSpec(
        input=spec.input,
        stages=(
            StageSpec(filter=spec.stages[0].filter, pool=spec.stages[0].pool, lcn=spec.stages[0].lcn, lam=0.0),
            spec.stages[1],
        ),
    )
    net2 = Network(only2, dtype=np.float64)
    _, g_all, info = net.tica(params, x)
    _, g2, info2 = net2.tica(params, x)
    assert info2["stage2.reconstruction"] == pytest.approx(info["stage2.reconstruction"], rel=1e-12)
    assert np.abs(g_all["stage1.W1"] - g2["stage1.W1"]).max() > 1e-6  # stage 2 contributes


@pytest.mark.parametrize("name", list(SPECS))
def test_supervised_loss_matches_naive(name):
    spec = _with_head(SPECS[name])
    net, params, x, rng = _setup(spec, B=4)
    y = np.array([0, 2, 1, 2])
    loss, grads, info = net.supervised(params, x, y)
    logits = naive_logits(spec, params, x)
    assert loss == pytest.approx(naive_cross_entropy(logits, y), rel=1e-10)
    assert info["accuracy"] == pytest.approx(float(np.mean(logits.argmax(axis=1) == y)))
    assert set(grads) == {k for k in params if not k.endswith(".W2")}


@pytest.mark.parametrize("name", list(SPECS))
def test_supervised_gradients_match_finite_differences(name):
    spec = _with_head(SPECS[name])
    net, params, x, rng = _setup(spec, seed=2, B=4)
    y = np.array([1, 0, 2, 1])
    _, grads, _ = net.supervised(params, x, y)
    grads = {k: v.copy() for k, v in grads.items()}
    _check_grads(lambda: net.supervised(params, x, y)[0], params, grads, rng)


def test_supervised_rejects_bad_labels_and_missing_head():
    spec = _with_head(SPECS["bare_nofilter_lam0"])
    net, params, x, _ = _setup(spec, B=2)
    with pytest.raises(ValueError, match="labels"):
        net.supervised(params, x, np.array([0, 3]))
    with pytest.raises(ValueError, match="labels"):
        net.supervised(params, x, np.array([0, 1, 2]))
    plain = Network(SPECS["bare_nofilter_lam0"], dtype=np.float64)
    with pytest.raises(ValueError, match="classes"):
        plain.supervised(plain.init_params(0), x, np.array([0, 1]))


@pytest.mark.parametrize("name", list(SPECS))
def test_forward_activations_match_naive(name):
    spec = _with_head(SPECS[name])
    net, params, x, _ = _setup(spec, B=2)
    acts = net.forward(params, x)
    ref = naive_forward(spec, params, x)
    expect = {}
    for i, (st, rec) in enumerate(zip(spec.stages, ref), 1):
        if st.filter is not None:
            expect[f"stage{i}.filter"] = hwcb_to_bchw(rec["z"])
        if st.pool is not None:
            expect[f"stage{i}.pool"] = hwcb_to_bchw(rec["pooled"])
        expect[f"stage{i}.output"] = hwcb_to_bchw(rec["out"])
    expect["head.logits"] = naive_logits(spec, params, x)
    assert set(acts) == set(expect)
    for k, v in expect.items():
        assert acts[k].shape == v.shape, k
        np.testing.assert_allclose(acts[k], v, rtol=1e-9, atol=1e-11, err_msg=k)
    upto = net.forward(params, x, upto=1)
    assert "head.logits" not in upto and all(k.startswith("stage1.") for k in upto)


@pytest.mark.parametrize("name", list(SPECS))
def test_param_shapes_and_init(name):
    spec = _with_head(SPECS[name], classes=5)
    net = Network(spec, dtype=np.float32)
    shapes = net.param_shapes()
    c, h, w = spec.input
    for i, st in enumerate(spec.stages, 1):
        if st.filter is not None:
            f = st.filter
            ho, wo = (h - f.field) // f.stride + 1, (w - f.field) // f.stride + 1
            L = 1 if f.tied else ho * wo
            K = f.field * f.field * c
            assert shapes[f"stage{i}.W1"] == (L, f.maps, K)
            if st.constraint == "tied_decoder":
                assert f"stage{i}.W2" not in shapes
            else:
                assert shapes[f"stage{i}.W2"] == (L, K, f.maps)
            c, h, w = f.maps, ho, wo
        else:
            assert f"stage{i}.W1" not in shapes
        if st.pool is not None:
            h, w = (h - st.pool.size) // st.pool.stride + 1, (w - st.pool.size) // st.pool.stride + 1
    assert net.out_shape == (c, h, w)
    assert shapes["head.W"] == (5, c * h * w) and shapes["head.b"] == (5,)
    p1, p2 = net.init_params(3), net.init_params(3)
    assert set(p1) == set(shapes)
    for k, s in shapes.items():
        assert p1[k].ndim == 1 and p1[k].size == int(np.prod(s)) and p1[k].dtype == np.float32
        assert np.array_equal(p1[k], p2[k])
    assert not np.array_equal(p1[next(iter(p1))], net.init_params(4)[next(iter(p1))])


def test_float32_matches_float64():
    spec = SPECS["tiny"]
    net64, params, x, _ = _setup(spec)
    net32 = Network(spec, dtype=np.float32)
    p32 = {k: v.astype(np.float32) for k, v in params.items()}
    l64, g64, _ = net64.tica(params, x)
    l32, g32, _ = net32.tica(p32, x.astype(np.float32))
    assert l32 == pytest.approx(l64, rel=1e-4)
    for k in g64:
        assert g32[k].dtype == np.float32
        assert rel_err(g32[k], g64[k]) < 1e-3, k


def test_bad_params_and_inputs_are_rejected():
    net, params, x, _ = _setup(SPECS["tiny"])
    with pytest.raises(ValueError, match="input batch"):
        net.tica(params, x[:, :, :15])
    short = dict(params)
    short["stage1.W1"] = short["stage1.W1"][:-1]
    with pytest.raises(ValueError, match="stage1.W1"):
        net.tica(short, x)
    missing = dict(params)
    del missing["stage2.W1"]
    with pytest.raises(KeyError, match="stage2.W1"):
        net.tica(missing, x)
    net_free, params_free, _, _ = _setup(SPECS["l2_then_nopool"])  # an untied decoder is a block of its own
    del params_free["stage2.W2"]
    with pytest.raises(KeyError, match="stage2.W2"):
        net_free.tica(params_free, x[:, :2, :8, :8])


@pytest.mark.parametrize("name", ["l2_then_nopool", "unit_encoder", "tied_decoder"])
def test_layerwise_gradients_are_each_stages_own_terms(name):
    # training: layerwise stops the gradient at each stage's input: a stage's blocks get the
    # gradient of its own two terms alone (central differences of that stage's terms).
    base = SPECS[name]
    spec = NetworkSpec(input=base.input, stages=base.stages, training="layerwise")
    net, params, x, rng = _setup(spec, seed=3)
    joint = Network(base, dtype=np.float64)
    loss, grads, info = net.tica(params, x)
    assert loss == pytest.approx(joint.tica(params, x)[0], rel=1e-12)  # the same objective value
    for i, st in enumerate(spec.stages, 1):
        if st.filter is None:
            continue

        def own(i=i):
            inf = net.tica(params, x)[2]
            return inf[f"stage{i}.reconstruction"] + inf[f"stage{i}.sparsity"]

        mine = {k: v.copy() for k, v in grads.items() if k.startswith(f"stage{i}.")}
        _check_grads(own, {k: params[k] for k in mine}, mine, rng)
