"""The TICA objective watched while it trains, for each way of holding its scale.

    python benchmarks/objective.py [--preset small] [--steps 2000] [--variants free/joint unit_decoder/layerwise ...]

Trains the preset on the default data in this process, with the job's Adagrad (``downpour.optim``,
the rule the parameter shards apply; the job's learning rate, accumulator start and batch), once
per variant ``constraint/training`` (``nn.constraint``; ``joint`` or ``layerwise``), every
variant from the same initial blocks and the same batches. Logs, per stage, at the steps of
``--log-at``: reconstruction, sparsity, their ratio, the effective encoder-row and
decoder-column norms (mean, min, max), and the fractions of pooled units that are dead or
dense (``nn.network.pooled_activity``), each averaged over the 20 steps before. At the end, the
rescaling check (``nn.scale``) on held-out images: the largest fall of each stage's loss over the
rescalings its parametrisation admits, for factors in [0.5, 2], and the old form's (W1 / 4, 4 W2)
figure. Writes one JSON file (``--out``) and, with ``--params DIR``, each variant's final blocks
(``DIR/<constraint>-<training>.npz``) for the feature probes of ``downpour eval supervised``.
The loss itself is not compared across variants: each variant's is a different function.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from staleness import setup

from downpour import config as jobconfig
from downpour import optim
from downpour.feeder.sharding import batches, shard_indices
from downpour.nn import Network, NetworkSpec, scale

FACTORS = np.geomspace(0.5, 2.0, 13)
WINDOW = 20
WATCH = (
    "reconstruction",
    "sparsity",
    "W1.norm_mean",
    "W1.norm_min",
    "W1.norm_max",
    "W2.norm_mean",
    "W2.norm_min",
    "W2.norm_max",
    "dead",
    "dense",
)


def variant_spec(base: NetworkSpec, constraint: str, training: str) -> NetworkSpec:
    stages = tuple(dataclasses.replace(s, constraint=constraint) for s in base.stages)
    return dataclasses.replace(base, stages=stages, training=training)


def train(cfg, spec, x_train, x_test, steps: int, log_at: set[int]) -> dict:
    net = Network(spec)
    w = {k: np.asarray(v, np.float32) for k, v in net.init_params(cfg.seed).items()}
    opt = optim.get(cfg.optimizer.kind)
    acc = {k: opt.init(v.size, cfg.optimizer) for k, v in w.items()}
    scratch = optim.Scratch()
    idx = batches(shard_indices(len(x_train), 0, 1, cfg.seed), cfg.batch_size, cfg.seed, 0)
    recent: list[dict] = []
    log = []
    t0 = time.perf_counter()
    for step in range(steps + 1):
        x = x_train[next(idx)]
        _, grads, info = net.tica(w, x)
        recent = (recent + [info])[-WINDOW:]
        if step in log_at:
            row: dict = {"step": step}
            for st in net.stages:
                if st.has_tica:
                    for key in WATCH:
                        k = f"{st.name}.{key}"
                        if k in info:
                            row[k] = float(np.mean([r[k] for r in recent]))
                    row[f"{st.name}.ratio"] = row[f"{st.name}.sparsity"] / row[f"{st.name}.reconstruction"]
            log.append(row)
        if step == steps:
            break
        for k, g in grads.items():
            optim.update(cfg.optimizer, w[k], acc[k], g, scratch)
    seconds = time.perf_counter() - t0
    held = x_test[:256]
    shapes = net.param_shapes()
    shaped = {k: v.reshape(shapes[k]) for k, v in w.items()}
    out = {"log": log, "seconds": seconds, "rescale": scale.rescale_gains(net, shaped, held, FACTORS)}
    if all(st.spec.constraint == "free" for st in net.stages if st.has_tica):
        quarter = scale.rescale_gains(net, shaped, held, [0.25])
        out["rescale_quarter"] = {k: v["fall"] for k, v in quarter.items()}
    out["params"] = w
    return out


def fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--log-at", type=int, nargs="+", default=[0, 100, 300, 600, 1000, 2000])
    ap.add_argument(
        "--variants",
        nargs="+",
        default=[
            f"{c}/{t}" for c in ("free", "unit_decoder", "unit_encoder", "tied_decoder") for t in ("joint", "layerwise")
        ],
    )
    ap.add_argument("--out", default="objective.json")
    ap.add_argument("--params", default="", help="a folder for each variant's final blocks (.npz)")
    args = ap.parse_args()
    cfg = jobconfig.load(env={}, overrides={"preset": args.preset})
    net0, x_train, x_test = setup(cfg)
    base = net0.spec
    print(
        f"preset {args.preset}, {args.steps} steps of batch {cfg.batch_size}, Adagrad lr {cfg.optimizer.lr}, "
        f"accumulator from {cfg.optimizer.initial_accumulator}; {len(x_train)} training, {len(x_test)} held-out images"
    )
    results = {}
    for v in args.variants:
        c, t = v.split("/")
        r = train(cfg, variant_spec(base, c, t), x_train, x_test, args.steps, set(args.log_at))
        if args.params:
            os.makedirs(args.params, exist_ok=True)
            np.savez(os.path.join(args.params, f"{c}-{t}.npz"), **r.pop("params"))
        else:
            r.pop("params")
        results[v] = r
        print(f"\n== {v} ({r['seconds']:.0f} s)")
        stages = sorted({k.split(".")[0] for k in r["log"][0] if k.startswith("stage")})
        for s in stages:
            print(f"  {s}: step  rec  sparsity  sp/rec  |W1| mean/min/max  |W2| mean/min/max  dead  dense")
            for row in r["log"]:
                g = lambda key, s=s, row=row: row.get(f"{s}.{key}", float("nan"))
                print(
                    f"    {row['step']:5d}  {fmt(g('reconstruction'))}  {fmt(g('sparsity'))}  {fmt(g('ratio'))}"
                    f"  {fmt(g('W1.norm_mean'))}/{fmt(g('W1.norm_min'))}/{fmt(g('W1.norm_max'))}"
                    f"  {fmt(g('W2.norm_mean'))}/{fmt(g('W2.norm_min'))}/{fmt(g('W2.norm_max'))}"
                    f"  {g('dead'):.2f}  {g('dense'):.2f}"
                )
        falls = ", ".join(f"{s} {100 * x['fall']:.1f}% (a={x['factor']:.2f})" for s, x in r["rescale"].items())
        print(f"  largest fall of a stage's loss by an admitted rescaling, a in [0.5, 2]: {falls}")
        if "rescale_quarter" in r:
            q = ", ".join(f"{s} {100 * x:.0f}%" for s, x in r["rescale_quarter"].items())
            print(f"  (W1 / 4, 4 W2): {q}")
    with open(args.out, "w") as f:
        json.dump({"preset": args.preset, "steps": args.steps, "variants": results}, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
