"""Hostile reports to a real coordinator (and pushes to a real shard): who may speak for a slot,
and which ids may become metric labels.

Member ids are public (JobStatus lists them), and ReportProgress used to take
the replica from the request: anyone could set another replica's loss, and
every made-up replica number became a new label set of the coordinator's
gauges. Now each member gets a secret key at Register that every later call
for it carries, a report is for the caller's own slot only, and labels come
from the member's slot. A shard's per-worker push labels and its per-worker
dedup map are bounded too (worker ids are the client's choice).
"""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest

from downpour import config as jobconfig
from downpour import metrics as dmetrics
from downpour.coordinator.state import MAX_SPARES
from downpour.nn import presets
from downpour.nn.spec import to_dict
from downpour.paramserver.client import ParamClient
from downpour.rpc.channel import open_channel
from downpour.v1 import coordinator_pb2 as cpb
from downpour.v1 import coordinator_pb2_grpc

MADE_UP = 10_000


def _series(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(rf"{name}\{{", line)]


@pytest.fixture
def coordinator(procs, tmp_path):
    shard = procs.serve("paramserver")
    cfg = jobconfig.JobConfig(
        model=to_dict(presets.get("tiny")),
        replicas=2,
        shards=1,
        steps=100_000,
        warm_start=0,
        seed=1,
        lease_seconds=600.0,  # nobody's lease runs out during a test: members are only added
    )
    path = tmp_path / "job.yaml"
    path.write_text(cfg.to_yaml())
    ck = tmp_path / "ck"
    ck.mkdir()
    c = procs.serve(
        "coordinator",
        "--config", str(path),
        "--shards", shard.address,
        "--feeder", "127.0.0.1:1",
        "--checkpoint-dir", str(ck),
        metrics=True,
    )  # fmt: skip
    ch = open_channel(c.address)
    yield c, coordinator_pb2_grpc.CoordinatorStub(ch)
    ch.close()


def test_a_worker_reports_only_for_its_own_slot(coordinator):
    c, stub = coordinator
    a = stub.Register(cpb.RegisterRequest(role=cpb.ROLE_WORKER, address="127.0.0.1:1"), timeout=10)
    b = stub.Register(cpb.RegisterRequest(role=cpb.ROLE_WORKER, address="127.0.0.1:2"), timeout=10)
    assert (a.assignment.replica, b.assignment.replica) == (0, 1) and a.member_key and b.member_key
    ok = stub.ReportProgress(
        cpb.ReportProgressRequest(member_id=a.member_id, member_key=a.member_key, replica=0, step=1, loss=2.5),
        timeout=10,
    )
    assert ok.keep_running
    hostile = [
        # a's own key, b's replica
        cpb.ReportProgressRequest(member_id=a.member_id, member_key=a.member_key, replica=1, step=1, loss=99.0),
        # b's public member id, without or with a guessed key
        cpb.ReportProgressRequest(member_id=b.member_id, replica=1, step=1, loss=99.0),
        cpb.ReportProgressRequest(member_id=b.member_id, member_key=a.member_key, replica=1, step=1, loss=99.0),
    ]
    for req in hostile:
        with pytest.raises(grpc.RpcError) as e:
            stub.ReportProgress(req, timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value.details()
    # Nor can it renew, drop or take over b.
    for call, req in (
        (stub.Heartbeat, cpb.HeartbeatRequest(member_id=b.member_id)),
        (stub.Deregister, cpb.DeregisterRequest(member_id=b.member_id, member_key=a.member_key)),
        (stub.Register, cpb.RegisterRequest(role=cpb.ROLE_WORKER, address="127.0.0.1:3", member_id=b.member_id)),
    ):
        with pytest.raises(grpc.RpcError) as e:
            call(req, timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value.details()
    assert c.metric("downpour_training_loss", replica="0") == 2.5
    assert c.metric("downpour_training_loss", replica="1") is None  # b never reported
    status = stub.JobStatus(cpb.JobStatusRequest(), timeout=10)
    assert {(s.replica, s.member_id, s.address) for s in status.slots} == {
        (0, a.member_id, "127.0.0.1:1"),
        (1, b.member_id, "127.0.0.1:2"),
    }
    # b, with its own key, still does everything.
    assert stub.Heartbeat(cpb.HeartbeatRequest(member_id=b.member_id, member_key=b.member_key), timeout=10)
    stub.ReportProgress(
        cpb.ReportProgressRequest(member_id=b.member_id, member_key=b.member_key, replica=1, step=1, loss=3.0),
        timeout=10,
    )
    assert c.metric("downpour_training_loss", replica="1") == 3.0


def test_made_up_ids_create_no_label_sets(coordinator):
    c, stub = coordinator
    a = stub.Register(cpb.RegisterRequest(role=cpb.ROLE_WORKER, address="127.0.0.1:1"), timeout=10)
    scalars = {"stage1.reconstruction": 1.0, "stage1.sparsity": 0.5}
    for start in range(0, MADE_UP, 16):  # 16 at a time: under the service's streams per connection
        futures = []
        for i in range(start, start + 16):
            # Replicas outside the job, and members nobody registered: either way, no label.
            req = (
                cpb.ReportProgressRequest(member_id=a.member_id, member_key=a.member_key, replica=2 + i, loss=1.0)
                if i % 2
                else cpb.ReportProgressRequest(member_id=f"made-up-{i}", replica=0, loss=1.0, scalars=scalars)
            )
            futures.append((i, stub.ReportProgress.future(req, timeout=60)))
        for i, f in futures:
            if i % 2:
                with pytest.raises(grpc.RpcError) as e:
                    f.result()
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            else:
                f.result()
    text = c.metrics()
    assert _series(text, "downpour_training_loss") == []
    assert _series(text, "downpour_objective_term") == []
    stub.ReportProgress(
        cpb.ReportProgressRequest(member_id=a.member_id, member_key=a.member_key, replica=0, loss=1.5, scalars=scalars),
        timeout=10,
    )
    text = c.metrics()
    assert len(_series(text, "downpour_training_loss")) == 1
    assert {re.search(r'replica="(\d+)"', s).group(1) for s in _series(text, "downpour_objective_term")} == {"0"}


def test_a_shards_worker_labels_are_bounded(procs):
    s = procs.serve("paramserver", metrics=True)
    with ParamClient([s.address], worker_id="init") as ps:
        ps.init({"w": np.zeros(4, np.float32)})
    ids = dmetrics.MAX_WORKER_LABELS + 200
    for i in range(ids):
        with ParamClient([s.address], worker_id=f"made-up-{i}", placement={"w": 0}) as ps:
            ps.wait(ps.push({"w": np.full(4, 1e-3, np.float32)}))
    series = [x for x in _series(s.metrics(), "downpour_paramserver_worker_pushes_total")]
    assert len(series) == dmetrics.MAX_WORKER_LABELS + 1  # the first ids, then "other"
    assert s.metric("downpour_paramserver_worker_pushes_total", worker="other") == 200


def test_registering_in_a_loop_is_bounded(coordinator):
    c, stub = coordinator
    room = 2 + MAX_SPARES  # the job's two slots, then spares
    for start in range(0, room, 16):  # 16 at a time: under the service's streams per connection
        futures = [
            stub.Register.future(cpb.RegisterRequest(role=cpb.ROLE_WORKER, address=f"127.0.0.1:{i + 1}"), timeout=60)
            for i in range(start, min(room, start + 16))
        ]
        for f in futures:
            f.result()
    with pytest.raises(grpc.RpcError) as e:
        stub.Register(cpb.RegisterRequest(role=cpb.ROLE_WORKER, address="127.0.0.1:9"), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "spares" in e.value.details()
    assert c.metric("downpour_coordinator_members") == room
