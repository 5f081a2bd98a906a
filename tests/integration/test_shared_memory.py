"""The co-located data plane (paramserver.shared) against a real shard process.

The shard makes a sealed region and sends it to the client's Unix socket in
/dev/shm; pulls and pushes through it must
give exactly what Pull and Push give (Adagrad checked against the formula in
float64), a retried push must apply at most once, and every hostile attach
or gradient must be refused with its status code and change nothing.
"""

from __future__ import annotations

import os

import grpc
import numpy as np
import pytest

from downpour.paramserver import shared as shm
from downpour.paramserver.client import ParamClient, refusal
from downpour.rpc import lowp
from downpour.rpc.channel import open_channel
from downpour.v1 import common_pb2
from downpour.v1 import paramserver_pb2 as pb
from test_paramserver import adagrad_expected

pytestmark = pytest.mark.skipif(not shm.usable(), reason="no writable /dev/shm on this machine")

LR, EPS = 0.1, 1e-3
# Accumulators from zero (the job's default is 0.1): the expectations are the formula's from acc = 0.
FLAGS = ("--lr", str(LR), "--eps", str(EPS), "--initial-accumulator", "0")
PLACE = {"a": 0, "b": 0}


def _blocks():
    return {
        "a": np.linspace(-1, 1, 3000, dtype=np.float32).reshape(30, 100),
        "b": np.array([1.0, 2.0, 3.0], np.float32),
    }


def _stub(address: str):
    ch = open_channel(address)
    attach = ch.unary_unary(
        "/downpour.v1.ParameterServer/AttachShared",
        request_serializer=pb.AttachSharedRequest.SerializeToString,
        response_deserializer=pb.AttachSharedResponse.FromString,
    )
    pp = ch.unary_unary(
        "/downpour.v1.ParameterServer/PushPullShared",
        request_serializer=pb.PushPullSharedRequest.SerializeToString,
        response_deserializer=pb.PushPullSharedResponse.FromString,
    )
    return ch, attach, pp


def attach_raw(attach, worker: str, names: list[str], n: int) -> tuple[shm.Region, pb.AttachSharedResponse]:
    """AttachShared as ParamClient does it, by hand: listen, ask, take the region the shard sent."""
    listener, path = shm.listen()
    token = os.urandom(shm.TOKEN_BYTES)
    try:
        r = attach(pb.AttachSharedRequest(worker_id=worker, path=path, token=token, names=names), timeout=10)
        return shm.receive(listener, token, n), r
    finally:
        listener.close()
        os.unlink(path)


def test_shared_pushes_and_pulls_are_exact_and_link_is_used(shards):
    s = shards(*FLAGS)
    w0 = _blocks()
    g1 = {"a": np.full((30, 100), 2.0, np.float32), "b": np.array([0.5, -1.0, 0.0], np.float32)}
    g2 = {"a": np.arange(3000, dtype=np.float32).reshape(30, 100) / 1000, "b": np.array([1.0, 1.0, 1.0], np.float32)}
    with ParamClient([s.address], worker_id="init") as ps:
        ps.init(w0)
    with ParamClient([s.address], worker_id="w", shared=True, placement=PLACE) as ps:
        first = ps.pull(["a", "b"])  # through gRPC: the client learns the shapes, then maps a file
        np.testing.assert_array_equal(first["a"], w0["a"])
        assert ps.pull(["a", "b"])["b"].tolist() == [1.0, 2.0, 3.0]
        assert ps.links.links and all(isinstance(v, object) and v is not False for v in ps.links.links.values())
        link = ps.links.links[0]
        assert set(link.names) == {"a", "b"}
        assert not [f for f in os.listdir(shm.SHM_DIR) if f.startswith(f"downpour-{os.getpid()}-")]  # socket gone
        ps.wait(ps.push(g1))
        got = ps.push_pull(g2)
        versions = {b.name: b.version for b in ps.list_blocks()[0].blocks}
    for n in w0:
        w_exp, _ = adagrad_expected(w0[n], [g1[n], g2[n]], LR, EPS)
        np.testing.assert_allclose(got[n], w_exp, rtol=1e-6, atol=1e-7)
    assert got["a"].shape == (30, 100)
    assert versions == {"a": 2, "b": 2}
    # The same result through plain gRPC, read independently.
    with ParamClient([s.address], worker_id="reader", placement=PLACE) as ps:
        plain = ps.pull(["a", "b"])
        acc = ps.pull(["a"], accumulators=True)
    np.testing.assert_array_equal(plain["a"], got["a"])
    np.testing.assert_allclose(acc["a"], (g1["a"].astype(np.float64) ** 2 + g2["a"].astype(np.float64) ** 2), rtol=1e-6)


def test_retried_shared_push_applies_once_and_bad_gradients_change_nothing(shards):
    s = shards(*FLAGS)
    w0 = _blocks()
    with ParamClient([s.address], worker_id="init") as ps:
        ps.init(w0)
    ch, attach, pp = _stub(s.address)
    n = 3003
    region, r = attach_raw(attach, "raw", ["a", "b"], n)
    try:
        assert [b.name for b in r.blocks] == ["a", "b"]
        region.grads[:] = 1.0
        first = pp(pb.PushPullSharedRequest(worker_id="raw", seq=7, push=True, pull=True), timeout=10)
        again = pp(pb.PushPullSharedRequest(worker_id="raw", seq=7, push=True, pull=True), timeout=10)
        assert not first.duplicate and again.duplicate
        assert list(again.versions) == [1, 1]
        after_one = region.weights.copy()
        np.testing.assert_allclose(after_one[:3000], w0["a"].reshape(-1) - LR / (1 + EPS), rtol=1e-6)
        # A NaN anywhere: refused, nothing applied (checked through plain gRPC).
        region.grads[3001] = np.nan
        with pytest.raises(grpc.RpcError) as e:
            pp(pb.PushPullSharedRequest(worker_id="raw", seq=8, push=True), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in e.value.details()
        got = refusal(e.value)  # every block is checked before any is applied: none was
        assert got is not None and list(got.applied) == []
        assert [(r.block, r.reason) for r in got.refused] == [("b", pb.REFUSAL_REASON_NOT_FINITE)]
        with pytest.raises(grpc.RpcError) as e:
            pp(pb.PushPullSharedRequest(worker_id="raw", seq=0, push=True), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with ParamClient([s.address], worker_id="reader", placement=PLACE) as ps:
            now = ps.pull(["a", "b"])
        np.testing.assert_array_equal(np.concatenate([now["a"].reshape(-1), now["b"]]), after_one)
        with pytest.raises(grpc.RpcError) as e:
            pp(pb.PushPullSharedRequest(worker_id="nobody", pull=True), timeout=10)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        region.close()
        ch.close()


def test_hostile_attach_requests_are_refused(shards, tmp_path):
    s = shards()
    with ParamClient([s.address], worker_id="init") as ps:
        ps.init(_blocks())
    ch, attach, _ = _stub(s.address)
    listener, sock = shm.listen()
    token = os.urandom(shm.TOKEN_BYTES)
    link = os.path.join(shm.SHM_DIR, f"downpour-link-{os.getpid()}")
    os.symlink(sock, link)
    plain = os.path.join(shm.SHM_DIR, f"downpour-plain-{os.getpid()}")
    open(plain, "wb").close()
    cases = [
        ("/etc/passwd", token, ["a", "b"], grpc.StatusCode.INVALID_ARGUMENT),
        (str(tmp_path / "downpour-x"), token, ["a", "b"], grpc.StatusCode.INVALID_ARGUMENT),
        (os.path.join(shm.SHM_DIR, "..", "etc", "downpour-x"), token, ["a", "b"], grpc.StatusCode.INVALID_ARGUMENT),
        (link, token, ["a", "b"], grpc.StatusCode.FAILED_PRECONDITION),  # a link, not a socket
        (plain, token, ["a", "b"], grpc.StatusCode.FAILED_PRECONDITION),  # a file, not a socket
        (sock, b"short", ["a", "b"], grpc.StatusCode.INVALID_ARGUMENT),
        (sock, token, ["a", "a"], grpc.StatusCode.INVALID_ARGUMENT),
        (sock, token, ["nope"], grpc.StatusCode.NOT_FOUND),
        (sock, token, [], grpc.StatusCode.INVALID_ARGUMENT),
        (os.path.join(shm.SHM_DIR, "downpour-missing-0"), token, ["a", "b"], grpc.StatusCode.FAILED_PRECONDITION),
    ]
    try:
        for path, tok, names, code in cases:
            with pytest.raises(grpc.RpcError) as e:
                attach(pb.AttachSharedRequest(worker_id="h", path=path, token=tok, names=names), timeout=10)
            assert e.value.code() == code, (path, names, e.value.details())
        with pytest.raises(ValueError, match="sent no region"):  # nothing was sent for any of them
            shm.receive(listener, token, 3003)
    finally:
        os.unlink(link)
        os.unlink(plain)
        listener.close()
        os.unlink(sock)
        ch.close()
    with ParamClient([s.address], worker_id="reader", placement=PLACE) as ps:
        np.testing.assert_array_equal(ps.pull(["b"])["b"], [1.0, 2.0, 3.0])


def test_client_falls_back_to_grpc_where_the_shard_cannot_map_its_file(shards, monkeypatch):
    """A shard on another host: simulated by a client whose files the shard cannot see."""
    s = shards(*FLAGS)
    w0 = _blocks()
    with ParamClient([s.address], worker_id="init") as ps:
        ps.init(w0)
    real_listen = shm.listen
    elsewhere = []

    def listen_and_hide(directory=shm.SHM_DIR):
        listener, path = real_listen(directory)
        hidden = path + "-moved"
        os.rename(path, hidden)  # the shard looks for the socket at path and finds nothing
        elsewhere.append(hidden)
        return listener, path

    monkeypatch.setattr(shm, "listen", listen_and_hide)
    g = {"a": np.ones((30, 100), np.float32), "b": np.ones(3, np.float32)}
    with ParamClient([s.address], worker_id="w", shared=True, placement=PLACE) as ps:
        ps.pull(["a", "b"])
        got = ps.push_pull(g)
        assert ps.links.links == {0: False}
    assert elsewhere
    for path in elsewhere:
        os.unlink(path)
    np.testing.assert_allclose(got["b"], w0["b"] - LR / (1 + EPS), rtol=1e-6)


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_reduced_precision_on_the_wire_is_applied_in_float32(shards, wire):
    """A 16-bit gradient is widened exactly and applied to float32 master weights;
    a 16-bit pull is the shard's float32 values rounded once."""
    s = shards(*FLAGS)
    w0 = _blocks()
    rng = np.random.default_rng(1)
    g = {"a": rng.standard_normal((30, 100)).astype(np.float32), "b": np.array([0.3, -0.7, 1e-3], np.float32)}
    dt = lowp.WIRE_DTYPES[wire]
    with ParamClient([s.address], worker_id="init") as ps:
        ps.init(w0)
    with ParamClient([s.address], worker_id="w", placement=PLACE, wire_dtype=wire) as ps:
        ps.wait(ps.push(g))
        low = ps.pull(["a", "b"])
    with ParamClient([s.address], worker_id="reader", placement=PLACE) as ps:
        full = ps.pull(["a", "b"])
    for n in w0:
        sent = lowp.decode(lowp.encode(g[n].reshape(-1), dt).tobytes(), dt).reshape(g[n].shape)
        w_exp, _ = adagrad_expected(w0[n], [sent], LR, EPS)
        np.testing.assert_allclose(full[n], w_exp, rtol=1e-6, atol=1e-7)  # float32 master weights
        rounded = lowp.decode(lowp.encode(full[n].reshape(-1), dt).tobytes(), dt).reshape(full[n].shape)
        np.testing.assert_array_equal(low[n], rounded)
    assert common_pb2.DTYPE_FLOAT32 != dt
    with pytest.raises(ValueError, match="wire_dtype"):
        ParamClient([s.address], wire_dtype="int8")
