"""``downpour up`` end to end: real coordinator, shards, feeder and workers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import numpy as np
import pytest

import harness
from downpour import checkpoint as cks
from downpour import config as jobconfig
from downpour.client import NeuronsClient
from downpour.up import cluster as upmod

pytestmark = pytest.mark.slow


def up(args, out, env=None):
    return harness.run_cli("up", "--quiet", "--out", str(out), *args, env=env, timeout=240)


def _no_nan(token):
    raise AssertionError(f"metrics.json holds {token}, which strict JSON parsers reject")


def history(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f, parse_constant=_no_nan)


def reported_losses(hist, replica):
    return [
        h["replicas"][replica]["loss"]
        for h in hist["history"]
        if len(h["replicas"]) > replica
        and h["replicas"][replica]["loss"] is not None
        and h["replicas"][replica]["step"] > 0
    ]


def test_two_replicas_two_shards_train_and_the_loss_falls(tmp_path, initial_loss):
    out = tmp_path / "run"
    r = up(["--preset", "tiny", "--replicas", "2", "--shards", "2", "--steps", "60"], out)
    assert r.returncode == 0, r.stderr[-3000:]
    m = history(out)
    last = m["history"][-1]
    assert [rep["step"] for rep in last["replicas"]] == [60, 60]
    for replica in (0, 1):
        losses = reported_losses(m, replica)
        assert losses, f"replica {replica} never reported a loss"
        # against the initial parameters' loss: the first report may already average many steps
        assert losses[-1] < 0.5 * initial_loss("tiny"), (replica, losses, initial_loss("tiny"))
    # Both shards applied pushes from both replicas' workers.
    workers = {rep["member"] for rep in last["replicas"]}
    assert len(workers) == 2
    for shard in ("paramserver-0", "paramserver-1"):
        samples = m["shards"][shard]
        pushers = {
            s["labels"].get("worker")
            for s in samples
            if s["name"] == "downpour_paramserver_worker_pushes_total" and s["value"] > 0
        }
        assert workers <= pushers, (shard, workers, pushers)
    # Each replica reported the objective's terms per stage beside its loss.
    rows = [h for h in m["history"] if h["step"] > 0]
    assert rows
    for h in rows:
        for rep in h["replicas"]:
            assert {"stage1.reconstruction", "stage1.sparsity", "stage1.ratio"} <= set(rep["scalars"]), rep
    assert set(m["final_objective"]) == {"stage1", "stage2", "stage3"}
    assert m["final_objective"]["stage1"]["reconstruction"] > 0
    # The run directory has what a user needs afterwards.
    for name in ("job.yaml", "loss.png", "filters.png", "cluster.json"):
        assert (out / name).exists(), name
    manifests = list((out / "checkpoints").glob("*/MANIFEST.json"))
    assert manifests, "no committed checkpoint"


def test_a_worker_killed_mid_run_is_replaced_and_the_job_reaches_its_step_count(tmp_path, procs):
    out = tmp_path / "run"
    env = {"DOWNPOUR_LEASE_SECONDS": "2", "DOWNPOUR_CHECKPOINT_EVERY": "50"}
    proc = procs.up(out, "--quiet", "--preset", "tiny", "--replicas", "2", "--shards", "1", "--steps", "300", env=env)
    st = harness.wait_job(
        out, lambda st: any(s.replica == 1 and s.step >= 30 for s in st.slots), 90, "replica 1 at step 30", [proc]
    )
    slot = {s.replica: s for s in st.slots}[1]
    # whichever worker process holds replica 1's slot
    victim = next(r for r in harness.cluster(out).values() if r["address"] == slot.address)
    killed_at, killed_member = slot.step, slot.member_id
    os.kill(victim["pid"], signal.SIGKILL)
    assert proc.wait(180) == 0, proc.report()
    assert harness.cluster(out)[victim["name"]]["restarts"] >= 1
    assert killed_at < 300
    last = history(out)["history"][-1]
    assert [rep["step"] for rep in last["replicas"]] == [300, 300]
    # replica 1's slot went to another member, which resumed the replica's step rather than starting at 0
    assert last["replicas"][1]["member"] != killed_member
    # Slot hand-overs and the step a member starts from are told only in the coordinator's and workers' logs.
    coord_log = (out / "logs" / "coordinator.log").read_text()
    assert coord_log.count("-> replica 1 partition 0") >= 2
    starts = [
        int(line.split("from step ")[1].split()[0])
        for logf in (out / "logs").glob("worker-*.log")
        for line in logf.read_text().splitlines()
        if "replica 1 partition 0: training from step" in line
    ]
    assert max(starts) >= killed_at, starts


def test_a_time_budget_ends_the_job_short_of_its_steps_with_a_final_checkpoint(tmp_path):
    out = tmp_path / "run"
    t0 = time.monotonic()
    args = ["--preset", "tiny", "--replicas", "2", "--shards", "1", "--steps", "100000", "--max-seconds", "4"]
    r = up([*args, "--no-neurons"], out)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    assert took < 90, took  # start-up, 4 s of training, the last checkpoint and the stop
    final = history(out)["final"]
    assert final["ended_by"] == "time_budget"
    # the budget counts training only, and the end is seen within a tick of the checkpoint thread
    assert 4.0 <= final["training_seconds"] < 6.0, final
    manifest = cks.newest_valid(str(out / "checkpoints"))
    assert manifest is not None, "no valid final checkpoint"
    assert 0 < final["end_step"] <= manifest["step"] < 100000
    # every replica's reached step: the steps it took until it was told to stop, as reported last
    assert manifest["replica_steps"] == [rep["step"] for rep in final["replicas"]]
    assert manifest["step"] == min(manifest["replica_steps"]) == final["step"]
    assert jobconfig.from_yaml(manifest["config"]).max_seconds == 4.0


def test_resume_continues_the_step_count_from_the_checkpoint(tmp_path, initial_loss):
    out = tmp_path / "run"
    env = {"DOWNPOUR_CHECKPOINT_EVERY": "20"}
    r = up(["--preset", "tiny", "--replicas", "1", "--shards", "2", "--steps", "40"], out, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    first = history(out)
    first_losses = reported_losses(first, 0)
    r = up(["--resume", str(out), "--steps", "80"], out, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    second = history(out)
    steps = [h["replicas"][0]["step"] for h in second["history"] if h["replicas"]]
    assert steps[-1] == 80
    assert min(s for s in steps if s > 0) >= 40  # no step below the checkpoint's was run again
    # the step count above is the structured evidence; where the coordinator took it from is only in its log
    assert "resumed from checkpoint" in (out / "logs" / "coordinator.log").read_text()
    # the parameters came back too: training goes on from the trained loss, not the initial one
    assert first_losses
    assert reported_losses(second, 0)[0] < 0.5 * initial_loss("tiny")


def _alive(pids):
    """Those of ``pids`` still running (a zombie, exited but not reaped, is not)."""
    return [p for p in pids if os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2]]


def test_status_shows_the_running_cluster_and_ctrl_c_stops_every_child(tmp_path, procs):
    out = tmp_path / "run"
    proc = procs.up(out, "--quiet", "--preset", "tiny", "--replicas", "2", "--shards", "2", "--steps", "100000")

    def status():
        addr = harness.cluster(out).get("coordinator", {}).get("address")
        r = addr and harness.run_cli("status", "--coordinator", addr, timeout=30)
        # replica 1 joins once replica 0 has taken the warm start's steps
        if r and r.returncode == 0 and "JOB_STATE_RUNNING" in r.stdout and r.stdout.count("127.0.0.1:") >= 2 + 2:
            return r.stdout
        return None

    harness.wait_for(status, 90, "`downpour status` to show RUNNING with two workers and two shards", 0.3, [proc])
    # Once both replicas have reported: the per-stage objective in the status and the coordinator's gauges.

    def objective():
        text = status()
        return text if text and all(f"      {r} stage1" in text for r in (0, 1)) else None

    text = harness.wait_for(
        objective,
        60,
        "`downpour status` to show each replica's stage 1 objective",
        0.3,
        [proc],
    )
    assert "sp/rec" in text
    coord = harness.cluster(out)["coordinator"]
    ratio = harness.metric_value(
        harness.scrape(coord["metrics_port"]), "downpour_objective_term", replica="0", stage="stage1", term="ratio"
    )
    assert ratio is not None and ratio > 0
    # ``up`` also serves the neurons of the live parameters, pulled from the shards
    rows = harness.cluster(out)
    assert rows["neurons"]["role"] == "neurons"
    with NeuronsClient(rows["neurons"]["address"]) as nc:
        nc.wait_ready(60)
        info = nc.describe()
        acts = nc.activations(np.random.default_rng(0).random((2, 16, 16, 1)), "stage3.output")
    assert info.source.startswith("shards 127.0.0.1:"), info.source
    assert acts.values.shape[0] == 2 and acts.values.shape[1] > 0 and np.isfinite(acts.values).all()
    pids = [row["pid"] for row in harness.cluster(out).values()]
    assert proc.kill(signal.SIGINT, timeout=90) == 130
    # the launcher stops every child before it exits; reaping the last ones may take a moment
    harness.wait_for(lambda: not _alive(pids), 2, "every child to be gone after Ctrl-C")
    # Ctrl-C took a checkpoint first, so the run can be resumed.
    assert list((out / "checkpoints").glob("*/MANIFEST.json"))


def test_children_die_with_a_killed_launcher(tmp_path, procs):
    out = tmp_path / "run"
    proc = procs.up(out, "--quiet", "--preset", "tiny", "--replicas", "1", "--shards", "1", "--steps", "100000")
    names = {"paramserver-0", "feeder", "coordinator", "worker-0", "neurons"}
    rows = harness.wait_for(
        lambda: (r := harness.cluster(out)) and names <= set(r) and r, 90, "every child listed", 0.2, [proc]
    )
    pids = [r["pid"] for r in rows.values()]
    # every child past its start-up: each answers its health check
    harness.wait_for(
        lambda: all(harness.serving(r["address"]) for r in rows.values()), 60, "every child SERVING", 0.2, [proc]
    )
    proc.kill()  # no chance to stop anything: the kernel must tell the children
    harness.wait_for(lambda: not _alive(pids), 30, "the children to die with their launcher", 0.3)


def test_a_child_whose_port_was_taken_starts_again_on_another(tmp_path, monkeypatch):
    """Ports are picked free but bound later by the child: another program may take one first."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    real, calls = upmod.free_port, []

    def free_port():  # the first shard is handed the taken port
        calls.append(1)
        return port if len(calls) == 1 else real()

    monkeypatch.setattr(upmod, "free_port", free_port)
    cfg = jobconfig.load(env={}, overrides={"preset": "tiny", "replicas": 1, "shards": 1, "steps": 5})
    cluster = upmod.Cluster(cfg, str(tmp_path / "run"), resume=False, neurons=False)
    try:
        cluster.start(60)
        shard = next(c for c in cluster.children if c.role == "paramserver")
        assert shard.port != port and shard.alive()
        # its new port above is the evidence; the log says why it moved
        assert "cannot bind" in (tmp_path / "run" / "logs" / "paramserver-0.log").read_text().lower()
        upmod.wait_healthy(shard.address, 10)
    finally:
        cluster.stop()
        taken.close()
