"""One step's parameter traffic: push a gradient, get the updated parameters back.

    python benchmarks/push_pull.py [--preset small] [--repeats 30]

A real shard process on 127.0.0.1 holds the preset's blocks; one client does
``push_pull`` (the worker's default schedule) through each data plane:

  shared      the shared-memory file (gRPC carries control only)
  grpc f32    Pull and Push through gRPC, float32 on the wire
  grpc bf16   the same with bfloat16 on the wire (half the bytes)

against two limits measured in the same run: the shard's own Adagrad apply of
the same blocks in this process (work any plane must do), and memcpy of the
bytes a step moves (one gradient in, one set of parameters out). Prints the
milliseconds per round trip and the ratios; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time

import numpy as np

from downpour import optim
from downpour.nn import Network, presets
from downpour.paramserver.client import ParamClient


def start_shard() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "downpour.cli", "serve", "paramserver", "--host", "127.0.0.1", "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    while True:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit("the shard did not start")
        m = re.search(r"listening on port (\d+)", line)
        if m:
            return proc, f"127.0.0.1:{m.group(1)}"


def timed(fn, repeats: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    params = {k: np.asarray(v, np.float32) for k, v in Network(presets.get(args.preset)).init_params(0).items()}
    n = sum(v.size for v in params.values())
    grads = {k: np.full(v.shape, 1e-4, np.float32) for k, v in params.items()}
    proc, addr = start_shard()
    res: dict[str, float] = {}
    try:
        with ParamClient([addr], worker_id="init") as c:
            c.init(params)
            placement = dict(c.placement)
        for name, kw in (("shared", {"shared": True}), ("grpc f32", {}), ("grpc bf16", {"wire_dtype": "bfloat16"})):
            with ParamClient([addr], worker_id=f"bench-{name}", placement=placement, **kw) as c:
                c.pull(list(params))
                c.pull(list(params))  # the shared plane maps its file after the first pull
                # views: what a worker on the pushpull schedule asks for (no copy back)
                res[name] = timed(lambda c=c: c.push_pull(grads, views=True), args.repeats)
    finally:
        proc.kill()
    w = {k: v.reshape(-1).copy() for k, v in params.items()}
    acc = {k: np.full_like(v, 0.1) for k, v in w.items()}
    flat = {k: v.reshape(-1) for k, v in grads.items()}
    scratch = optim.Scratch()
    res["adagrad apply (limit)"] = timed(
        lambda: [optim.adagrad_(w[k], acc[k], flat[k], 0.01, 1e-6, scratch) for k in w], args.repeats
    )
    src, dst = np.ones(2 * n, np.float32), np.empty(2 * n, np.float32)
    res["memcpy of 2 x params (limit)"] = timed(lambda: np.copyto(dst, src), args.repeats)
    print(f"preset {args.preset}: {n} parameters, {4 * n / 1e6:.1f} MB each way per step")
    base = res["shared"]
    for k, v in res.items():
        print(f"{k:30s} {v:8.2f} ms   {v / base:5.2f} x shared")
    print(json.dumps({"preset": args.preset, "parameters": n, "ms": {k: round(v, 3) for k, v in res.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
