"""Each process's peak memory in ``downpour up`` runs, against the memory plan.

    python benchmarks/memory.py [--runs tiny small small-2x2 medium] [--json out.json]

Runs ``downpour up`` for each layout (a few steps each) and samples every
child's /proc/<pid>/status every 0.1 s: VmHWM, the kernel's own high-water
mark of the resident set (shared-memory pages a process touched included), so
the last sample before a process exits is its peak. Prints, per process, the
measured peak, the plan's number (``downpour.memplan``) and their ratio, then
how memory per process grows with the model and falls with partitions and
shards, and one JSON line. The plan is meant to be within 15% of every peak.

The neurons service is planned for a query of 256 images at the top layer; in
a ``downpour up`` run nobody queries it, so its peak there is its idle one
(printed, not judged). After each run, a neurons service on the run's final
checkpoint (the same role and plan entry) answers one 256-image
GetActivations at the top stage's output, and that peak is the one compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from downpour import config as jobconfig
from downpour import memplan
from downpour.client import NeuronsClient
from downpour.memshapes import NEURONS_QUERY_IMAGES
from downpour.up import free_port, wait_healthy

# name: (preset, replicas, grid, shards, steps, batch size, learning rate)
RUNS = {
    "tiny": ("tiny", 1, "1x1", 1, 20, 32, None),
    "small": ("small", 1, "1x1", 1, 10, 32, None),
    "small-2x2": ("small", 1, "2x2", 2, 10, 32, None),
    # The default 0.01 (tuned on small) diverges on medium's first Adagrad steps: its decoders
    # start ~10x smaller than a sign-sized step of 0.01.
    "medium": ("medium", 1, "2x2", 2, 4, 8, 0.001),
}


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "VmRSS", "RssShmem"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def queried_neurons_peak(run: str, cfg) -> int:
    """VmHWM of a neurons service on ``run``'s checkpoints after one 256-image query at the top stage."""
    port = free_port()
    cmd = [sys.executable, "-m", "downpour.cli", "serve", "neurons", "--port", str(port)]
    cmd += ["--checkpoint-dir", os.path.join(run, "checkpoints")]
    with open(os.path.join(run, "neurons-query.log"), "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"127.0.0.1:{port}", 120, proc)
        spec = cfg.network_spec()
        c, h, w = spec.input
        top = f"stage{len(spec.stages)}.pool"
        x = np.random.default_rng(0).integers(0, 256, (NEURONS_QUERY_IMAGES, h, w, c), np.uint8)
        client = NeuronsClient(f"127.0.0.1:{port}", timeout=600)
        client.activations(x, top, neurons=[0])  # [batch, H, W, C], C = 1 too
        client.close()
        return _status(proc.pid).get("VmHWM", 0)
    finally:
        proc.terminate()
        proc.wait(30)


def measure(name: str, out_dir: str) -> dict:
    preset, replicas, grid, shards, steps, batch, lr = RUNS[name]
    run = os.path.join(out_dir, name)
    cmd = [
        sys.executable,
        "-m",
        "downpour.cli",
        "up",
        "--quiet",
        "--out",
        run,
        "--preset",
        preset,
        "--replicas",
        str(replicas),
        "--partitions",
        grid,
        "--shards",
        str(shards),
        "--steps",
        str(steps),
        "--batch-size",
        str(batch),
    ]
    t0 = time.time()
    env = dict(os.environ, **({"DOWNPOUR_OPTIMIZER__LR": str(lr)} if lr else {}))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peaks: dict[str, int] = {}
    pids: dict[str, int] = {}
    while proc.poll() is None:
        try:
            with open(os.path.join(run, "cluster.json"), encoding="utf-8") as f:
                for row in json.load(f):
                    if row.get("pid"):
                        pids[row["name"]] = row["pid"]
        except (OSError, ValueError):
            pass
        for n, pid in pids.items():
            hwm = _status(pid).get("VmHWM")
            if hwm:
                peaks[n] = max(peaks.get(n, 0), hwm)
        time.sleep(0.1)
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"{name}: downpour up exited {proc.returncode}:\n{output[-3000:]}")
    with open(os.path.join(run, "metrics.json"), encoding="utf-8") as f:
        history = json.load(f).get("history") or [{}]
    last = history[-1]
    losses = [r.get("loss") for r in last.get("replicas", [])]
    first = next((h for h in history if any(r.get("loss") for r in h.get("replicas", []))), last)
    first_losses = [r.get("loss") for r in first.get("replicas", [])]
    cfg = jobconfig.load(os.path.join(run, "job.yaml"))
    plan = memplan.plan(cfg)
    rows = []
    for p in plan.processes:
        if p.name not in peaks:
            continue
        if p.role == "neurons":
            idle = peaks[p.name]
            peaks[p.name] = queried_neurons_peak(run, cfg)
            print(
                f"  ({name}: the neurons service peaked at {idle / 2**20:.0f} MiB idle in the run, "
                f"{peaks[p.name] / 2**20:.0f} MiB answering a 256-image query)"
            )
        rows.append(
            {
                "process": p.name,
                "role": p.role,
                "measured": peaks[p.name],
                "planned": p.total,
                "ratio": peaks[p.name] / p.total,
                "parts": p.parts,
            }
        )
    return {
        "run": name,
        "preset": preset,
        "replicas": replicas,
        "grid": grid,
        "shards": shards,
        "steps": steps,
        "batch_size": batch,
        "parameters": plan.parameters,
        "seconds": time.time() - t0,
        "processes": rows,
        "final_step": last.get("step"),
        "final_losses": losses,
        "first_losses": first_losses,
        "total_measured": sum(r["measured"] for r in rows),
        "total_planned": plan.total,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="downpour-memory-") as tmp:
        for name in args.runs:
            r = measure(name, tmp)
            results.append(r)
            print(
                f"\n{name}: {r['preset']} ({r['parameters'] / 1e6:.1f} M parameters), {r['replicas']} replica, "
                f"grid {r['grid']}, {r['shards']} shard(s), batch {r['batch_size']}, {r['steps']} steps; "
                f"reached step {r['final_step']}, loss first logged {r['first_losses']}, last {r['final_losses']}, "
                f"{r['seconds']:.0f} s"
            )
            print(f"  {'process':<14} {'measured MiB':>12} {'planned MiB':>12} {'ratio':>6}")
            for row in r["processes"]:
                print(
                    f"  {row['process']:<14} {row['measured'] / 2**20:>12.0f} {row['planned'] / 2**20:>12.0f} "
                    f"{row['ratio']:>6.2f}"
                )
            print(f"  {'all':<14} {r['total_measured'] / 2**20:>12.0f} {r['total_planned'] / 2**20:>12.0f}")
    print("\nlargest process of each role (MiB, measured):")
    roles = sorted({row["role"] for r in results for row in r["processes"]})
    print(f"  {'run':<10} {'params M':>8} " + " ".join(f"{ro:>11}" for ro in roles))
    for r in results:
        by = {ro: max((row["measured"] for row in r["processes"] if row["role"] == ro), default=0) for ro in roles}
        print(f"  {r['run']:<10} {r['parameters'] / 1e6:>8.1f} " + " ".join(f"{by[ro] / 2**20:>11.0f}" for ro in roles))
    worst = max(abs(row["ratio"] - 1) for r in results for row in r["processes"])
    summary = {"runs": results, "worst_deviation": worst}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    print(
        json.dumps(
            {
                "worst_deviation": round(worst, 3),
                "ratios": {
                    r["run"]: {row["process"]: round(row["ratio"], 3) for row in r["processes"]} for r in results
                },
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
