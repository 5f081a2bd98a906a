"""downpour.optim: the kernels against the formulas in float64, the interface against a
naive per-element reference, the one config, its wire form and its defaults."""

from __future__ import annotations

import numpy as np
import pytest

from downpour import config, optim
from downpour.evals import common
from downpour.paramserver import server as paramserver_server
from downpour.paramserver import store as paramserver_store
from downpour.v1 import common_pb2
from downpour.worker.loop import LocalStore


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


# -- the interface: optimizers by kind, one config, its wire form -------------------------


def naive(kind, w, acc, g, lr, eps):
    """One element at a time, in float32 as the kernels compute, straight from the formula."""
    w, acc = w.copy(), acc.copy()
    lr32, eps32 = np.float32(lr), np.float32(eps)
    for i in range(w.size):
        if kind == "sgd":
            w[i] = w[i] - g[i] * lr32
            continue
        acc[i] = acc[i] + g[i] * g[i]
        w[i] = w[i] - (g[i] * lr32) / (np.sqrt(acc[i]) + eps32)
    return w, acc


@pytest.mark.parametrize("kind", optim.KINDS)
def test_each_optimizer_matches_a_naive_per_element_reference(kind):
    rng = np.random.default_rng(7)
    config = optim.OptimizerConfig(kind=kind, lr=0.05, eps=1e-6, initial_accumulator=0.1)
    opt = optim.get(kind)
    n = 1000
    w = rng.standard_normal(n).astype(np.float32)
    state = opt.init(n, config)
    assert state.dtype == np.float32 and state.shape == (n,) and (state == np.float32(0.1)).all()
    w_ref, acc_ref = w.copy(), state.copy()
    for _ in range(3):
        g = rng.standard_normal(n).astype(np.float32)
        optim.update(config, w, state, g)
        w_ref, acc_ref = naive(kind, w_ref, acc_ref, g, config.lr, config.eps)
    np.testing.assert_array_equal(w, w_ref)  # bit for bit: the same float32 operations in the same order
    np.testing.assert_array_equal(state, acc_ref)


def test_the_interface_is_the_tiled_kernel_bit_for_bit():
    rng = np.random.default_rng(3)
    n = optim.TILE + 5
    config = optim.OptimizerConfig(lr=0.02, eps=1e-6)
    w, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    acc = optim.get("adagrad").init(n, config)
    w2, acc2 = w.copy(), acc.copy()
    optim.update(config, w, acc, g, optim.Scratch())
    optim.adagrad_(w2, acc2, g, 0.02, 1e-6)
    np.testing.assert_array_equal(w, w2)
    np.testing.assert_array_equal(acc, acc2)


@pytest.mark.parametrize("kind", optim.KINDS)
def test_config_proto_round_trip(kind):
    config = optim.OptimizerConfig(kind=kind, lr=0.125, eps=1e-7, initial_accumulator=0.5)
    spec = optim.to_proto(config)
    assert spec.learning_rate == 0.125 and spec.eps == 1e-7 and spec.initial_accumulator == 0.5
    assert optim.from_proto(spec) == config
    assert optim.from_proto(common_pb2.OptimizerSpec.FromString(spec.SerializeToString())) == config


def test_proto_kinds_are_the_wire_enum():
    assert optim.to_proto(optim.OptimizerConfig(kind="adagrad")).kind == common_pb2.OPTIMIZER_KIND_ADAGRAD
    assert optim.to_proto(optim.OptimizerConfig(kind="sgd")).kind == common_pb2.OPTIMIZER_KIND_SGD


@pytest.mark.parametrize(
    "spec, match",
    [
        (common_pb2.OptimizerSpec(learning_rate=0.1), "kind 0 is unknown"),  # UNSPECIFIED
        (common_pb2.OptimizerSpec(kind=99, learning_rate=0.1), "kind 99 is unknown"),
        (common_pb2.OptimizerSpec(kind=common_pb2.OPTIMIZER_KIND_SGD, learning_rate=0), "lr=0.0 must be > 0"),
        (common_pb2.OptimizerSpec(kind=common_pb2.OPTIMIZER_KIND_SGD, learning_rate=1, eps=-1), "eps=-1.0"),
        (
            common_pb2.OptimizerSpec(kind=common_pb2.OPTIMIZER_KIND_ADAGRAD, learning_rate=1, initial_accumulator=-1),
            "initial_accumulator=-1.0",
        ),
    ],
)
def test_from_proto_refuses_what_cannot_be_applied(spec, match):
    with pytest.raises(ValueError, match=match):
        optim.from_proto(spec)


def test_unknown_kind_names_the_known_ones():
    with pytest.raises(ValueError, match="optimizer.kind='adam' is unknown; allowed: adagrad, sgd"):
        optim.get("adam")


def test_one_config_with_the_job_defaults_everywhere():
    """The job, a shard (store and command line) and LocalStore start from one OptimizerConfig."""
    job = config.JobConfig().optimizer
    assert job == optim.OptimizerConfig(kind="adagrad", lr=0.01, eps=1e-6, initial_accumulator=0.1)
    assert config.OptimizerConfig is paramserver_store.OptimizerConfig is optim.OptimizerConfig
    assert paramserver_store.ShardStore().optimizer == job
    args = paramserver_server.build_parser().parse_args([])
    assert optim.OptimizerConfig(args.optimizer, args.lr, args.eps, args.initial_accumulator) == job
    # the experiments keep their own step (larger, from a zero accumulator) and say so
    assert common.OPTIMIZER == optim.OptimizerConfig(kind="adagrad", lr=0.02, eps=1e-6, initial_accumulator=0.0)


def test_local_store_applies_what_a_shard_applies():
    rng = np.random.default_rng(5)
    w0 = rng.standard_normal(300).astype(np.float32)
    grads = [rng.standard_normal(300).astype(np.float32) for _ in range(4)]
    job = optim.OptimizerConfig()
    local = LocalStore({"w": w0}, job)
    shard = paramserver_store.ShardStore(0, job)
    blk = shard.create("w", (300,), w0)
    for g in grads:
        local.push({"w": g})
        shard.apply(blk, [(0, g)])
    np.testing.assert_array_equal(local.pull(["w"])["w"], blk.w)
    np.testing.assert_array_equal(local.acc["w"], blk.acc)
