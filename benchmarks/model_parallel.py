"""Model parallelism: halo traffic and throughput of 1x1, 1x2 and 2x2 grids, in one run.

    python benchmarks/model_parallel.py [--preset small] [--steps 60] [--batch-size 32]

For each grid, one replica of the preset:
  * bytes exchanged between partitions per step (halos forward and backward,
    reconstruction sums, LCN reductions), counted by the in-process driver
    on a real batch, against the replica's total activation bytes (the halo
    fraction);
  * examples/s of ``downpour up --partitions RxC`` (one replica, one shard),
    over the steady part of the run.
The last line is JSON with the ratios to 1x1.

What a 2-core machine can and cannot show: the bytes are exact whatever the
machine; the throughput cannot improve with partitions here, because every
partition is a process competing for the same two cores, and the halo
exchange adds serialisation and a synchronisation round per sub-layer. Model
parallelism pays when partitions get cores (machines) of their own and the
layers are large enough that compute dominates the exchange (le2012).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from downpour import config as jobconfig
from downpour.nn import Network
from downpour.partition import LocalReplica, plan, split_params
from downpour.up import run, steady_rate

GRIDS = ((1, 1), (1, 2), (2, 2))


def halo_bytes(cfg: jobconfig.JobConfig, rows: int, cols: int) -> tuple[int, int]:
    spec = cfg.network_spec()
    pl = plan(spec, rows, cols)
    blocks = split_params(pl, Network(spec).init_params(0))
    x = np.random.default_rng(0).normal(size=(cfg.batch_size, *spec.input)).astype(np.float32)
    res = LocalReplica(pl).tica(blocks, x)
    return res.stats.total_bytes, pl.activation_bytes(cfg.batch_size, 4)


def throughput(cfg: jobconfig.JobConfig, rows: int, cols: int) -> float:
    c = jobconfig.JobConfig(**{**cfg.__dict__, "partitions": f"{rows}x{cols}"})
    with tempfile.TemporaryDirectory() as out:
        if run(c, out, quiet=True) != 0:
            raise SystemExit(f"downpour up failed for {rows}x{cols}; see {out}/logs")
        with open(os.path.join(out, "metrics.json")) as f:
            return steady_rate(json.load(f)["history"], c.steps, c.batch_size)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    cfg = jobconfig.load(
        env={},
        overrides={
            "preset": args.preset,
            "steps": args.steps,
            "replicas": 1,
            "shards": 1,
            "batch_size": args.batch_size,
            "checkpoint_every": 10**6,
        },
    )
    print(f"preset {args.preset}, batch {args.batch_size}, 1 replica, 1 shard, {os.cpu_count()} cores")
    print(f"{'grid':>5} {'exchanged/step':>15} {'activations':>12} {'fraction':>9} {'examples/s':>11} {'vs 1x1':>7}")
    rows = {}
    for r, c in GRIDS:
        sent, act = halo_bytes(cfg, r, c)
        rate = throughput(cfg, r, c)
        rows[f"{r}x{c}"] = {
            "exchanged_bytes_per_step": sent,
            "activation_bytes": act,
            "halo_fraction": round(sent / act, 4),
            "examples_per_s": round(rate, 1),
        }
        base = rows["1x1"]["examples_per_s"]
        print(f"{r}x{c:<3} {sent / 1e6:12.2f} MB {act / 1e6:9.2f} MB {sent / act:9.3f} {rate:11.1f} {rate / base:7.2f}")
    base = rows["1x1"]["examples_per_s"]
    for v in rows.values():
        v["throughput_vs_1x1"] = round(v["examples_per_s"] / base, 3)
    print(json.dumps({"preset": args.preset, "batch_size": args.batch_size, "grids": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
