"""The checkpoint commit protocol without gRPC: a fake of the shards that writes real shard files.

Commit, verification of the shards' parts, retention, cleanup of uncommitted
folders, and the checkpoint thread's interval, backoff and final attempts.
"""

from __future__ import annotations

import errno
import json
import os
from contextlib import nullcontext

import pytest
from shard_fakes import FakeShards

from downpour import checkpoint as cks
from downpour.config import JobConfig
from downpour.coordinator.manager import FINAL_CHECKPOINT_ATTEMPTS, CheckpointFailed, CheckpointManager
from downpour.coordinator.params import Parameters
from downpour.coordinator.shards import ShardError
from downpour.coordinator.state import Checkpoint, JobState


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(tmp_path, **kw):
    cfg = JobConfig(preset="tiny", replicas=2, steps=50, checkpoint_every=10, keep_checkpoints=2, warm_start=0, **kw)
    params = Parameters(cfg, 2)
    shards = FakeShards(tmp_path, params.sizes, params.place)
    state = JobState(cfg, None)
    state.initialized = True
    clock = Clock()
    mgr = CheckpointManager(state, params.place, str(tmp_path), lambda: nullcontext(shards), clock)
    return mgr, shards, state, clock


def folders(d) -> list[str]:
    return sorted(n for n in os.listdir(d) if os.path.isdir(os.path.join(d, n)))


def test_a_checkpoint_is_committed_by_its_manifest_and_verifies(tmp_path):
    mgr, shards, state, _ = make(tmp_path)
    state.progress[0].step, state.progress[1].step = 7, 9
    ck = mgr.checkpoint("first")
    assert shards.named("checkpoint") == [("checkpoint", "first")]
    assert ck.step == 7 and ck.replica_steps == [7, 9]
    [m] = cks.list_manifests(tmp_path)
    cks.verify(tmp_path, m)
    assert m["checkpoint_id"] == "first" and m["placement"] == mgr.place
    assert {n: b["shard"] for n, b in m["blocks"].items()} == mgr.place
    assert [c.checkpoint_id for c in state.checkpoints] == ["first"]


def test_retention_keeps_the_newest_and_removes_uncommitted_folders(tmp_path):
    mgr, _, state, _ = make(tmp_path)
    os.makedirs(tmp_path / "left-by-a-dead-coordinator")
    for i, name in enumerate(["a", "b", "c"]):
        state.progress[0].step = state.progress[1].step = 10 * (i + 1)
        mgr.checkpoint(name)
    assert folders(tmp_path) == ["b", "c"]  # keep_checkpoints=2; the uncommitted folder is gone
    assert [m["checkpoint_id"] for m in cks.list_manifests(tmp_path)] == ["b", "c"]


def test_an_invalid_id_is_refused_before_any_shard_is_asked(tmp_path):
    mgr, shards, _, _ = make(tmp_path)
    with pytest.raises(ValueError, match="invalid checkpoint id"):
        mgr.checkpoint("../x")
    assert shards.calls == []


def test_a_shard_that_fails_leaves_no_folder_and_nothing_committed(tmp_path):
    mgr, shards, state, _ = make(tmp_path)
    shards.fail["checkpoint"] = ShardError("RESOURCE_EXHAUSTED", "no space (the disk is full)", disk_full=True)
    with pytest.raises(ShardError):
        mgr.checkpoint("x")
    assert folders(tmp_path) == [] and state.checkpoints == []


def test_a_shard_missing_its_blocks_is_not_committed(tmp_path):
    mgr, shards, state, _ = make(tmp_path)
    shards.restart(1)  # empty since its last push: the checkpoint would lack its blocks
    with pytest.raises(CheckpointFailed, match="missing on their shards"):
        mgr.checkpoint("x")
    assert folders(tmp_path) == [] and state.checkpoints == []


def test_a_file_that_does_not_match_its_report_is_not_committed(tmp_path):
    mgr, shards, _, _ = make(tmp_path)
    real = shards.checkpoint

    def lying(ck_id):
        parts = real(ck_id)
        parts[1]["crc32"] ^= 1
        return parts

    shards.checkpoint = lying
    with pytest.raises(CheckpointFailed, match="does not match what it reported"):
        mgr.checkpoint("x")
    assert folders(tmp_path) == []


def test_the_manifest_is_written_last(tmp_path, monkeypatch):
    mgr, _, state, _ = make(tmp_path)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("downpour.checkpoint.manifest.atomic_write", full)
    with pytest.raises(OSError):
        mgr.checkpoint("x")
    assert folders(tmp_path) == [] and state.checkpoints == []


def test_tick_commits_every_interval_of_all_replicas_steps(tmp_path):
    mgr, shards, state, _ = make(tmp_path)
    mgr.tick()
    state.progress[0].step = 19  # 19 < 10 steps x 2 replicas
    mgr.tick()
    assert shards.named("checkpoint") == []
    state.progress[1].step = 1  # one replica alone may carry the interval
    mgr.tick()
    assert len(shards.named("checkpoint")) == 1
    mgr.tick()
    assert len(shards.named("checkpoint")) == 1


def test_failed_checkpoints_back_off_doubling(tmp_path):
    mgr, shards, state, clock = make(tmp_path)
    mgr.tick()
    state.progress[0].step = 20
    shards.fail["checkpoint"] = ShardError("UNAVAILABLE", "away")
    mgr.tick()
    assert mgr.failures == 1 and mgr.retry_at == clock.t + 1.0
    mgr.tick()  # still waiting: the shards are not asked
    assert len(shards.named("checkpoint")) == 1
    clock.t += 1.0
    shards.fail["checkpoint"] = ShardError("UNAVAILABLE", "away")
    mgr.tick()
    assert mgr.failures == 2 and mgr.retry_at == clock.t + 2.0
    clock.t += 2.0
    mgr.tick()  # commits again
    assert mgr.failures == 0 and len(state.checkpoints) == 1


def test_the_final_checkpoint_is_written_once_when_the_job_is_done(tmp_path):
    mgr, shards, state, _ = make(tmp_path)
    mgr.tick()
    state.progress[0].step = state.progress[1].step = 50
    mgr.tick()
    mgr.tick()
    assert mgr.succeeded and not mgr.failed
    assert len(shards.named("checkpoint")) == 1 and state.checkpoints[-1].step == 50


def test_a_final_checkpoint_that_keeps_failing_fails_the_job_with_the_reason(tmp_path):
    mgr, shards, state, clock = make(tmp_path)
    mgr.tick()
    state.progress[0].step = state.progress[1].step = 50
    for _ in range(FINAL_CHECKPOINT_ATTEMPTS):
        shards.fail["checkpoint"] = ShardError("RESOURCE_EXHAUSTED", "shard 0: no space", disk_full=True)
        mgr.tick()
        clock.t += 60
    assert not mgr.succeeded
    assert "final checkpoint could not be written" in mgr.failed and "the disk is full" in mgr.failed
    mgr.tick()  # a failed job tries no more
    assert len(shards.named("checkpoint")) == FINAL_CHECKPOINT_ATTEMPTS
    assert folders(tmp_path) == []


def test_the_manifest_records_the_job(tmp_path):
    mgr, _, state, _ = make(tmp_path)
    ck = mgr.checkpoint("j")
    body = json.loads(open(ck.manifest_path).read())
    assert body["job_id"] == state.job_id and "preset: tiny" in body["config"]


# -- ids are written once -------------------------------------------------------------------


def test_a_taken_id_is_refused_before_any_shard_is_asked_and_nothing_is_lost(tmp_path):
    mgr, shards, state, _ = make(tmp_path)
    mgr.cfg.keep_checkpoints = 1
    mgr.checkpoint("nightly")
    before = {p.name: p.read_bytes() for p in (tmp_path / "nightly").iterdir()}
    state.progress[0].step = state.progress[1].step = 20
    with pytest.raises(cks.CheckpointExists, match="already exists"):
        mgr.checkpoint("nightly")
    assert shards.named("checkpoint") == [("checkpoint", "nightly")]  # the second was never sent
    assert {p.name: p.read_bytes() for p in (tmp_path / "nightly").iterdir()} == before
    [m] = cks.valid_manifests(tmp_path)
    assert m["checkpoint_id"] == "nightly"
    assert [c.checkpoint_id for c in state.checkpoints] == ["nightly"]


def test_a_folder_of_that_name_is_not_written_into(tmp_path):
    mgr, shards, state, _ = make(tmp_path)
    os.makedirs(tmp_path / "mine")
    (tmp_path / "mine" / "data.bin").write_bytes(b"theirs")
    with pytest.raises(cks.CheckpointExists):
        mgr.checkpoint("mine")
    assert shards.calls == [] and state.checkpoints == []
    assert os.listdir(tmp_path / "mine") == ["data.bin"]


def test_generated_ids_never_collide(tmp_path, monkeypatch):
    mgr, _, state, _ = make(tmp_path)
    monkeypatch.setattr("downpour.coordinator.manager.time.time", lambda: 1234.5)  # the same millisecond
    a, b = mgr.checkpoint(), mgr.checkpoint()  # and the same step
    assert a.checkpoint_id != b.checkpoint_id and b.checkpoint_id.startswith(a.checkpoint_id)
    assert [m["checkpoint_id"] for m in cks.valid_manifests(tmp_path)] == [a.checkpoint_id, b.checkpoint_id]


def test_older_checkpoints_stay_until_the_new_one_reads_back(tmp_path, monkeypatch):
    mgr, _, state, _ = make(tmp_path)  # keep_checkpoints=2
    for i, name in enumerate(("a", "b")):
        state.progress[0].step = state.progress[1].step = 10 * (i + 1)
        mgr.checkpoint(name)
    real = cks.verify

    def corrupt_c(d, m):  # the new checkpoint's files do not verify once on the disk
        if m["checkpoint_id"] == "c":
            raise cks.CheckpointInvalid("checkpoint c: crc32 mismatch (corrupt)")
        return real(d, m)

    monkeypatch.setattr("downpour.checkpoint.manifest.verify", corrupt_c)
    state.progress[0].step = state.progress[1].step = 30
    with pytest.raises(CheckpointFailed, match="did not verify"):
        mgr.checkpoint("c")
    monkeypatch.setattr("downpour.checkpoint.manifest.verify", real)
    assert [c.checkpoint_id for c in state.checkpoints] == ["a", "b"]
    assert [m["checkpoint_id"] for m in cks.valid_manifests(tmp_path)] == ["a", "b"]
    assert folders(tmp_path) == ["a", "b"]  # c withdrawn and cleaned up, a not deleted


def test_the_job_state_records_an_id_once():
    cfg = JobConfig(preset="tiny", replicas=1, steps=50, keep_checkpoints=1, warm_start=0)
    state = JobState(cfg, None)
    ck = Checkpoint("nightly", 1, "/x/nightly/MANIFEST.json", [1], [], 0.0)
    assert state.add_checkpoint(ck) == []
    again = Checkpoint("nightly", 2, "/x/nightly/MANIFEST.json", [2], [], 1.0)
    assert state.add_checkpoint(again) == []  # the newest is never handed back for deletion
    assert [c.step for c in state.checkpoints] == [2]
