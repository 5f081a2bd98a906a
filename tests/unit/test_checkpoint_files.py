"""The checkpoint package's pure functions: error types, one-block reads, verification and fallback."""

from __future__ import annotations

import os
from contextlib import nullcontext

import numpy as np
import pytest
from shard_fakes import FakeShards

from downpour import checkpoint as cks
from downpour.checkpoint import manifest, shardfile
from downpour.config import JobConfig
from downpour.coordinator.manager import CheckpointManager
from downpour.coordinator.params import Parameters
from downpour.coordinator.state import JobState
from downpour.paramserver.store import ShardStore


def committed(tmp_path, *ids):
    cfg = JobConfig(preset="tiny", replicas=1, steps=50, keep_checkpoints=5, warm_start=0)
    params = Parameters(cfg, 2)
    shards = FakeShards(tmp_path, params.sizes, params.place)
    state = JobState(cfg, None)
    mgr = CheckpointManager(state, params.place, str(tmp_path), lambda: nullcontext(shards))
    for i, ck in enumerate(ids):
        state.progress[0].step = i + 1
        mgr.checkpoint(ck)
    return shards


def test_errors_are_told_apart_by_type(tmp_path):
    with pytest.raises(cks.CheckpointNotFound):
        shardfile.load(tmp_path / "nothing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(cks.CheckpointInvalid):
        shardfile.load(tmp_path / "junk.ckpt")
    assert issubclass(cks.CheckpointNotFound, cks.CheckpointError)
    assert issubclass(cks.CheckpointInvalid, cks.CheckpointError)
    assert not issubclass(cks.CheckpointNotFound, cks.CheckpointInvalid)


def test_valid_ids_are_one_safe_path_component():
    assert cks.valid_id("step-00000010-12345") and cks.valid_id("a.b_c")
    for bad in ("", ".hidden", "a/b", "..", "x" * 129, "a\0b"):
        assert not cks.valid_id(bad)


def test_one_block_is_read_alone_and_checked(tmp_path):
    st = ShardStore(0)
    st.create("a", (3,), np.arange(3, dtype=np.float32))
    st.create("b", (2, 2), np.arange(4, dtype=np.float32) + 10)
    path = shardfile.shard_path(tmp_path, "c", 0)
    shardfile.save(st, path)
    offsets = shardfile.block_offsets(path)
    assert set(offsets) == {"a", "b"}
    np.testing.assert_array_equal(shardfile.read_weights(path, *offsets["b"]), np.arange(4) + 10)
    pos = offsets["b"][0]
    data = bytearray(path.read_bytes())
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))
    assert shardfile.read_weights(path, *offsets["b"]) is None
    np.testing.assert_array_equal(shardfile.read_weights(path, *offsets["a"]), np.arange(3))


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    committed(tmp_path, "one", "two")
    assert cks.newest_valid(tmp_path)["checkpoint_id"] == "two"
    f = tmp_path / "two" / "shard-1.ckpt"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    [m1, m2] = cks.list_manifests(tmp_path)
    cks.verify(tmp_path, m1)
    with pytest.raises(cks.CheckpointInvalid, match="corrupt"):
        cks.verify(tmp_path, m2)
    assert cks.newest_valid(tmp_path)["checkpoint_id"] == "one"
    assert [m["checkpoint_id"] for m in cks.valid_manifests(tmp_path)] == ["one"]
    assert cks.newest_valid(tmp_path, exclude=("one",)) is None


def test_load_blocks_returns_every_block_verified(tmp_path):
    shards = committed(tmp_path, "c")
    m = cks.newest_valid(tmp_path)
    blocks = cks.load_blocks(tmp_path, m)
    assert set(blocks) == set(shards.place)
    os.remove(tmp_path / "c" / "shard-0.ckpt")
    with pytest.raises(cks.CheckpointInvalid):  # a file the manifest names is gone
        cks.load_blocks(tmp_path, m)


def _torn(folder) -> None:
    """What a coordinator that died mid-checkpoint leaves: a shard file, a shard's temp file, a torn manifest's temp."""
    os.makedirs(folder)
    for name in ("shard-0.ckpt", ".shard-1.ckpt.tmp-4242", "MANIFEST.json.tmp.4242"):
        (folder / name).write_bytes(b"x")


def test_uncommitted_folders_go_and_committed_ones_stay(tmp_path):
    committed(tmp_path, "kept")
    _torn(tmp_path / "torn")
    os.makedirs(tmp_path / "spared")
    manifest.remove_uncommitted(tmp_path, keep={"spared"})
    assert sorted(os.listdir(tmp_path)) == ["kept", "spared"]
    manifest.discard_uncommitted(tmp_path, "kept")  # has a manifest: not discarded
    manifest.discard_uncommitted(tmp_path, "spared")
    assert sorted(os.listdir(tmp_path)) == ["kept"]


def test_cleanup_deletes_only_the_files_it_writes(tmp_path):
    committed(tmp_path, "kept")
    # an operator's folders beside the checkpoints (the coordinator's own state among them)
    os.makedirs(tmp_path / "coordinator")
    (tmp_path / "coordinator" / "state.json").write_text("{}")
    os.makedirs(tmp_path / "data" / "images")
    (tmp_path / "notes.txt").write_text("a file at the top")
    # a torn checkpoint someone also put a file into: our files go, theirs and the folder stay
    _torn(tmp_path / "mixed")
    (tmp_path / "mixed" / "keep-me.txt").write_text("theirs")
    # a link to a folder elsewhere, named like a checkpoint: neither the link nor its target is touched
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    _torn(elsewhere)
    os.symlink(elsewhere, tmp_path / "linked")
    # a name no checkpoint can have
    os.makedirs(tmp_path / ".hidden")
    (tmp_path / ".hidden" / "shard-0.ckpt").write_bytes(b"x")
    manifest.remove_uncommitted(tmp_path, keep=set())
    assert sorted(os.listdir(tmp_path)) == [".hidden", "coordinator", "data", "kept", "linked", "mixed", "notes.txt"]
    assert (tmp_path / "coordinator" / "state.json").read_text() == "{}"
    assert os.path.isdir(tmp_path / "data" / "images")
    assert os.listdir(tmp_path / "mixed") == ["keep-me.txt"]
    assert sorted(os.listdir(elsewhere)) == [".shard-1.ckpt.tmp-4242", "MANIFEST.json.tmp.4242", "shard-0.ckpt"]
    assert os.listdir(tmp_path / ".hidden") == ["shard-0.ckpt"]
    # retention, too, removes a committed checkpoint's own files and leaves anything else in its folder
    (tmp_path / "kept" / "keep-me.txt").write_text("theirs")
    manifest.remove(str(tmp_path / "kept" / cks.MANIFEST))
    assert os.listdir(tmp_path / "kept") == ["keep-me.txt"]


def test_a_shard_file_is_written_once(tmp_path):
    shards = committed(tmp_path, "once")
    path = shardfile.shard_path(tmp_path, "once", 0)
    before = path.read_bytes()
    shards.stores[0].blocks[next(iter(shards.stores[0].blocks))].w[:] = 7.0  # the shard has moved on
    with pytest.raises(cks.CheckpointExists, match="already exists"):
        shardfile.save(shards.stores[0], path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == [cks.MANIFEST, "shard-0.ckpt", "shard-1.ckpt"]  # no temp left


def test_a_name_taken_between_the_check_and_the_write_is_still_refused(tmp_path, monkeypatch):
    """The last check is atomic: the file takes its name by a hard link, which fails if it exists."""
    shards = committed(tmp_path, "race")
    path = shardfile.shard_path(tmp_path, "race", 0)
    before = path.read_bytes()
    real_exists = type(path).exists
    monkeypatch.setattr(type(path), "exists", lambda p: False if p == path else real_exists(p))
    with pytest.raises(cks.CheckpointExists):
        shardfile.save(shards.stores[0], path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == [cks.MANIFEST, "shard-0.ckpt", "shard-1.ckpt"]
