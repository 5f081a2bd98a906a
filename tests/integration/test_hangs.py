"""Hung processes are treated as dead: SIGSTOP each role of a real ``downpour up`` in turn.

One ``downpour up --preset tiny --replicas 2 --shards 2`` run; for a shard, a
worker, the feeder, the neurons service and the coordinator in turn, the test
measures the cluster's rate (steps of all replicas per second, from the
coordinator's JobStatus) over 4 s, stops the process with SIGSTOP and measures
how long until the rate over the last 2 s is back to 80% of what it was. The
launcher must kill the stopped process (it no longer answers its health check)
within the job's ``hang_seconds`` and restart it; the coordinator refills a
restarted shard from the newest valid checkpoint. The run is then stopped
with Ctrl-C, takes its last checkpoint, and every committed checkpoint verifies.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import harness
from downpour import checkpoint as cks

pytestmark = pytest.mark.slow

STALL_BOUND_S = 15.0  # the target: >= 80% of the rate back within 15 s
RECOVERED = 0.8
HANG_SECONDS = 5.0  # the default


class Rate:
    """Total steps of all replicas over time, polled from the coordinator."""

    def __init__(self, out):
        self.out = out
        self.samples: list[tuple[float, int]] = []

    def poll(self) -> int | None:
        st = harness.job_status(self.out)
        if st is None:  # a stopped or restarting coordinator: no sample
            return None
        total = sum(s.step for s in st.slots if s.partition == 0)
        self.samples.append((time.monotonic(), total))
        return total

    def over(self, t0: float, t1: float) -> float:
        pts = [(t, n) for t, n in self.samples if t0 <= t <= t1]
        if len(pts) < 2 or pts[-1][0] - pts[0][0] <= 0:
            return 0.0
        return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])

    def sample_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:  # a rate is measured over a span of time: the span is the point
            self.poll()
            time.sleep(0.2)


def _stop_and_measure(
    proc, out, rate: Rate, name: str, window: float = 2.0, before_window: float = 4.0, limit: float = 40.0
) -> dict:
    """SIGSTOP child ``name``; seconds until the rate over the last ``window`` seconds is back to 80%
    of its rate over the ``before_window`` seconds before the stop."""
    rate.sample_for(before_window + 0.5)
    now = time.monotonic()
    before = rate.over(now - before_window, now)
    assert before > 0, f"no progress before stopping {name}: {rate.samples[-5:]}"
    pid = harness.cluster(out)[name]["pid"]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    killed_at = None

    def recovered() -> float | None:
        nonlocal killed_at
        rate.poll()
        now = time.monotonic()
        if killed_at is None and harness.cluster(out)[name]["pid"] != pid:
            killed_at = now  # the launcher killed it and started a new one
        # Recovered: the stopped process has been replaced, and the rate over a window that
        # starts after the stop is back to 80% (steps taken before the stop do not count).
        ok = killed_at is not None and now - window >= t0 and rate.over(now - window, now) >= RECOVERED * before
        return now if ok else None

    try:
        recovered_at = harness.wait_for(recovered, limit, f"the rate back after stopping {name}", 0.2, [proc])
    except TimeoutError:
        recovered_at = None  # reported in the result, and the test fails on it
    finally:
        try:
            os.kill(pid, signal.SIGCONT)  # if it was never killed, do not leave it stopped
        except ProcessLookupError:
            pass
    return {
        "name": name,
        "rate_before": before,
        "replaced_after_s": None if killed_at is None else killed_at - t0,
        "recovered_within_s": None if recovered_at is None else recovered_at - t0,
        "hangs": harness.cluster(out)[name]["hangs"],
    }


def test_sigstop_of_each_role_is_detected_replaced_and_the_job_completes(tmp_path, procs):
    out = tmp_path / "run"
    env = {"DOWNPOUR_HANG_SECONDS": str(HANG_SECONDS), "DOWNPOUR_CHECKPOINT_EVERY": "50"}
    proc = procs.up(
        out,
        "--quiet",
        *harness.TINY_CLUSTER,
        "--steps",
        "100000",
        env=env,
        new_session=True,
    )
    results = []
    try:
        harness.wait_for(lambda: harness.cluster(out), 90, "cluster.json", 0.2, [proc])
        rate = Rate(out)
        harness.wait_for(lambda: (rate.poll() or 0) >= 60, 90, "60 steps: past start-up and warm start", 0.3, [proc])
        for name in ("paramserver-0", "worker-0", "feeder", "neurons", "coordinator"):
            results.append(_stop_and_measure(proc, out, rate, name))
            print(json.dumps(results[-1]), flush=True)
        print(json.dumps(results, indent=1))
    finally:
        code = proc.kill(signal.SIGINT, timeout=90)  # checkpoint and stop
    # Ended by us (Ctrl-C: a last checkpoint, then every child stopped): its step count is beyond
    # reach on purpose, so that every stop happens mid-run whatever this machine's speed.
    err = " ".join(proc.text().split())  # the console wraps long lines
    assert code == 130, err[-3000:]
    # Whether the last checkpoint was written is told only on the console (the exit code is Ctrl-C's).
    assert "last checkpoint was not written" not in err, err[-3000:]
    manifests = cks.list_manifests(str(out / "checkpoints"))
    assert manifests, "no committed checkpoint"
    for m in manifests:
        cks.verify(str(out / "checkpoints"), m)  # raises on a corrupt or partial one
    # Where a refilled shard's values came from is told only in the coordinator's log.
    assert "shard 0 restored from checkpoint" in (out / "logs" / "coordinator.log").read_text()
    rows = harness.cluster(out)
    for r in results:
        assert rows[r["name"]]["restarts"] >= 1, (r, rows[r["name"]])
        assert r["replaced_after_s"] is not None, (r, err[-3000:])
        # killed once silent for hang_seconds (probes every 0.5 s), restarted at the launcher's next look
        assert HANG_SECONDS <= r["replaced_after_s"] <= HANG_SECONDS + 4, r
        assert r["hangs"] == 1, r  # killed as hung (SIGKILL), not restarted for another reason
        assert r["recovered_within_s"] is not None and r["recovered_within_s"] <= STALL_BOUND_S, r


def test_the_container_health_check_kills_a_service_that_stopped_answering(tmp_path, procs):
    """deploy/docker/healthcheck.py --kill-hung (what compose runs): a real shard, answered, then SIGSTOPped."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    shard = procs.serve("paramserver")
    env = dict(
        os.environ,
        HEALTHCHECK_PORT=str(shard.port),
        HEALTHCHECK_PID=str(shard.pid),
        HEALTHCHECK_STATE=str(tmp_path / "health.json"),
    )

    def check(*extra):
        return subprocess.run(
            [
                sys.executable,
                os.path.join(root, "deploy", "docker", "healthcheck.py"),
                "--kill-hung",
                "2",
                "--timeout",
                "1",
                *extra,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    assert check().returncode == 0  # SERVING, and its answer is remembered
    os.kill(shard.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    first = check()
    assert first.returncode == 1 and shard.alive(), first.stdout  # silent for less than 2 s: kept
    checks = [first]
    harness.wait_for(
        lambda: checks.append(check()) or not shard.alive(), 20, "the health check to kill the shard", every=0
    )
    assert shard.wait(5) == -signal.SIGKILL, checks[-1].stdout
    assert "killed as hung" in checks[-1].stdout  # the check's own report: its output is all it has
    assert 2.0 < time.monotonic() - t0 < 10.0
