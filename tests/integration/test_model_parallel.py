"""Model parallelism through the whole system: workers exchanging halos over gRPC."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import harness
from downpour.checkpoint import shardfile as ckpt
from downpour.config import from_yaml
from downpour.nn import Network, presets
from downpour.partition import join_params, plan

pytestmark = pytest.mark.slow


def up(out, *args, env=None):
    r = harness.run_cli("up", "--quiet", "--out", str(out), "--preset", "tiny", *args, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def final_params(out: Path) -> dict[str, np.ndarray]:
    """The newest committed checkpoint's weights, joined into the unpartitioned network's blocks."""
    manifests = sorted(out.glob("checkpoints/*/MANIFEST.json"), key=lambda p: json.loads(p.read_text())["step"])
    m = json.loads(manifests[-1].read_text())
    blocks = {}
    for part in m["shards"]:
        _, _, bl, _ = ckpt.load(Path(part["path"]))
        blocks.update({b.name: b.w.copy() for b in bl})
    cfg = from_yaml(m["config"])
    rows, cols = cfg.grid()
    return join_params(plan(cfg.network_spec(), rows, cols), blocks) if rows * cols > 1 else blocks


def test_one_training_step_with_partitions_equals_one_without(tmp_path):
    # One replica, one step: pull the initial parameters, one batch, one push.
    # Plain SGD: Adagrad's first step, g / (|g| + eps), turns float32 rounding
    # of gradients near eps into visible differences; SGD keeps w - lr * g exact.
    args = ["--replicas", "1", "--shards", "2", "--steps", "1"]
    env = {"DOWNPOUR_OPTIMIZER__KIND": "sgd", "DOWNPOUR_OPTIMIZER__LR": "0.5"}
    up(tmp_path / "whole", *args, env=env)
    up(tmp_path / "grid", *args, "--partitions", "2x2", env=env)
    a, b = final_params(tmp_path / "whole"), final_params(tmp_path / "grid")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6 * float(np.abs(a[k]).max()), err_msg=k)
    # ...and the step did change them (the comparison is not of two initial states)
    init = Network(presets.get("tiny")).init_params(0)
    assert any(not np.allclose(a[k], init[k]) for k in a)


def test_two_replicas_of_2x2_partitions_train_end_to_end(tmp_path, initial_loss):
    out = tmp_path / "run"
    up(out, "--replicas", "2", "--partitions", "2x2", "--shards", "2", "--steps", "30")
    m = json.loads((out / "metrics.json").read_text())
    last = m["history"][-1]
    assert [r["step"] for r in last["replicas"]] == [30, 30]
    # The first report may already average many steps; compare with the initial parameters' loss instead.
    for replica in (0, 1):
        assert last["replicas"][replica]["loss"] < 0.5 * initial_loss("tiny"), (last, initial_loss("tiny"))
    # eight workers, every one exchanged halos with its peers
    logs = list((out / "logs").glob("worker-*.log"))
    assert len(logs) == 8
    started = [line for f in logs for line in f.read_text().splitlines() if "training from step 0" in line]
    assert {line.split("replica ")[1].split(":")[0] for line in started} == {
        f"{r} partition {p}" for r in range(2) for p in range(4)
    }


def test_a_dead_partition_stalls_only_its_replica_which_resumes_when_the_slot_is_refilled(tmp_path, procs):
    out = tmp_path / "run"
    proc = procs.up(
        out,
        "--quiet",
        "--preset",
        "tiny",
        "--replicas",
        "2",
        "--partitions",
        "1x2",
        "--shards",
        "1",
        "--steps",
        "250",
        env={"DOWNPOUR_LEASE_SECONDS": "2"},
    )
    deadline = time.monotonic() + 120
    killed = None
    trace = []  # (time, step of replica 0, step of replica 1) after the kill
    while time.monotonic() < deadline and proc.alive():
        time.sleep(0.2)  # the trace's sampling period: the test measures the replicas over time
        st = harness.job_status(out, timeout=2.0)
        if st is None:  # not up yet
            continue
        rows = harness.cluster(out)
        slots = {(s.replica, s.partition): s for s in st.slots}
        if killed is None and slots[(1, 1)].step >= 20 and slots[(0, 0)].step < 150:
            victim = next(r for r in rows.values() if r["address"] == slots[(1, 1)].address)
            os.kill(victim["pid"], signal.SIGKILL)
            killed = (time.monotonic(), slots[(0, 0)].step, slots[(1, 0)].step)
        elif killed is not None:
            trace.append((time.monotonic() - killed[0], slots[(0, 0)].step, slots[(1, 0)].step))
    assert killed is not None, "never reached the kill point"
    assert proc.wait(180) == 0, proc.report()
    # While replica 1 waited for its lease to run out and its slot to be refilled (>= 2 s),
    # replica 0 went on training.
    early = [t for t in trace if t[0] < 1.5]
    assert early and early[-1][1] > killed[1] + 5, (killed, early)
    assert max(t[2] for t in early) <= killed[2] + 3, (killed, early)
    last = json.loads((out / "metrics.json").read_text())["history"][-1]
    assert [r["step"] for r in last["replicas"]] == [250, 250]
