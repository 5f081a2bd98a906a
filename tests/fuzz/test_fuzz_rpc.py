"""Fuzzing every RPC of every service, against live server processes.

Hypothesis draws request messages from each message's descriptor (extreme
integers, NaN/Inf, unknown enums, hostile strings, arbitrary bytes), plus raw
byte strings that are not valid protobuf at all, and sends them to real
``downpour serve <role>`` processes on loopback. Every answer must be a
deliberate status (no UNKNOWN or INTERNAL, i.e. no unhandled exception), no
call may hang past its deadline, every process must still be alive and
SERVING at the end, and a rejected push must leave the parameters unchanged
(except blocks the shard says it applied before the bad one: a push is
atomic per block).

The run is time-bounded: ``DOWNPOUR_FUZZ_SECONDS`` (default 40) split over
the RPCs; it must send at least ``DOWNPOUR_FUZZ_MIN_MESSAGES`` (default 10000).
"""

from __future__ import annotations

import os
import time

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import harness
from downpour.paramserver.client import ParamClient, refusal
from downpour.paramserver.server import PULL_PAYLOAD, PUSH_PAYLOAD
from downpour.rpc import codec
from downpour.v1 import common_pb2
from downpour.v1 import coordinator_pb2 as cpb
from downpour.v1 import feeder_pb2 as fpb
from downpour.v1 import neurons_pb2 as npb
from downpour.v1 import paramserver_pb2 as ppb
from downpour.v1 import worker_pb2 as wpb
from strategies import messages, raw_bytes

pytestmark = pytest.mark.slow

SECONDS = float(os.environ.get("DOWNPOUR_FUZZ_SECONDS", "40"))
MIN_MESSAGES = int(os.environ.get("DOWNPOUR_FUZZ_MIN_MESSAGES", "10000"))
BAD = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

U, SS, CS, BI = "unary", "server_stream", "client_stream", "bidi"
# (service role, full method, kind, request class)
RPCS = [
    ("paramserver", "/downpour.v1.ParameterServer/CreateBlocks", CS, ppb.CreateBlocksRequest),
    ("paramserver", "/downpour.v1.ParameterServer/Pull", SS, ppb.PullRequest),
    ("paramserver", "/downpour.v1.ParameterServer/Push", CS, ppb.PushRequest),
    ("paramserver", "/downpour.v1.ParameterServer/ListBlocks", U, ppb.ListBlocksRequest),
    ("paramserver", "/downpour.v1.ParameterServer/Checkpoint", U, ppb.CheckpointRequest),
    ("paramserver", "/downpour.v1.ParameterServer/Restore", U, ppb.RestoreRequest),
    ("paramserver", "/downpour.v1.ParameterServer/SetOptimizer", U, ppb.SetOptimizerRequest),
    ("paramserver", "/downpour.v1.ParameterServer/AttachShared", U, ppb.AttachSharedRequest),
    ("paramserver", "/downpour.v1.ParameterServer/PushPullShared", U, ppb.PushPullSharedRequest),
    ("coordinator", "/downpour.v1.Coordinator/Register", U, cpb.RegisterRequest),
    ("coordinator", "/downpour.v1.Coordinator/Deregister", U, cpb.DeregisterRequest),
    ("coordinator", "/downpour.v1.Coordinator/Heartbeat", U, cpb.HeartbeatRequest),
    ("coordinator", "/downpour.v1.Coordinator/ReportProgress", U, cpb.ReportProgressRequest),
    ("coordinator", "/downpour.v1.Coordinator/JobStatus", U, cpb.JobStatusRequest),
    ("coordinator", "/downpour.v1.Coordinator/CreateCheckpoint", U, cpb.CreateCheckpointRequest),
    ("coordinator", "/downpour.v1.Coordinator/ListCheckpoints", U, cpb.ListCheckpointsRequest),
    ("feeder", "/downpour.v1.DataFeeder/StreamBatches", SS, fpb.StreamBatchesRequest),
    ("feeder", "/downpour.v1.DataFeeder/DatasetInfo", U, fpb.DatasetInfoRequest),
    ("worker", "/downpour.v1.ModelWorker/Exchange", BI, wpb.ExchangeRequest),
    ("worker", "/downpour.v1.ModelWorker/Status", U, wpb.StatusRequest),
    ("neurons", "/downpour.v1.Neurons/GetActivations", U, npb.GetActivationsRequest),
    ("neurons", "/downpour.v1.Neurons/TopInputs", U, npb.TopInputsRequest),
    ("neurons", "/downpour.v1.Neurons/OptimalStimulus", U, npb.OptimalStimulusRequest),
    ("neurons", "/downpour.v1.Neurons/DescribeModel", U, npb.DescribeModelRequest),
]
BUDGET = SECONDS / len(RPCS)
SENT = {"messages": 0, "calls": 0, "codes": {}}

JOB = """preset: tiny
replicas: 1
shards: 1
steps: 1000000
batch_size: 8
checkpoint_every: 1000000
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    (d / "job.yaml").write_text(JOB)
    with harness.Procs(d) as started:
        procs: dict[str, harness.Service] = {}

        def start(role, *args):
            procs[role] = started.serve(role, *args, wait=False)

        ck = str(d / "ck")
        start("paramserver", "--checkpoint-dir", ck)
        start("feeder", "--config", str(d / "job.yaml"))
        start("neurons", "--random-seed", "0", "--preset", "tiny", "--max-images", "16")
        # A worker whose coordinator never answers keeps serving its own RPCs while it retries.
        start("worker", "--coordinator", f"127.0.0.1:{harness.free_port()}")
        for p in procs.values():
            p.wait_serving(90)
        start(
            "coordinator",
            "--config",
            str(d / "job.yaml"),
            "--shards",
            procs["paramserver"].address,
            "--feeder",
            procs["feeder"].address,
            "--state-dir",
            str(d / "state"),
            "--checkpoint-dir",
            ck,
        )
        procs["coordinator"].wait_serving(90)
        addr = {r: p.address for r, p in procs.items()}
        channels = {r: grpc.insecure_channel(a) for r, a in addr.items()}
        yield {"procs": procs, "addr": addr, "channels": channels, "dir": d}
        print(f"\nfuzz: {SENT['messages']} messages in {SENT['calls']} calls; status codes {SENT['codes']}")
        for ch in channels.values():
            ch.close()


def _call(channel, method, kind, items, timeout=5.0):
    """Send ``items`` (messages or raw bytes) as one call; returns the status code (OK included)."""
    ser = lambda m: m if isinstance(m, bytes) else m.SerializeToString()
    SENT["messages"] += len(items)
    SENT["calls"] += 1
    try:
        if kind == U:
            channel.unary_unary(method, request_serializer=ser, response_deserializer=None)(items[0], timeout=timeout)
        elif kind == SS:
            call = channel.unary_stream(method, request_serializer=ser, response_deserializer=None)(
                items[0], timeout=timeout
            )
            for i, _ in enumerate(call):
                if i >= 2:
                    call.cancel()
                    break
        elif kind == CS:
            channel.stream_unary(method, request_serializer=ser, response_deserializer=None)(
                iter(items), timeout=timeout
            )
        else:
            call = channel.stream_stream(method, request_serializer=ser, response_deserializer=None)(
                iter(items), timeout=1.0
            )
            for _ in call:
                pass
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
        if code in BAD:
            raise AssertionError(f"{method}: {code.name}: {e.details()}") from None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and kind != BI:
            raise AssertionError(f"{method}: no answer within {timeout}s (hang)") from None
        details = e.details() or ""
    else:
        details = ""
    SENT["codes"][code.name] = SENT["codes"].get(code.name, 0) + 1
    return code, details


def _items(cls, kind):
    """One example: a stream's messages, or (unary and server-streaming RPCs) a batch of separate calls."""
    one = st.one_of(messages(cls), messages(cls), raw_bytes())
    return st.lists(one, min_size=1, max_size=16)


def _pull_all(channel):
    pull = channel.unary_stream(
        "/downpour.v1.ParameterServer/Pull",
        request_serializer=ppb.PullRequest.SerializeToString,
        response_deserializer=lambda b: codec.decode(ppb.PullResponse, b, PULL_PAYLOAD),
    )
    out: dict[str, list] = {}
    for msg, payload in pull(ppb.PullRequest(), timeout=10):
        out.setdefault(msg.chunk.name, []).append(bytes(payload))
    return {k: b"".join(v) for k, v in out.items()}


@pytest.mark.parametrize("role,method,kind,cls", RPCS, ids=[m.rsplit("/", 1)[1] for _, m, _, _ in RPCS])
def test_fuzz(cluster, role, method, kind, cls):
    channel = cluster["channels"][role]
    end = time.monotonic() + BUDGET

    @settings(max_examples=20, deadline=None, database=None, derandomize=False, suppress_health_check=list(HealthCheck))
    @given(items=_items(cls, kind))
    def run(items):
        if time.monotonic() > end:
            return
        if kind in (U, SS):
            for item in items:
                _call(channel, method, kind, [item])
        else:
            _call(channel, method, kind, items)

    while time.monotonic() < end:  # fresh rounds of examples until this RPC's time is up
        run()


def _push_strategy():
    """Pushes aimed at the real blocks: right or wrong names, shapes, lengths, values, commit or not."""
    chunk = st.fixed_dictionaries(
        {
            "name": st.sampled_from(["b0", "b1", "missing", ""]),
            "shape": st.sampled_from([[4, 8], [32], [4, 9], [], [-1, 8]]),
            "dtype": st.sampled_from(
                [common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_FLOAT16, 77]
            ),
            "offset": st.sampled_from([0, 0, 0, 16, 4, -1]),
            "values": st.lists(
                st.floats(-1, 1, width=32) | st.sampled_from([float("nan"), float("inf")]), min_size=0, max_size=40
            ),
            "seq": st.sampled_from([1, 2, 3]),
        }
    )
    return st.tuples(st.lists(chunk, min_size=0, max_size=3), st.booleans(), st.sampled_from(["w1", "w2", ""]))


def test_rejected_pushes_leave_the_parameters_unchanged(cluster):
    """Create two blocks, then fuzz near-valid pushes at them; every rejection must change nothing."""
    addr = cluster["addr"]["paramserver"]
    with ParamClient([addr]) as c:
        c.init({"b0": np.zeros((4, 8), np.float32), "b1": np.ones(32, np.float32)}, overwrite=True)
    channel = cluster["channels"]["paramserver"]
    push = channel.stream_unary(
        "/downpour.v1.ParameterServer/Push", request_serializer=None, response_deserializer=ppb.PushResponse.FromString
    )
    end = time.monotonic() + max(BUDGET * 2, 5.0)
    stats = {"rejected": 0, "applied": 0}

    @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(p=_push_strategy())
    def run(p):
        if time.monotonic() > end:
            return
        chunks, commit, worker = p
        seq = int(time.monotonic_ns() % (1 << 40))  # fresh: never a dedup of an earlier push
        msgs = []
        for c in chunks:
            data = np.asarray(c["values"], np.float32)
            hdr = common_pb2.TensorChunk(
                name=c["name"],
                dtype=c["dtype"],
                shape=[max(s, 0) for s in c["shape"]],
                offset=max(c["offset"], 0),
                last=True,
            )
            msgs.append(codec.encode(ppb.PushRequest(worker_id=worker, seq=seq, chunk=hdr), PUSH_PAYLOAD, data))
        if commit:
            msgs.append(ppb.PushRequest(worker_id=worker, seq=seq, commit=True).SerializeToString())
        before = _pull_all(channel)
        SENT["messages"] += len(msgs)
        SENT["calls"] += 1
        try:
            push(iter(msgs), timeout=5)
            stats["applied"] += 1
            return
        except grpc.RpcError as e:
            assert e.code() not in BAD and e.code() != grpc.StatusCode.DEADLINE_EXCEEDED, (e.code(), e.details())
            details = e.details() or ""
            refused = refusal(e)  # None where gRPC refused the call before the shard saw it
        stats["rejected"] += 1
        after = _pull_all(channel)
        applied = set(refused.applied) if refused is not None else set()
        for name in before:
            if name not in applied:
                assert after[name] == before[name], f"rejected push ({details}) changed block {name!r}"

    while time.monotonic() < end:
        run()
    print(f"\npushes: {stats}")
    assert stats["rejected"] > 0


def test_every_service_survived_and_enough_messages_were_sent(cluster):
    for role, p in cluster["procs"].items():
        assert p.alive(), f"{role} died:\n{p.report()}"
        p.wait_serving(10)
    print(f"\nfuzz total: {SENT['messages']} messages, {SENT['calls']} calls")
    if SECONDS >= 30:  # a shorter run (a quick local check) is not held to the count
        assert SENT["messages"] >= MIN_MESSAGES, SENT
