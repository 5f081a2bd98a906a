"""Downpour end to end against the same training without any RPC.

    python benchmarks/downpour_up.py [--preset small] [--steps 150] [--batch-size 32]

In one run, examples per second of
  (a) an in-process loop: the same network, the same Downpour loop and the
      same Adagrad, parameters in this process, batches from the bundled
      dataset already in memory (no RPC, no feeder);
  (b) ``downpour up`` with 1 replica and 1 shard;
  (c) ``downpour up`` with 2 replicas and 2 shards;
each measured over the steady part of the run (after the first 20% of the
steps, so start-up and the first pull are excluded). The last line is JSON
with the ratios b/a and c/a.

On a 2-core machine (c) cannot beat (a): two replicas, two shards, the feeder
and the coordinator all share the same two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from downpour import config as jobconfig


def in_process(cfg: jobconfig.JobConfig) -> float:
    from downpour.feeder.datasets import open_dataset
    from downpour.feeder.preprocess import PreprocessSpec
    from downpour.feeder.sharding import batches
    from downpour.nn import Network
    from downpour.worker.loop import DownpourLoop, LocalStore

    spec = cfg.network_spec()
    c, h, w = spec.input
    ds = open_dataset(cfg.data, PreprocessSpec(channels=c, size=(h, w), normalize=cfg.normalize, seed=cfg.seed))
    x_all, _ = ds.get(np.arange(len(ds)))  # in memory: the baseline pays no data cost
    idx = batches(np.arange(len(ds)), cfg.batch_size, cfg.seed, 0)
    net = Network(spec)
    store = LocalStore(net.init_params(cfg.seed), cfg.optimizer.lr, cfg.optimizer.eps, cfg.optimizer.kind)

    def source():
        for b in idx:
            yield x_all[b], None

    loop = DownpourLoop(lambda p, x, y: net.tica(p, x)[:2], store, list(store.w), source(), cfg.n_fetch,
                        cfg.n_push, overlap=False)
    warm = max(1, cfg.steps // 5)
    t0 = 0.0
    for s in range(cfg.steps):
        if s == warm:
            t0 = time.perf_counter()
        loop.step(s, first=s == 0)
    loop.close()
    return (cfg.steps - warm) * cfg.batch_size / (time.perf_counter() - t0)


def cluster(cfg: jobconfig.JobConfig, replicas: int, shards: int) -> float:
    from downpour.up import run, steady_rate

    c = jobconfig.JobConfig(**{**cfg.__dict__, "replicas": replicas, "shards": shards})
    with tempfile.TemporaryDirectory() as out:
        code = run(c, out, quiet=True)
        if code != 0:
            raise SystemExit(f"downpour up failed with code {code}; logs in {out}/logs")
        with open(os.path.join(out, "metrics.json")) as f:
            hist = json.load(f)["history"]
    return steady_rate(hist, cfg.steps, cfg.batch_size)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    cfg = jobconfig.load(env={}, overrides={"preset": args.preset, "steps": args.steps,
                                            "batch_size": args.batch_size, "checkpoint_every": 10 ** 6})
    print(f"preset {args.preset}, batch {args.batch_size}, {args.steps} steps per replica, "
          f"{os.cpu_count()} cores, python {sys.version.split()[0]}")
    a = in_process(cfg)
    print(f"(a) in-process loop, no RPC        {a:9.1f} examples/s")
    b = cluster(cfg, 1, 1)
    print(f"(b) downpour up, 1 replica 1 shard {b:9.1f} examples/s   {b / a:.2f} x (a)")
    c = cluster(cfg, 2, 2)
    print(f"(c) downpour up, 2 replicas 2 shards {c:7.1f} examples/s   {c / a:.2f} x (a)")
    print(json.dumps({"preset": args.preset, "a_examples_per_s": round(a, 1), "b_examples_per_s": round(b, 1),
                      "c_examples_per_s": round(c, 1), "b_over_a": round(b / a, 3), "c_over_a": round(c / a, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
