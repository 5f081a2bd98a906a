"""Failures: verified checkpoints with fallback, and a running cluster that loses a shard, the coordinator, the feeder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

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
    m = {"checkpoint_id": ck_id, "step": step, "created": time.time(), "shards": parts, "replica_steps": [step],
         "blocks": cks.block_table(paths), "config": "preset: tiny\n"}
    (root / ck_id / cks.MANIFEST).write_text(json.dumps(m))
    return m


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete a shard file", "torn manifest",
                                    "block crc in the manifest"])
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

def _rows(out):
    try:
        return {r["name"]: r for r in json.loads((out / "cluster.json").read_text())}
    except (OSError, ValueError):
        return {}


def _status(out):
    from downpour.up import job_status

    try:
        return job_status(_rows(out)["coordinator"]["address"], timeout=1.0)
    except Exception:  # noqa: BLE001 - down or restarting
        return None


def _wait(out, proc, pred, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            logs = "".join(f"\n== {p.name}\n" + p.read_text()[-1500:] for p in sorted((out / "logs").glob("*.log")))
            raise AssertionError(f"downpour up ended early (exit {proc.returncode}) while waiting for {what}: "
                                 f"{proc.stderr.read()[-2000:]}{logs}")
        st = _status(out)
        if st is not None and pred(st):
            return st
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# Enough steps that the three losses happen before the end: a replica of tiny takes ~100 steps/s
# here, and one that finishes while the coordinator is down waits for it to record the last step.
STEPS = 2000


@pytest.mark.slow
def test_a_cluster_survives_losing_a_shard_then_the_coordinator_then_the_feeder(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, DOWNPOUR_LEASE_SECONDS="2", DOWNPOUR_CHECKPOINT_EVERY="20")
    proc = subprocess.Popen([sys.executable, "-m", "downpour.cli", "up", "--quiet", "--out", str(out), "--preset",
                             "tiny", "--replicas", "2", "--shards", "2", "--steps", str(STEPS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait(out, proc, lambda s: s.last_checkpoint_id and s.step >= 30, "a first checkpoint")
        coord_log = out / "logs" / "coordinator.log"
        # 1. a shard: the coordinator refills it from the last checkpoint; the other keeps its state.
        step = _status(out).step
        os.kill(_rows(out)["paramserver-1"]["pid"], signal.SIGKILL)
        _wait(out, proc, lambda s: s.step >= step + 60, "training to go on after the shard was lost")
        text = coord_log.read_text()
        assert "shard 1 restored from checkpoint" in text, text[-2000:]
        assert "shard 0 restored" not in text and "shard 0 refilled" not in text
        assert "restored" not in (out / "logs" / "paramserver-0.log").read_text()
        # 2. the coordinator: the restarted one re-adopts the cluster, workers keep training meanwhile.
        step = _status(out).step
        os.kill(_rows(out)["coordinator"]["pid"], signal.SIGKILL)
        _wait(out, proc, lambda s: s.step >= step + 60, "training to go on after the coordinator was lost")
        assert "re-adopted job" in coord_log.read_text()
        # 3. the feeder: workers wait for it and resume.
        step = _status(out).step
        os.kill(_rows(out)["feeder"]["pid"], signal.SIGKILL)
        _wait(out, proc, lambda s: s.step >= step + 60, "training to go on after the feeder was lost")
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    for name in ("paramserver-1", "coordinator", "feeder"):
        assert f"restarted {name}" in stderr
    assert not any("restarted worker" in line for line in stderr.splitlines()), stderr  # workers carried on
    last = json.loads((out / "metrics.json").read_text())["history"][-1]
    assert [r["step"] for r in last["replicas"]] == [STEPS, STEPS]
    for m in cks.list_manifests(out / "checkpoints"):
        cks.verify(out / "checkpoints", m)
