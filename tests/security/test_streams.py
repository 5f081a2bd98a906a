"""One connection cannot take every ``--max-concurrent-rpcs`` slot: the server caps the calls of
one connection (``--max-streams-per-connection``, by default half the slots).

A client with the token used to open as many streams as it liked on one connection (here
Health/Watch, which stays open): with all of a service's slots held, every other client's call
was answered RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import harness
from downpour.rpc.channel import read_token
from downpour.rpc.server import streams_per_connection
from downpour.v1 import paramserver_pb2

pytestmark = pytest.mark.slow

SLOTS = 4
HOSTILE_STREAMS = 8


def _connection(address: str) -> grpc.Channel:
    # its own TCP connection: channels to one address otherwise share one
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def test_one_connection_cannot_hold_every_slot(tmp_path, procs):
    token_file = tmp_path / "token"
    token_file.write_text("t" * 32 + "\n")
    auth = (("authorization", f"Bearer {read_token(str(token_file))}"),)
    s = procs.serve("paramserver", "--token-file", str(token_file), "--max-concurrent-rpcs", str(SLOTS), metrics=True)
    cap = streams_per_connection(0, SLOTS)
    assert cap < SLOTS

    hostile = _connection(s.address)
    health = health_pb2_grpc.HealthStub(hostile)
    health.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connected: the server's settings are known
    lock, outcomes = threading.Lock(), []
    watches = [health.Watch(health_pb2.HealthCheckRequest(), metadata=auth) for _ in range(HOSTILE_STREAMS)]

    def first(w) -> None:
        try:
            next(w)
            got = "ok"
        except grpc.RpcError as e:
            got = e.code().name
        with lock:
            outcomes.append(got)

    threads = [threading.Thread(target=first, args=(w,), daemon=True) for w in watches]
    for t in threads:
        t.start()

    def watching() -> float:
        return s.metric("grpc_server_started_total", grpc_method="Watch") or 0.0

    # Every watch has its first answer or its refusal (before the cap, the slots ran out).
    harness.wait_for(
        lambda: len(outcomes) == HOSTILE_STREAMS, 30, "the hostile connection's watches to start", procs=[s]
    )
    try:
        with _connection(s.address) as other:
            call = other.unary_unary(
                "/downpour.v1.ParameterServer/ListBlocks",
                request_serializer=paramserver_pb2.ListBlocksRequest.SerializeToString,
                response_deserializer=paramserver_pb2.ListBlocksResponse.FromString,
            )
            assert call(paramserver_pb2.ListBlocksRequest(), metadata=auth, timeout=10).shard_index == 0
        # cap watches are open; the rest were refused at once, and hold nothing
        assert sorted(outcomes) == sorted(["ok"] * cap + ["RESOURCE_EXHAUSTED"] * (HOSTILE_STREAMS - cap)), outcomes
        # most by the cap, counted; the ones that arrived while the refused were still in flight, by the
        # server's own --max-concurrent-rpcs check
        assert (s.metric("downpour_grpc_connection_capped_total", grpc_method="Watch") or 0) >= 1
        assert watching() >= cap + 1
    finally:
        for w in watches:
            w.cancel()
        hostile.close()
