"""Failures: verified checkpoints with fallback, and a running cluster that loses a shard, the coordinator, the feeder."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import harness
from downpour import checkpoint as cks
from downpour.checkpoint import shardfile as ckpt
from downpour.paramserver.store import OptimizerConfig, ShardStore


def _commit(root: Path, ck_id: str, step: int, values: float) -> dict:
    """A checkpoint of two shards written as the shards and the coordinator write it."""
    parts, paths = [], {}
    for shard in (0, 1):
        st = ShardStore(shard, OptimizerConfig())
        st.create(f"b{shard}", (2, 3), np.full(6, values + shard, np.float32))
        path = ckpt.shard_path(root, ck_id, shard)
        n, size, crc = ckpt.save(st, path)
        parts.append({"shard": shard, "path": str(path), "num_bytes": size, "crc32": crc, "num_blocks": n})
        paths[shard] = path
    m = {
        "checkpoint_id": ck_id,
        "step": step,
        "created": time.time(),
        "shards": parts,
        "replica_steps": [step],
        "blocks": cks.block_table(paths),
        "config": "preset: tiny\n",
    }
    (root / ck_id / cks.MANIFEST).write_text(json.dumps(m))
    return m


@pytest.mark.parametrize(
    "damage", ["flip a byte", "truncate", "delete a shard file", "torn manifest", "block crc in the manifest"]
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    _commit(tmp_path, "step-10", 10, 1.0)
    new = _commit(tmp_path, "step-20", 20, 2.0)
    assert cks.newest_valid(tmp_path)["checkpoint_id"] == "step-20"
    f = Path(new["shards"][1]["path"])
    if damage == "flip a byte":
        data = bytearray(f.read_bytes())
        data[-5] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:-7])
    elif damage == "delete a shard file":
        f.unlink()
    elif damage == "torn manifest":
        p = tmp_path / "step-20" / cks.MANIFEST
        p.write_text(p.read_text()[:40])
    else:
        new["blocks"]["b1"]["crc32_w"] ^= 1
        (tmp_path / "step-20" / cks.MANIFEST).write_text(json.dumps(new))
    good = cks.newest_valid(tmp_path)
    assert good["checkpoint_id"] == "step-10"
    assert [m["checkpoint_id"] for m in cks.valid_manifests(tmp_path)] == ["step-10"]
    blocks = cks.load_blocks(tmp_path, good)
    assert np.all(blocks["b0"] == 1.0) and np.all(blocks["b1"] == 2.0)
    if damage != "torn manifest":
        with pytest.raises((cks.CheckpointInvalid, OSError)):
            cks.verify(tmp_path, new)


def test_checkpoint_ids_are_single_safe_path_components():
    for bad in ("", ".", "..", "../x", "a/b", ".hidden", "a\x00b", "x" * 200):
        assert not cks.valid_id(bad), bad
        with pytest.raises(ValueError):
            ckpt.shard_path("/tmp", bad, 0)
    assert cks.valid_id("step-00000100-12345")


# -- a running cluster ------------------------------------------------------------------------

# Enough steps that the three losses happen before the end: a replica of tiny takes ~100 steps/s
# here, and one that finishes while the coordinator is down waits for it to record the last step.
STEPS = 2000


@pytest.mark.slow
def test_a_cluster_survives_losing_a_shard_then_the_coordinator_then_the_feeder(procs, tmp_path):
    out = tmp_path / "run"
    env = {"DOWNPOUR_LEASE_SECONDS": "2", "DOWNPOUR_CHECKPOINT_EVERY": "20"}
    proc = procs.up(
        out, "--quiet", "--preset", "tiny", "--replicas", "2", "--shards", "2", "--steps", str(STEPS), env=env
    )

    def kill_and_go_on(name: str, what: str) -> None:
        step = harness.wait_job(out, lambda s: True, 30, "the job's step", [proc]).step
        os.kill(harness.cluster(out)[name]["pid"], signal.SIGKILL)
        harness.wait_job(out, lambda s: s.step >= step + 60, 60, f"training to go on after {what}", [proc])

    harness.wait_job(out, lambda s: s.last_checkpoint_id and s.step >= 30, 60, "a first checkpoint", [proc])
    coord_log = out / "logs" / "coordinator.log"
    # 1. a shard: the coordinator refills it from the last checkpoint; the other keeps its state.
    kill_and_go_on("paramserver-1", "the shard was lost")
    # Which shard was refilled, and from where, is told only in the coordinator's and shards' logs.
    text = coord_log.read_text()
    assert "shard 1 restored from checkpoint" in text, text[-2000:]
    assert "shard 0 restored" not in text and "shard 0 refilled" not in text
    assert "restored" not in (out / "logs" / "paramserver-0.log").read_text()
    # 2. the coordinator: the restarted one re-adopts the cluster, workers keep training meanwhile.
    kill_and_go_on("coordinator", "the coordinator was lost")
    assert "re-adopted job" in coord_log.read_text()  # only its log tells a re-adoption from a fresh start
    # 3. the feeder: workers wait for it and resume.
    kill_and_go_on("feeder", "the feeder was lost")
    assert proc.wait(180) == 0
    rows = harness.cluster(out)
    for name in ("paramserver-1", "coordinator", "feeder"):
        assert rows[name]["restarts"] >= 1, rows[name]
    assert all(r["restarts"] == 0 for r in rows.values() if r["role"] == "worker"), rows  # workers carried on
    last = json.loads((out / "metrics.json").read_text())["history"][-1]
    assert [r["step"] for r in last["replicas"]] == [STEPS, STEPS]
    for m in cks.list_manifests(out / "checkpoints"):
        cks.verify(out / "checkpoints", m)
