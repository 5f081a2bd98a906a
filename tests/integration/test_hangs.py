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

pytestmark = pytest.mark.slow

STALL_BOUND_S = 15.0  # the target: >= 80% of the rate back within 15 s
RECOVERED = 0.8
HANG_SECONDS = 5.0  # the default


def _cluster(out) -> dict[str, dict]:
    with open(os.path.join(out, "cluster.json")) as f:
        return {r["name"]: r for r in json.load(f)}


class Rate:
    """Total steps of all replicas over time, polled from the coordinator."""

    def __init__(self, address: str):
        self.address = address
        self.samples: list[tuple[float, int]] = []

    def poll(self) -> int | None:
        from downpour.up import job_status

        try:
            st = job_status(self.address, timeout=1.0)
        except Exception:  # noqa: BLE001 - a stopped or restarting coordinator: no sample
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
        while time.monotonic() < end:
            self.poll()
            time.sleep(0.2)


def _stop_and_measure(proc, out, rate: Rate, name: str, window: float = 2.0, before_window: float = 4.0,
                      limit: float = 40.0) -> dict:
    """SIGSTOP child ``name``; seconds until the rate over the last ``window`` seconds is back to 80%
    of its rate over the ``before_window`` seconds before the stop."""
    rate.sample_for(before_window + 0.5)
    now = time.monotonic()
    before = rate.over(now - before_window, now)
    assert before > 0, f"no progress before stopping {name}: {rate.samples[-5:]}"
    row = _cluster(out)[name]
    pid = row["pid"]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    killed_at = recovered_at = None
    try:
        while time.monotonic() - t0 < limit and proc.poll() is None:
            rate.poll()
            now = time.monotonic()
            if killed_at is None and _cluster(out)[name]["pid"] != pid:
                killed_at = now  # the launcher killed it and started a new one
            # Recovered: the stopped process has been replaced, and the rate over a window that
            # starts after the stop is back to 80% (steps taken before the stop do not count).
            if killed_at is not None and now - window >= t0 and rate.over(now - window, now) >= RECOVERED * before:
                recovered_at = now
                break
            time.sleep(0.2)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)  # if it was never killed, do not leave it stopped
        except ProcessLookupError:
            pass
    return {"name": name, "rate_before": before, "replaced_after_s": None if killed_at is None else killed_at - t0,
            "recovered_within_s": None if recovered_at is None else recovered_at - t0,
            "hangs": _cluster(out)[name]["hangs"]}


def test_sigstop_of_each_role_is_detected_replaced_and_the_job_completes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "downpour.cli", "up", "--quiet", "--out", str(out), "--preset", "tiny",
           "--replicas", "2", "--shards", "2", "--steps", "100000"]
    env = dict(os.environ, DOWNPOUR_HANG_SECONDS=str(HANG_SECONDS), DOWNPOUR_CHECKPOINT_EVERY="50")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    results = []
    try:
        deadline = time.monotonic() + 90
        while not (out / "cluster.json").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        rate = Rate(_cluster(out)["coordinator"]["address"])
        while (rate.poll() or 0) < 60 and time.monotonic() < deadline:  # past start-up and warm start
            time.sleep(0.3)
        for name in ("paramserver-0", "worker-0", "feeder", "neurons", "coordinator"):
            results.append(_stop_and_measure(proc, out, rate, name))
            print(json.dumps(results[-1]), flush=True)
        print(json.dumps(results, indent=1))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # checkpoint and stop
        try:
            _, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
    # Ended by us (Ctrl-C: a last checkpoint, then every child stopped): its step count is beyond
    # reach on purpose, so that every stop happens mid-run whatever this machine's speed.
    assert proc.returncode == 130, err[-3000:]
    err = " ".join(err.split())  # the console wraps long lines
    assert "last checkpoint was not written" not in err, err[-3000:]
    from downpour import checkpoint as cks

    manifests = cks.list_manifests(str(out / "checkpoints"))
    assert manifests, "no committed checkpoint"
    for m in manifests:
        cks.verify(str(out / "checkpoints"), m)  # raises on a corrupt or partial one
    assert "shard 0 restored from checkpoint" in (out / "logs" / "coordinator.log").read_text()
    for r in results:
        assert f"{r['name']} (pid" in err and f"restarted {r['name']} (exit code -9" in err, (r, err[-3000:])
        assert r["replaced_after_s"] is not None, (r, err[-3000:])
        # killed once silent for hang_seconds (probes every 0.5 s), restarted at the launcher's next look
        assert HANG_SECONDS <= r["replaced_after_s"] <= HANG_SECONDS + 4, r
        assert r["hangs"] == 1, r
        assert r["recovered_within_s"] is not None and r["recovered_within_s"] <= STALL_BOUND_S, r


def test_the_container_health_check_kills_a_service_that_stopped_answering(tmp_path):
    """deploy/docker/healthcheck.py --kill-hung (what compose runs): a real shard, answered, then SIGSTOPped."""
    from downpour.up import free_port

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    port = free_port()
    shard = subprocess.Popen([sys.executable, "-m", "downpour.cli", "serve", "paramserver", "--host", "127.0.0.1",
                              "--port", str(port), "--metrics-port", "0"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = dict(os.environ, HEALTHCHECK_PORT=str(port), HEALTHCHECK_PID=str(shard.pid),
               HEALTHCHECK_STATE=str(tmp_path / "health.json"))

    def check(*extra):
        return subprocess.run([sys.executable, os.path.join(root, "deploy", "docker", "healthcheck.py"),
                               "--kill-hung", "2", "--timeout", "1", *extra], env=env, capture_output=True,
                              text=True, timeout=30)

    try:
        from downpour.rpc.channel import open_channel, wait_ready

        with open_channel(f"127.0.0.1:{port}") as ch:
            wait_ready(ch, 60)
        assert check().returncode == 0  # SERVING, and its answer is remembered
        os.kill(shard.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        first = check()
        assert first.returncode == 1 and shard.poll() is None, first.stdout  # silent for less than 2 s: kept
        while shard.poll() is None and time.monotonic() - t0 < 20:
            r = check()
        assert shard.wait(5) == -signal.SIGKILL, r.stdout
        assert "killed as hung" in r.stdout
        assert 2.0 < time.monotonic() - t0 < 10.0
    finally:
        if shard.poll() is None:
            shard.kill()
            shard.wait()
