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

import time

import pytest
import yaml

import harness
from downpour.paramserver.client import ParamClient
from downpour.rpc.options import KEEPALIVE_MS, KEEPALIVE_TIMEOUT_MS
from tcpproxy import Proxy

pytestmark = pytest.mark.slow

STEPS = 400


def _steps(st) -> list[int]:
    return [s.step for s in sorted(st.slots, key=lambda s: s.replica) if s.partition == 0]


def _rate(address: str, seconds: float) -> float:
    """Steps of all replicas per second over ``seconds``."""
    a = harness.job_status_at(address)
    t0 = time.monotonic()
    time.sleep(seconds)  # a rate is measured over a span of time: the span is the point
    b = harness.job_status_at(address)
    return (sum(_steps(b)) - sum(_steps(a))) / (time.monotonic() - t0)


def test_latency_cuts_and_silence_between_workers_and_shards(tmp_path, procs):
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "preset": "tiny",
                "replicas": 2,
                "shards": 2,
                "steps": STEPS,
                "shared_memory": False,
                "checkpoint_every": 10000,
            }
        )
    )
    proxies: list[Proxy] = []
    try:
        shards = [
            procs.serve(
                "paramserver",
                "--shard-index",
                str(i),
                "--checkpoint-dir",
                str(tmp_path / "ck"),
                metrics=True,
                wait=False,
            )
            for i in range(2)
        ]
        feeder = procs.serve("feeder", "--config", str(job), metrics=True, wait=False)
        for c in shards + [feeder]:
            c.wait_serving(90)
        proxies = [Proxy(s.address) for s in shards]
        coord = procs.serve(
            "coordinator",
            "--config",
            str(job),
            "--shards",
            ",".join(p.address for p in proxies),
            "--feeder",
            feeder.address,
            "--state-dir",
            str(tmp_path / "state"),
            "--checkpoint-dir",
            str(tmp_path / "ck"),
            metrics=True,
            deadline=90,
        )
        workers = [procs.serve("worker", "--coordinator", coord.address, metrics=True, wait=False) for _ in range(2)]
        servers = [*shards, feeder, coord]

        def wait_for(pred, what, timeout, running=(*servers, *workers)):
            """A JobStatus that satisfies ``pred``; any of ``running`` exiting ends the wait."""
            return harness.wait_for(
                lambda: (st := harness.job_status_at(coord.address)) is not None and pred(st) and st,
                timeout,
                what,
                0.2,
                running,
            )

        wait_for(lambda st: len(_steps(st)) == 2 and min(_steps(st)) >= 40, "both replicas training", 120)
        fast = _rate(coord.address, 3.0)
        for p in proxies:
            p.latency = 0.050
        slow = _rate(coord.address, 5.0)
        print(f"rate through the proxies: {fast:.1f} steps/s; with 50 ms each way: {slow:.1f} steps/s")
        assert slow > 0, "training stopped under 50 ms of latency"
        # Cut every connection, again and again, with pushes in flight (the latency keeps them in flight).
        before = sum(_steps(harness.job_status_at(coord.address)))
        for _ in range(8):
            time.sleep(0.6)  # cuts paced to catch calls in flight: the pace is the behaviour under test
            for p in proxies:
                p.cut()
        wait_for(lambda st: sum(_steps(st)) > before + 10, "progress after the cuts", 30)
        retried = sum(w.metric("downpour_param_client_retries_total") or 0 for w in workers)
        assert retried > 0, "no push or pull was cut in flight: the cuts tested nothing"
        # A silent link (every byte dropped, connections up) for longer than a keepalive period.
        for p in proxies:
            p.silent = True
        time.sleep((KEEPALIVE_MS + KEEPALIVE_TIMEOUT_MS) / 1000 + 2)  # the silence is the behaviour under test
        for p in proxies:
            p.silent, p.latency = False, 0.0
        t_back = time.monotonic()
        quiet = sum(_steps(harness.job_status_at(coord.address)))
        wait_for(lambda st: sum(_steps(st)) > quiet + 4, "progress once the link speaks again", 40)
        resumed = time.monotonic() - t_back
        print(f"training resumed {resumed:.1f} s after the link came back")
        # Dead connections are found by keepalive (ping + timeout), then reconnected (backoff <= 2 s):
        # well inside a call's 30 s deadline.
        assert resumed < (KEEPALIVE_MS + KEEPALIVE_TIMEOUT_MS) / 1000 + 5, resumed
        # workers exit (code 0) once the job is over: only the servers' exits end this wait
        wait_for(lambda st: _steps(st) == [STEPS, STEPS], "the job's last step", 120, servers)
        assert sum(p.cuts for p in proxies) >= 16 and sum(p.connections for p in proxies) > 2
        # Exactly once: every block was updated once per push sent. Each worker pushes all of its
        # blocks once per step (n_push 1), so a block's version is the replicas' steps added up.
        with ParamClient([s.address for s in shards]) as client:
            versions = {b.name: b.version for r in client.list_blocks() for b in r.blocks}
        assert versions and set(versions.values()) == {2 * STEPS}, versions
        print(
            f"{sum(p.cuts for p in proxies)} cuts; pushes the shards recognised as retries of one already "
            f"applied: {sum(s.metric('downpour_paramserver_pushes_total', outcome='duplicate') or 0 for s in shards):.0f}"
        )
    finally:
        for p in proxies:
            p.close()
