"""The parameter server against real shard processes on 127.0.0.1.

Each test starts `python -m downpour.cli serve paramserver` processes (tests/harness.py),
waits for gRPC health SERVING and checks exact, analytically known results.
"""

from __future__ import annotations

import re
import signal
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import harness
from downpour.paramserver.client import ParamClient, refusal
from downpour.paramserver.server import PUSH_PAYLOAD
from downpour.rpc import codec
from downpour.rpc.channel import ChannelConfig, open_channel
from downpour.v1 import common_pb2
from downpour.v1 import paramserver_pb2 as pb

# Accumulators from zero (the job's default is 0.1): the expectations below are the formula's from acc = 0.
FROM_ZERO = ("--initial-accumulator", "0")


def adagrad_expected(w0, grads, lr, eps):
    """Adagrad in float64, straight from the formula."""
    w, acc = np.asarray(w0, np.float64).copy(), np.zeros(np.shape(w0))
    for g in grads:
        acc += np.asarray(g, np.float64) ** 2
        w -= lr * g / (np.sqrt(acc) + eps)
    return w, acc


def test_adagrad_exact_after_known_pushes(shards):
    lr, eps = 0.1, 1e-3
    s = shards("--lr", str(lr), "--eps", str(eps), *FROM_ZERO)
    # 5000 values in chunks of 4 KiB: every block arrives in several chunks.
    with ParamClient([s.address], worker_id="w", chunk_bytes=4096) as ps:
        w0 = np.linspace(-1, 1, 5000, dtype=np.float32).reshape(50, 100)
        b0 = np.array([1.0, 2.0, 3.0], np.float32)
        ps.init({"stage1.W": w0, "bias": b0})
        g1 = np.full((50, 100), 2.0, np.float32)
        g2 = np.arange(5000, dtype=np.float32).reshape(50, 100) / 1000
        ps.wait(ps.push({"stage1.W": g1, "bias": np.array([0.5, -1.0, 0.0], np.float32)}))
        ps.wait(ps.push({"stage1.W": g2}))
        got = ps.pull()
        acc = ps.pull(accumulators=True)
        w_exp, acc_exp = adagrad_expected(w0, [g1, g2], lr, eps)
        np.testing.assert_allclose(got["stage1.W"], w_exp, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(acc["stage1.W"], acc_exp, rtol=1e-6)
        # bias: acc = g*g; w -= 0.1 * g / (|g| + eps)
        b_exp, bacc_exp = adagrad_expected(b0, [np.array([0.5, -1.0, 0.0])], lr, eps)
        np.testing.assert_allclose(got["bias"], b_exp, rtol=1e-6)
        np.testing.assert_array_equal(acc["bias"], bacc_exp.astype(np.float32))
        assert got["stage1.W"].shape == (50, 100)
        versions = {b.name: b.version for b in ps.list_blocks()[0].blocks}
        assert versions == {"stage1.W": 2, "bias": 1}


def test_four_concurrent_pushers_lose_nothing(shards):
    lr, eps, n_each = 0.05, 1e-8, 25
    addrs = [shards("--lr", str(lr), "--eps", str(eps), *FROM_ZERO).address for _ in range(2)]
    # 2-D blocks too: the pushers never pull, so shapes come from their gradients
    blocks = {f"b{i}": np.full((10 * (i + 1), 100), 1.0, np.float32) for i in range(4)}
    with ParamClient(addrs, worker_id="init") as ps:
        ps.init(blocks)
        placement = dict(ps.placement)
    assert set(placement.values()) == {0, 1}

    def pusher(k: int) -> None:
        with ParamClient(addrs, worker_id=f"pusher-{k}", placement=placement) as c:
            ones = {n: np.ones_like(v) for n, v in blocks.items()}
            tickets = [c.push(ones) for _ in range(n_each)]
            for t in tickets:
                c.wait(t)

    threads = [threading.Thread(target=pusher, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = 4 * n_each
    with ParamClient(addrs, placement=placement) as ps:
        got, acc = ps.pull(), ps.pull(accumulators=True)
        versions = {b.name: b.version for r in ps.list_blocks() for b in r.blocks}
    # With g = 1 everywhere the order does not matter: after k pushes acc = k,
    # and the k-th push subtracts lr / (sqrt(k) + eps).
    w_exp = 1.0 - sum(lr / (np.sqrt(k) + eps) for k in range(1, total + 1))
    for n in blocks:
        np.testing.assert_array_equal(acc[n], np.full_like(blocks[n], total))
        np.testing.assert_allclose(got[n], w_exp, rtol=1e-5)
        assert versions[n] == total


def test_retried_push_is_applied_once(shards):
    s = shards("--lr", "0.5", "--eps", "0", *FROM_ZERO)
    with ParamClient([s.address], worker_id="w7") as ps:
        ps.init({"x": np.ones(8, np.float32)})
        g = {"x": np.ones(8, np.float32)}
        first = ps._push_shard(0, ["x"], g, seq=41)
        retry = ps._push_shard(0, ["x"], g, seq=41)
        assert not first.duplicate and retry.duplicate
        # applied once: acc = 1, w = 1 - 0.5 * 1 / 1
        np.testing.assert_array_equal(ps.pull()["x"], np.full(8, 0.5, np.float32))
        assert retry.blocks[0].version == 1
        # another seq from the same worker is a new push
        ps._push_shard(0, ["x"], g, seq=42)
        np.testing.assert_allclose(ps.pull()["x"], 0.5 - 0.5 / np.sqrt(2), rtol=1e-6)


def test_checkpoint_sigkill_restart_identical(shards, tmp_path):
    ck = tmp_path / "ckpt"
    flags = ("--lr", "0.1", "--checkpoint-dir", str(ck), "--shard-index", "0")
    s = shards(*flags)
    rng = np.random.default_rng(0)
    blocks = {f"layer{i}": rng.standard_normal((64, 33)).astype(np.float32) for i in range(3)}
    with ParamClient([s.address], worker_id="w", chunk_bytes=2048) as ps:
        ps.init(blocks)
        for _ in range(3):
            last_seq = ps.push({n: rng.standard_normal(v.shape).astype(np.float32) for n, v in blocks.items()})
            ps.wait(last_seq)  # a push's ticket is its sequence number
        resp = ps.checkpoint("step-3")[0]
        assert resp.num_blocks == 3 and Path(resp.path).exists()
        w_before, acc_before = ps.pull(), ps.pull(accumulators=True)
        versions = {b.name: b.version for b in ps.list_blocks()[0].blocks}
        applied = ps._push_shard(0, ["layer0"], {"layer0": np.zeros(64 * 33, np.float32)}, seq=999)
        assert not applied.duplicate
    assert s.kill(signal.SIGKILL) == -signal.SIGKILL
    assert not list(ck.rglob("*.tmp-*")), "no temporary files left behind"

    s2 = shards(*flags, "--restore", "step-3")
    with ParamClient([s2.address], worker_id="w", placement={n: 0 for n in blocks}) as ps:
        w_after, acc_after = ps.pull(), ps.pull(accumulators=True)
        for n in blocks:
            np.testing.assert_array_equal(w_after[n], w_before[n])
            np.testing.assert_array_equal(acc_after[n], acc_before[n])
        assert {b.name: b.version for b in ps.list_blocks()[0].blocks} == versions
        # seq 999 came after the checkpoint: it is not remembered and applies now;
        # seqs before the checkpoint still count as applied.
        assert not ps._push_shard(0, ["layer0"], {"layer0": np.zeros(64 * 33, np.float32)}, seq=999).duplicate
        assert ps._push_shard(0, ["layer0"], {"layer0": np.zeros(64 * 33, np.float32)}, seq=last_seq).duplicate


def _raw_push(address: str, chunks: list[tuple[common_pb2.TensorChunk, bytes]], worker="bad", seq=1, commit=True):
    ch = open_channel(address)
    try:
        push = ch.stream_unary(
            "/downpour.v1.ParameterServer/Push",
            request_serializer=None,
            response_deserializer=pb.PushResponse.FromString,
        )
        msgs = [
            codec.encode(pb.PushRequest(worker_id=worker, seq=seq, chunk=c), PUSH_PAYLOAD, data) for c, data in chunks
        ]
        if commit:
            msgs.append(pb.PushRequest(worker_id=worker, seq=seq, commit=True).SerializeToString())
        return push(iter(msgs), timeout=30)
    finally:
        ch.close()


def _chunk(name, shape, dtype=common_pb2.DTYPE_FLOAT32, offset=0, last=True):
    return common_pb2.TensorChunk(name=name, dtype=dtype, shape=shape, offset=offset, last=last)


GOOD = np.ones(4096, np.float32)
BAD_INPUTS = {
    "nan": (
        [(_chunk("stage1.W1", [64, 64]), np.where(np.arange(4096) == 17, np.nan, 1).astype(np.float32).tobytes())],
        grpc.StatusCode.INVALID_ARGUMENT,
        r"block 'stage1.W1': gradient contains NaN or Inf",
    ),
    "inf": (
        [(_chunk("stage1.W1", [64, 64]), np.where(np.arange(4096) == 4095, -np.inf, 1).astype(np.float32).tobytes())],
        grpc.StatusCode.INVALID_ARGUMENT,
        r"NaN or Inf",
    ),
    "wrong_shape": (
        [(_chunk("stage1.W1", [4096]), GOOD.tobytes())],
        grpc.StatusCode.INVALID_ARGUMENT,
        r"block 'stage1.W1': shape \[4096\] does not match the block's \[64, 64\]",
    ),
    "wrong_dtype": (
        [(_chunk("stage1.W1", [64, 64], dtype=common_pb2.DTYPE_FLOAT64), np.ones(4096).tobytes())],
        grpc.StatusCode.INVALID_ARGUMENT,
        r"block 'stage1.W1': dtype float64, expected float32",
    ),
    "unknown_block": (
        [(_chunk("stage9.W", [64, 64]), GOOD.tobytes())],
        grpc.StatusCode.NOT_FOUND,
        r"unknown block 'stage9.W'",
    ),
    "truncated_values": (
        [(_chunk("stage1.W1", [64, 64]), GOOD[:4095].tobytes())],
        grpc.StatusCode.INVALID_ARGUMENT,
        r"block 'stage1.W1': expected 4096 float32 values, got 4095",
    ),
    "truncated_bytes": (
        [(_chunk("stage1.W1", [64, 64]), GOOD.tobytes()[:-3])],
        grpc.StatusCode.INVALID_ARGUMENT,
        r"16381 bytes, not a whole number of float32 values",
    ),
    "out_of_order": (
        [(_chunk("stage1.W1", [64, 64], offset=2048, last=False), GOOD[:2048].tobytes())],
        grpc.StatusCode.INVALID_ARGUMENT,
        r"chunk at offset 2048, expected 0",
    ),
    "nan_in_second_chunk": (
        [
            (_chunk("stage1.W1", [64, 64], last=False), GOOD[:2048].tobytes()),
            (_chunk("stage1.W1", [64, 64], offset=2048), np.full(2048, np.nan, np.float32).tobytes()),
        ],
        grpc.StatusCode.INVALID_ARGUMENT,
        r"NaN or Inf \(chunk at offset 2048\)",
    ),
    "over_limit": (
        [(_chunk("stage1.W1", [64, 64]), np.ones(300_000, np.float32).tobytes())],
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        r"(?i)larger than max",
    ),
    # a stream that stops before a block is complete and without commit
    "no_commit": (
        [(_chunk("stage1.W1", [64, 64], last=False), GOOD[:2048].tobytes())],
        grpc.StatusCode.INVALID_ARGUMENT,
        r"push ended without commit",
    ),
}

# what the shard's structured refusal names (None: refused by gRPC itself, before the shard saw it)
REFUSAL = {
    "nan": "NOT_FINITE",
    "inf": "NOT_FINITE",
    "wrong_shape": "WRONG_SHAPE",
    "wrong_dtype": "WRONG_DTYPE",
    "unknown_block": "UNKNOWN_BLOCK",
    "truncated_values": "TRUNCATED",
    "truncated_bytes": "TRUNCATED",
    "out_of_order": "OUT_OF_ORDER",
    "nan_in_second_chunk": "NOT_FINITE",
    "over_limit": None,
    "no_commit": "NO_COMMIT",
}


@pytest.fixture(scope="module")
def strict_shard(tmp_path_factory):
    with harness.Procs(tmp_path_factory.mktemp("strict")) as procs:
        s = procs.serve("paramserver", "--lr", "0.1", "--max-message-bytes", str(1 << 20))
        with ParamClient([s.address], worker_id="init", chunk_bytes=64 << 10) as ps:
            ps.init({"stage1.W1": np.arange(4096, dtype=np.float32).reshape(64, 64), "other": np.zeros(10, np.float32)})
        yield s


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_push_is_refused_and_changes_nothing(strict_shard, case):
    chunks, code, pattern = BAD_INPUTS[case]
    reason = REFUSAL[case]
    with ParamClient([strict_shard.address], placement={"stage1.W1": 0, "other": 0}, chunk_bytes=64 << 10) as ps:
        before = (ps.pull(), ps.pull(accumulators=True), [(b.name, b.version) for b in ps.list_blocks()[0].blocks])
        with pytest.raises(grpc.RpcError) as err:
            _raw_push(strict_shard.address, chunks, commit=case != "no_commit")
        assert err.value.code() == code, err.value.details()
        assert re.search(pattern, err.value.details()), err.value.details()  # a message people can act on
        # ...and the same as data: nothing applied, the refused block and why.
        got = refusal(err.value)
        if reason is None:  # refused by gRPC itself, before the shard saw it
            assert got is None
        else:
            assert list(got.applied) == [] and len(got.refused) == 1, got
            assert got.refused[0].reason == pb.RefusalReason.Value(f"REFUSAL_REASON_{reason}"), got
            assert got.refused[0].block == (
                "stage9.W" if case == "unknown_block" else "" if case == "no_commit" else "stage1.W1"
            )
        after = (ps.pull(), ps.pull(accumulators=True), [(b.name, b.version) for b in ps.list_blocks()[0].blocks])
    for a, b in zip(before[:2], after[:2]):
        for n in a:
            np.testing.assert_array_equal(a[n], b[n])
    assert before[2] == after[2]


def test_push_is_atomic_per_block_and_a_retry_completes_it(shards):
    """A good block before a bad one is applied; the bad one is not; retrying
    the same (worker_id, seq) with a good gradient applies only the missing block."""
    s = shards("--lr", "0.5", "--eps", "0", *FROM_ZERO)
    with ParamClient([s.address], worker_id="init") as ps:
        ps.init({"a": np.ones(16, np.float32), "b": np.ones(16, np.float32)})
        good = np.ones(16, np.float32).tobytes()
        bad = np.full(16, np.inf, np.float32).tobytes()
        with pytest.raises(grpc.RpcError) as err:
            _raw_push(s.address, [(_chunk("a", [16]), good), (_chunk("b", [16]), bad)], worker="w", seq=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        got = refusal(err.value)  # what was applied and what refused, as data
        assert got is not None and list(got.applied) == ["a"]
        assert [(r.block, r.reason) for r in got.refused] == [("b", pb.REFUSAL_REASON_NOT_FINITE)]
        got = ps.pull(["a", "b"])
        np.testing.assert_array_equal(got["a"], 0.5)  # 1 - 0.5 * 1 / sqrt(1)
        np.testing.assert_array_equal(got["b"], 1.0)
        retry = _raw_push(s.address, [(_chunk("a", [16]), good), (_chunk("b", [16]), good)], worker="w", seq=5)
        assert not retry.duplicate
        got = ps.pull(["a", "b"])
        np.testing.assert_array_equal(got["a"], 0.5)  # not applied twice
        np.testing.assert_array_equal(got["b"], 0.5)
        again = _raw_push(s.address, [(_chunk("a", [16]), good), (_chunk("b", [16]), good)], worker="w", seq=5)
        assert again.duplicate
        assert {b.name: b.version for b in ps.list_blocks()[0].blocks} == {"a": 1, "b": 1}


def test_pull_unknown_block_is_not_found(strict_shard):
    with ParamClient([strict_shard.address], placement={"nope": 0}) as ps:
        with pytest.raises(grpc.RpcError) as err:
            ps.pull(["nope"])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in err.value.details()


def test_metrics_health_and_graceful_sigterm(shards, tmp_path):
    s = shards(metrics=True)
    with ParamClient([s.address], worker_id="m") as ps:
        ps.init({"a": np.zeros(16, np.float32)})
        ps.wait(ps.push({"a": np.ones(16, np.float32)}))
        ps.wait(ps.push({"a": np.ones(16, np.float32)}))
        with pytest.raises(grpc.RpcError):
            ps.wait(ps.push({"a": np.full(16, np.nan, np.float32)}))
    text = s.metrics()
    assert re.search(
        r'grpc_server_handled_total\{grpc_code="OK",grpc_method="Push",grpc_service="downpour.v1.ParameterServer",grpc_type="client_stream"\} 2.0',
        text,
    )
    assert re.search(r'grpc_server_handled_total\{grpc_code="INVALID_ARGUMENT",grpc_method="Push",[^}]*\} 1.0', text)
    assert 'grpc_server_handling_seconds_count{grpc_method="Push"' in text
    assert 'downpour_paramserver_pushes_total{outcome="rejected",shard="0"} 1.0' in text
    # both pushes were computed against version 0: lags 0 and 1
    assert 'downpour_paramserver_staleness_versions_count{shard="0"} 2.0' in text
    assert 'downpour_paramserver_staleness_versions_sum{shard="0"} 1.0' in text
    assert s.kill(signal.SIGTERM) == 0


def test_reflection_lists_the_services(strict_shard):
    ch = open_channel(strict_shard.address)
    try:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(
            stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        )
    finally:
        ch.close()
    names = {s.name for s in resp.list_services_response.service}
    assert {"downpour.v1.ParameterServer", "grpc.health.v1.Health"} <= names


def test_bearer_token_hook(shards, tmp_path):
    token = tmp_path / "token"
    token.write_text("a-token-of-24-characters\n")
    s = shards("--token-file", str(token))  # health needs no token: the fixture got SERVING
    with ParamClient([s.address], channel_config=ChannelConfig(token="wrong")) as ps:
        with pytest.raises(grpc.RpcError) as err:
            ps.list_blocks()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with ParamClient([s.address], channel_config=ChannelConfig(token="a-token-of-24-characters")) as ps:
        ps.init({"a": np.zeros(4, np.float32)})
        assert [b.name for b in ps.list_blocks()[0].blocks] == ["a"]


@pytest.mark.parametrize("shared", [False, True])
def test_a_new_client_under_the_same_worker_id_is_not_taken_for_a_retry(shards, shared):
    """A worker that takes its slot again builds a new client with its old worker_id: its
    pushes must be applied, not dropped as repeats of the first client's sequence numbers."""
    s = shards("--lr", "0.1", "--eps", "1e-3")
    with ParamClient([s.address], worker_id="init") as ps:
        ps.init({"w": np.zeros(4, np.float32)})
    for _ in range(2):
        with ParamClient([s.address], worker_id="same", placement={"w": 0}, shared=shared) as ps:
            ps.pull(["w"])
            for _ in range(3):
                ps.push_pull({"w": np.ones(4, np.float32)})
    with ParamClient([s.address], worker_id="reader") as ps:
        assert {b.name: b.version for b in ps.list_blocks()[0].blocks} == {"w": 6}
