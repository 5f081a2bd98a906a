"""Checkpoint ids are written once, and cleanup deletes only what it wrote: a real ``downpour up``.

Asked twice for a checkpoint named "nightly" with ``keep_checkpoints: 1``, the coordinator used
to let the shards overwrite the committed files, record the id twice and delete the newest
folder as the "old" one, leaving no checkpoint on disk. And any folder without a manifest
beside the checkpoints was deleted at the next commit, whatever it held.
"""

from __future__ import annotations

import hashlib

import grpc
import pytest

import harness
from downpour import checkpoint as cks
from downpour.rpc.channel import open_channel
from downpour.v1 import coordinator_pb2, coordinator_pb2_grpc, paramserver_pb2, paramserver_pb2_grpc

pytestmark = pytest.mark.slow


def _create(address: str, ck_id: str) -> coordinator_pb2.CreateCheckpointResponse:
    with open_channel(address) as ch:
        return coordinator_pb2_grpc.CoordinatorStub(ch).CreateCheckpoint(
            coordinator_pb2.CreateCheckpointRequest(checkpoint_id=ck_id), timeout=60
        )


def _digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_a_taken_id_is_refused_by_the_coordinator_and_every_shard_and_nothing_is_lost(tmp_path, procs):
    out = tmp_path / "run"
    ckdir = out / "checkpoints"
    # Beside the checkpoints, before the first one: what an operator keeps there is not ours to delete.
    (ckdir / "notes").mkdir(parents=True)
    (ckdir / "notes" / "README.txt").write_text("not a checkpoint")
    (ckdir / "coordinator").mkdir()
    (ckdir / "coordinator" / "state.json").write_text("{}")
    env = {"DOWNPOUR_CHECKPOINT_EVERY": "1000000", "DOWNPOUR_KEEP_CHECKPOINTS": "1"}
    proc = procs.up(out, "--quiet", "--no-neurons", *harness.TINY_CLUSTER, "--steps", "100000", env=env)
    harness.wait_job(out, lambda s: s.step >= 5, 60, "training", [proc])
    cl = harness.cluster(out)
    coordinator = cl["coordinator"]["address"]

    first = _create(coordinator, "nightly").checkpoint
    assert first.checkpoint_id == "nightly"
    before = _digests(ckdir / "nightly")
    with pytest.raises(grpc.RpcError) as exc:
        _create(coordinator, "nightly")
    assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS, exc.value
    assert "already exists" in exc.value.details() and "nightly" in exc.value.details()
    # the committed checkpoint is whole, unchanged and listed once
    assert _digests(ckdir / "nightly") == before
    [m] = cks.valid_manifests(ckdir)
    assert m["checkpoint_id"] == "nightly"
    with open_channel(coordinator) as ch:
        listed = coordinator_pb2_grpc.CoordinatorStub(ch).ListCheckpoints(coordinator_pb2.ListCheckpointsRequest())
    assert [c.checkpoint_id for c in listed.checkpoints] == ["nightly"]

    # every shard refuses on its own, too: a client that goes around the coordinator
    for i in (0, 1):
        with open_channel(cl[f"paramserver-{i}"]["address"]) as ch:
            with pytest.raises(grpc.RpcError) as exc:
                paramserver_pb2_grpc.ParameterServerStub(ch).Checkpoint(
                    paramserver_pb2.CheckpointRequest(checkpoint_id="nightly"), timeout=30
                )
        assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS, exc.value
    assert _digests(ckdir / "nightly") == before

    # the next checkpoint retires "nightly" (keep 1) and leaves the operator's folders alone
    second = _create(coordinator, "weekly").checkpoint
    assert [m["checkpoint_id"] for m in cks.valid_manifests(ckdir)] == ["weekly"]
    assert not (ckdir / "nightly").exists()
    assert (ckdir / "notes" / "README.txt").read_text() == "not a checkpoint"
    assert (ckdir / "coordinator" / "state.json").read_text() == "{}"
    assert second.step >= first.step
