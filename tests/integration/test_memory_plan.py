"""The memory plan through the command line: ``downpour up`` refuses a job that cannot fit, in
seconds and with numbers, and a tiny job's processes peak where the plan says (measured)."""

from __future__ import annotations

import json
import os
import time

import pytest

import harness
from downpour import config as jobconfig
from downpour import memplan


def cli(*args, env=None, timeout=120):
    return harness.run_cli(*args, env=env, timeout=timeout)


def test_le2012_on_a_machine_too_small_is_refused_in_seconds_with_the_numbers(tmp_path):
    t0 = time.monotonic()
    r = cli("up", "--preset", "le2012", "--out", str(tmp_path / "run"), "--memory", "24G")
    took = time.monotonic() - t0
    assert r.returncode == 2, r.stderr[-2000:]
    assert took < 5.0, f"refusal took {took:.1f} s"
    err = r.stderr
    need = memplan.plan(jobconfig.load(None, overrides={"preset": "le2012"})).total
    assert "not started" in err and memplan._fmt(need) in err and "24.00 GiB" in err
    assert "paramserver-0" in err and "worker-0" in err  # the plan's per-process numbers
    assert "smallest layout that fits on" in err and "machines of 24.00 GiB" in err
    assert not (tmp_path / "run" / "cluster.json").exists()  # nothing was started


def test_a_tiny_job_under_a_tiny_limit_is_refused_before_any_process_starts(tmp_path):
    r = cli("up", "--preset", "tiny", "--steps", "1", "--out", str(tmp_path / "run"), "--memory", "100M")
    assert r.returncode == 2 and "100 MiB" in r.stderr and "not started" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run" / "logs").exists() or not any((tmp_path / "run" / "logs").glob("*.log"))


def test_model_plan_prints_every_process_and_json():
    r = cli("model", "--preset", "medium", "--plan", "--partitions", "2x2", "--shards", "2", "--replicas", "1")
    assert r.returncode == 0, r.stderr
    for name in ("paramserver-0", "paramserver-1", "worker-3", "feeder", "coordinator", "neurons"):
        assert name in r.stdout
    medium = memplan.plan(jobconfig.load(None, overrides={"preset": "medium"}))
    assert f"{medium.parameters / 1e6:,.1f} M parameters" in r.stdout and "this machine:" in r.stdout
    assert 149e6 < medium.parameters < 151e6  # medium with tied decoders: W1 only
    r = cli("model", "--preset", "small", "--plan", "--json", "--shards", "3")
    d = json.loads(r.stdout)
    assert sum(p["role"] == "paramserver" for p in d["processes"]) == 3
    assert d["total_bytes"] == sum(p["total_bytes"] for p in d["processes"])


def _hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_a_tiny_jobs_processes_peak_within_15_percent_of_the_plan(tmp_path, procs):
    run = tmp_path / "run"
    proc = procs.up(run, "--quiet", "--preset", "tiny", "--replicas", "1", "--shards", "1", "--steps", "20")
    peaks: dict[str, int] = {}
    deadline = time.monotonic() + 240
    while proc.alive() and time.monotonic() < deadline:
        for row in harness.cluster(run).values():
            if row.get("pid"):
                peaks[row["name"]] = max(peaks.get(row["name"], 0), _hwm(row["pid"]))
        time.sleep(0.1)  # the sampling period of the peaks: a measurement for the run's whole life, not a wait
    assert proc.wait(60) == 0, proc.report()
    plan = memplan.plan(jobconfig.load(str(run / "job.yaml")))
    seen = {p.name: p for p in plan.processes if peaks.get(p.name)}
    assert set(seen) == {p.name for p in plan.processes}, peaks
    for name, p in seen.items():
        ratio = peaks[name] / p.total
        assert 0.85 <= ratio <= 1.15, f"{name}: measured {peaks[name] >> 20} MiB, planned {p.total >> 20} MiB"
