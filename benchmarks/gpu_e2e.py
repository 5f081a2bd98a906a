"""End to end on a GPU: ``downpour up --device gpu`` trains ``tiny`` for a few steps.

    PYTHONPATH=services python3 benchmarks/gpu_e2e.py --out e2e.json [--device gpu] [--steps 40]

Two replicas of ``tiny`` on one GPU against one parameter shard (real
processes on loopback, as ``downpour up`` always runs), the neurons service
on the GPU as well. Checks that every worker and the neurons service
computed on the GPU (their logs), that the job reached its step count and
exited 0, and that the loss went down; writes what it saw as JSON. Where a
module the services need is missing, writes the reason and exits 0 without
running (a GPU host without the services' dependencies can still run the
kernel checks). ``--device cpu`` runs the same check without a GPU.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

NEEDED = [
    "yaml",
    "grpc",
    "grpc_health.v1.health",
    "grpc_reflection.v1alpha.reflection",
    "google.protobuf",
    "downpour.v1.coordinator_pb2_grpc",
    "prometheus_client",
    "PIL",
    "skimage",
    "rich",
    "matplotlib",
    "cryptography",
]


def missing_modules() -> list[str]:
    out = []
    for m in NEEDED:
        try:
            importlib.import_module(m)
        except Exception as e:  # noqa: BLE001 - a version mismatch (protobuf, grpc stubs) counts as missing too
            out.append(f"{m} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="gpu", choices=["cpu", "gpu"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--timeout", type=float, default=150.0)
    args = ap.parse_args(argv)
    result: dict = {"device": args.device, "preset": "tiny", "replicas": 2, "shards": 1, "steps": args.steps}
    miss = missing_modules()
    if miss:
        result.update(ok=None, skipped="modules the services need are missing: " + "; ".join(miss))
        print(result["skipped"])
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        return 0
    run = tempfile.mkdtemp(prefix="downpour-e2e-")
    cmd = [
        sys.executable,
        "-m",
        "downpour.cli",
        "up",
        "--preset",
        "tiny",
        "--device",
        args.device,
        "--replicas",
        "2",
        "--shards",
        "1",
        "--steps",
        str(args.steps),
        "--batch-size",
        "16",
        "--quiet",
        "--out",
        os.path.join(run, "run"),
    ]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        rc, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, err = "timeout", (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["exit_code"] = rc
    result["stderr_tail"] = err[-1500:]
    logs = {
        os.path.basename(f): open(f, encoding="utf-8", errors="replace").read()
        for f in glob.glob(os.path.join(run, "run", "logs", "*.log"))
    }
    want = f"computing on {args.device}"
    result["workers"] = sorted(n for n in logs if n.startswith("worker"))
    result["workers_on_device"] = sorted(n for n, t in logs.items() if n.startswith("worker") and want in t)
    result["neurons_on_device"] = any(want in t for n, t in logs.items() if n.startswith("neurons"))
    result["tracebacks"] = sorted(n for n, t in logs.items() if "Traceback" in t)
    for n in result["tracebacks"]:
        result[f"log_tail_{n}"] = logs[n][-1500:]
    try:
        with open(os.path.join(run, "run", "metrics.json"), encoding="utf-8") as f:
            m = json.load(f)
        # per replica, the first and last reported losses (null until a replica has reported)
        seen = [
            [
                r["loss"]
                for h in m["history"]
                if i < len(h["replicas"])
                for r in [h["replicas"][i]]
                if r["loss"] is not None and r["step"] > 0
            ]
            for i in range(2)
        ]
        first, last = [s[0] for s in seen], [s[-1] for s in seen]
        result.update(
            loss_first=first,
            loss_last=last,
            final=m.get("final"),
            examples_per_second_mean=m.get("examples_per_second_mean"),
        )
        # A replica may report once (it can finish its steps within one report window), so
        # compare the job's final losses with the first loss any replica reported.
        earliest = next(
            r["loss"] for h in m["history"] for r in h["replicas"] if r["loss"] is not None and r["step"] > 0
        )
        loss_down = sum(last) / len(last) < earliest
    except (OSError, KeyError, IndexError, ValueError) as e:
        result["metrics_error"] = f"{type(e).__name__}: {e}"
        loss_down = False
    result["ok"] = bool(
        rc == 0
        and len(result["workers"]) == 2
        and result["workers_on_device"] == result["workers"]
        and result["neurons_on_device"]
        and not result["tracebacks"]
        and loss_down
    )
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("ok", "exit_code", "seconds", "workers_on_device", "neurons_on_device")
                if k in result
            }
        )
    )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
