"""Time to quality: does distributing the training pay for itself?

    python benchmarks/time_to_loss.py [--preset small] [--examples 9600] [--runs a b c d]

Trains the same network on the default data from the same seed, each run
seeing the same number of examples in all:

  (a) the synchronous loop in this process (the reference): the same network,
      loss and Adagrad, parameters in memory, every update applied before the
      next step, BLAS on every core, the data already in memory;
  (b) ``downpour up`` with 1 replica and 1 shard;
  (c) ``downpour up`` with 2 replicas and 2 shards;
  (d) ``downpour up`` with 4 replicas and 2 shards (oversubscribed on 2 cores).

For each: examples/s over the steady part; the held-out TICA loss (the
feeder's TEST split, the same images for every run) of the final parameters;
the wall time from the first step until the logged training loss first
reaches what (a) ends at (the mean of its last 30 steps); and the highest loss
logged in the first 100 steps over the first one logged. Prints a table, the
ratios to (a) and one JSON line. The job settings are the shipped defaults
(schedule, shared memory, warm start, learning rate) unless overridden with
``--set key=value`` (YAML values, e.g. ``--set schedule=overlap``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from staleness import heldout_loss, setup

from downpour import checkpoint as checkpoints
from downpour import config as jobconfig

RUNS = {"a": (0, 0), "b": (1, 1), "c": (2, 2), "d": (4, 2)}


def reference(cfg: jobconfig.JobConfig, net, x_train, x_test) -> dict:
    """(a): synchronous Adagrad in this process, batches as replica 0 of 1 would get them."""
    from downpour.feeder.sharding import batches, shard_indices
    from downpour.worker.loop import DownpourLoop, LocalStore

    store = LocalStore(net.init_params(cfg.seed), cfg.optimizer)
    idx = batches(shard_indices(len(x_train), 0, 1, cfg.seed), cfg.batch_size, cfg.seed, 0)
    source = ((x_train[b], None) for b in idx)
    loop = DownpourLoop(lambda p, x, y: net.tica(p, x)[:2], store, list(store.w), source, schedule="pushpull")
    losses, times = [], []
    t0 = time.perf_counter()
    for s in range(cfg.steps):
        losses.append(loop.step(s, first=s == 0).loss)
        times.append(time.perf_counter() - t0)
    loop.close()
    warm = cfg.steps // 5
    rate = (cfg.steps - warm) * cfg.batch_size / (times[-1] - times[warm - 1])
    shapes = net.param_shapes()
    params = {k: v.reshape(shapes[k]) for k, v in store.w.items()}
    return {
        "examples_per_s": rate,
        "heldout": heldout_loss(net, params, x_test),
        "losses": losses,
        "times": times,
        "final_train": float(np.mean(losses[-30:])),
        "early_peak": max(losses[:100]) / losses[0],
    }


def cluster(
    cfg: jobconfig.JobConfig, replicas: int, shards: int, net, x_test, target: float, longer: float = 2.0
) -> dict:
    """One run with (a)'s number of examples; if it ends above (a)'s final loss, a second,
    ``longer`` times as long, only to time when it gets there."""
    r = _cluster(cfg, replicas, shards, net, x_test, target, 1.0)
    if r["time_to_target"] is None and longer > 1:
        r["time_to_target"] = _cluster(cfg, replicas, shards, net, x_test, target, longer)["time_to_target"]
        r["time_to_target_from_longer_run"] = True
    return r


def _cluster(cfg: jobconfig.JobConfig, replicas: int, shards: int, net, x_test, target: float, scale: float) -> dict:
    from downpour.up import run, steady_rate

    c = jobconfig.JobConfig(
        **{**cfg.__dict__, "replicas": replicas, "shards": shards, "steps": int(cfg.steps * scale) // replicas}
    )
    with tempfile.TemporaryDirectory() as out:
        code = run(c, out, quiet=True, neurons=False)
        if code != 0:
            raise SystemExit(f"downpour up failed with code {code}")
        with open(os.path.join(out, "metrics.json")) as f:
            hist = json.load(f)["history"]
        ck = os.path.join(out, "checkpoints")
        _, params = checkpoints.load_params(ck, checkpoints.newest_valid(ck))
    rows = [h for h in hist if h["replicas"] and any(r["step"] > 0 for r in h["replicas"])]
    t0 = rows[0]["time"]
    logged = [
        (h["time"] - t0, [r["loss"] for r in h["replicas"] if r["step"] > 0 and r["loss"] is not None]) for h in rows
    ]
    curve = [(t, float(np.mean(v))) for t, v in logged if v]
    first = curve[0][1]
    early = [
        float(np.mean([r["loss"] for r in h["replicas"] if r["step"] > 0 and r["loss"] is not None]))
        for h in rows
        if max(r["step"] for r in h["replicas"]) <= 100
    ]
    reach = next((t for t, v in curve if v <= target), None)
    return {
        "examples_per_s": steady_rate(hist, c.steps, c.batch_size),
        "heldout": heldout_loss(net, params, x_test),
        "time_to_target": reach,
        "early_peak": max(early or [first]) / first,
        "steps_per_replica": c.steps,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--examples", type=int, default=9600, help="examples seen by each run, all replicas together")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a job setting for (b)-(d)")
    args = ap.parse_args()
    overrides = {"preset": args.preset, "checkpoint_every": 10**6}
    for kv in args.set:
        k, _, v = kv.partition("=")
        overrides[k] = yaml.safe_load(v)
    cfg = jobconfig.load(env={}, overrides=overrides)
    cfg.steps = args.examples // cfg.batch_size
    net, x_train, x_test = setup(cfg)
    print(
        f"preset {args.preset}, {cfg.steps * cfg.batch_size} examples per run, batch {cfg.batch_size}, "
        f"schedule {cfg.schedule}, shared memory {cfg.shared_memory}, warm start {cfg.warm_start}, "
        f"lr {cfg.optimizer.lr}; {os.cpu_count()} cores, python {sys.version.split()[0]}",
        flush=True,
    )
    a = reference(cfg, net, x_train, x_test)
    res = {"a": {k: v for k, v in a.items() if k not in ("losses", "times")}}
    res["a"]["time_to_target"] = a["times"][-1]
    for name in args.runs:
        if name == "a":
            continue
        r, s = RUNS[name]
        res[name] = cluster(cfg, r, s, net, x_test, a["final_train"])
    print(
        f"\n{'run':26s} {'ex/s':>7s} {'vs a':>5s} {'held-out':>9s} {'vs a':>5s} {'to a final':>10s} {'vs a':>5s} "
        f"{'peak/first':>10s}"
    )
    labels = {
        "a": "(a) in-process, sync",
        "b": "(b) up 1 replica 1 shard",
        "c": "(c) up 2 replicas 2 shards",
        "d": "(d) up 4 replicas 2 shards",
    }
    ra = res["a"]
    for name, r in res.items():
        tt = r["time_to_target"]
        r["examples_per_s_vs_a"] = r["examples_per_s"] / ra["examples_per_s"]
        r["heldout_vs_a"] = r["heldout"] / ra["heldout"]
        r["time_to_target_vs_a"] = None if tt is None else tt / ra["time_to_target"]
        print(
            f"{labels[name]:26s} {r['examples_per_s']:7.0f} {r['examples_per_s_vs_a']:5.2f} {r['heldout']:9.1f} "
            f"{r['heldout_vs_a']:5.2f} {('never' if tt is None else f'{tt:.1f} s'):>10s} "
            f"{('-' if tt is None else format(r['time_to_target_vs_a'], '.2f')):>5s} {r['early_peak']:10.2f}"
        )
    out = {
        "preset": args.preset,
        "examples": cfg.steps * cfg.batch_size,
        "settings": overrides,
        "a_final_train_loss": a["final_train"],
        "runs": {
            k: {kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in v.items()} for k, v in res.items()
        },
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
