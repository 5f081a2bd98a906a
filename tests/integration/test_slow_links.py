"""Slow and lossy links between workers and shards: a TCP proxy in front of each shard.

A cluster of real processes (2 shards, feeder, coordinator, 2 workers; the
``tiny`` network, ``shared_memory: false`` as between hosts) whose coordinator
hands out the proxies' addresses, so every pull and push crosses a proxy. The
test adds 50 ms each way and measures the rate, resets every connection over
and over (pushes in flight are retried), silences the links for longer than a
keepalive period (nothing waits past it), and lets the job finish. Then every
block's version on its shard (one per push applied) equals the pushes the
workers sent (one per step): no push applied twice, none lost.
"""

from __future__ import annotations

import os
import time

import pytest
import yaml

from tcpproxy import Proxy

pytestmark = pytest.mark.slow

STEPS = 400


def _status(address):
    from downpour.up import job_status

    try:
        return job_status(address, timeout=1.0)
    except Exception:  # noqa: BLE001
        return None


def _steps(st) -> list[int]:
    return [s.step for s in sorted(st.slots, key=lambda s: s.replica) if s.partition == 0]


def _rate(address: str, seconds: float) -> float:
    """Steps of all replicas per second over ``seconds``."""
    a = _status(address)
    t0 = time.monotonic()
    time.sleep(seconds)
    b = _status(address)
    return (sum(_steps(b)) - sum(_steps(a))) / (time.monotonic() - t0)


def _duplicates(metrics_port: int) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        fams = list(text_string_to_metric_families(r.read().decode()))
    return sum(s.value for f in fams for s in f.samples
               if s.name == "downpour_paramserver_pushes_total" and s.labels.get("outcome") == "duplicate")


def test_latency_cuts_and_silence_between_workers_and_shards(tmp_path):
    from downpour.rpc.options import KEEPALIVE_MS, KEEPALIVE_TIMEOUT_MS
    from downpour.up import Child, free_port, wait_healthy

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"preset": "tiny", "replicas": 2, "shards": 2, "steps": STEPS,
                                   "shared_memory": False, "checkpoint_every": 10000}))
    logs = tmp_path / "logs"
    logs.mkdir()
    children: list[Child] = []
    proxies: list[Proxy] = []

    def start(name, role, args):
        c = Child(name, role, args, free_port(), free_port(), str(logs / f"{name}.log"))
        c.start()
        children.append(c)
        return c

    try:
        shards = [start(f"paramserver-{i}", "paramserver", ["--shard-index", str(i), "--checkpoint-dir",
                                                              str(tmp_path / "ck")]) for i in range(2)]
        feeder = start("feeder", "feeder", ["--config", str(job)])
        for c in shards + [feeder]:
            wait_healthy(c.address, 90, c.proc)
        proxies = [Proxy(s.address) for s in shards]
        coord = start("coordinator", "coordinator", [
            "--config", str(job), "--shards", ",".join(p.address for p in proxies), "--feeder", feeder.address,
            "--state-dir", str(tmp_path / "state"), "--checkpoint-dir", str(tmp_path / "ck")])
        wait_healthy(coord.address, 90, coord.proc)
        for i in range(2):
            start(f"worker-{i}", "worker", ["--coordinator", coord.address])

        def wait_for(pred, what, timeout):
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                for c in children:
                    assert c.proc.poll() in (None, 0), f"{c.name} exited {c.proc.returncode}: " + \
                        open(c.log_path).read()[-2000:]
                st = _status(coord.address)
                if st is not None and pred(st):
                    return st
                time.sleep(0.2)
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")

        wait_for(lambda st: len(_steps(st)) == 2 and min(_steps(st)) >= 40, "both replicas training", 120)
        fast = _rate(coord.address, 3.0)
        for p in proxies:
            p.latency = 0.050
        slow = _rate(coord.address, 5.0)
        print(f"rate through the proxies: {fast:.1f} steps/s; with 50 ms each way: {slow:.1f} steps/s")
        assert slow > 0, "training stopped under 50 ms of latency"
        # Cut every connection, again and again, with pushes in flight (the latency keeps them in flight).
        before = sum(_steps(_status(coord.address)))
        for _ in range(8):
            time.sleep(0.6)
            for p in proxies:
                p.cut()
        st = wait_for(lambda st: sum(_steps(st)) > before + 10, "progress after the cuts", 30)
        # A silent link (every byte dropped, connections up) for longer than a keepalive period.
        for p in proxies:
            p.silent = True
        time.sleep((KEEPALIVE_MS + KEEPALIVE_TIMEOUT_MS) / 1000 + 2)
        for p in proxies:
            p.silent, p.latency = False, 0.0
        t_back = time.monotonic()
        quiet = sum(_steps(_status(coord.address)))
        wait_for(lambda st: sum(_steps(st)) > quiet + 4, "progress once the link speaks again", 40)
        resumed = time.monotonic() - t_back
        print(f"training resumed {resumed:.1f} s after the link came back")
        # Dead connections are found by keepalive (ping + timeout), then reconnected (backoff <= 2 s):
        # well inside a call's 30 s deadline.
        assert resumed < (KEEPALIVE_MS + KEEPALIVE_TIMEOUT_MS) / 1000 + 5, resumed
        wait_for(lambda st: _steps(st) == [STEPS, STEPS], "the job's last step", 120)
        assert sum(p.cuts for p in proxies) >= 16 and sum(p.connections for p in proxies) > 2
        # Exactly once: every block was updated once per push sent. Each worker pushes all of its
        # blocks once per step (n_push 1), so a block's version is the replicas' steps added up.
        from downpour.paramserver.client import ParamClient

        with ParamClient([s.address for s in shards]) as client:
            versions = {b.name: b.version for r in client.list_blocks() for b in r.blocks}
        assert versions and set(versions.values()) == {2 * STEPS}, versions
        print(f"{sum(p.cuts for p in proxies)} cuts; pushes the shards recognised as retries of one already "
              f"applied: {sum(_duplicates(s.metrics_port) for s in shards):.0f}")
        retried = sum(open(os.path.join(logs, f"worker-{i}.log")).read().count("retrying in") for i in range(2))
        assert retried > 0, "no push or pull was cut in flight: the cuts tested nothing"
    finally:
        for p in proxies:
            p.close()
        for c in reversed(children):
            c.terminate()
        for c in reversed(children):
            c.stop(10)
