"""Which TICA parametrisation learns features that carry information? Linear probes per variant.

    python benchmarks/features.py [--variants free/joint unit_decoder/layerwise ...] [--steps 3000]
                                  [--labels 2000 300] [--seeds 0]

For each variant ``constraint/training`` (``nn.constraint``), the ``small`` network is pretrained
without labels in this process on the unlabeled pool of ``downpour eval supervised`` (its data,
its standardisation; Fashion-MNIST where installed), with the job's Adagrad (``downpour.optim``,
the rule the shards apply) and batch, from the seed's initial blocks. Then linear softmax
classifiers (``evals.linear.linear_accuracy``: the L2 penalty chosen on a validation fifth of the
labeled set, then refitted on all of it) read: every stage's pooled output (the eval's readout),
and each stage's pooled output alone, of the pretrained network and of the same network with its
random initial weights; every stage's pooled maps summed over their four quarters (the eval's
``quadrants`` readout); and the pixels. ``--maps`` screens other widths (maps per stage),
``--whiten zca`` ZCA-whitened images (``evals.facedata.ZCA``, fitted on the unlabeled pool).
Reports validation accuracy (what a choice may look at) and test accuracy per row, labeled-set
size and seed, and writes one JSON file. This is the
quick, in-process screen of the variants; ``downpour eval supervised`` measures the chosen one
through the cluster.
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
from objective import variant_spec

from downpour import config as jobconfig
from downpour import optim
from downpour.evals import common as C
from downpour.evals.facedata import ZCA
from downpour.evals.linear import from_activations, linear_accuracy
from downpour.evals.supdata import balanced_subset, load_data
from downpour.feeder.sharding import batches, shard_indices
from downpour.nn import Network, presets


def pretrain(spec, x, steps: int, seed: int, cfg) -> tuple[Network, dict, float]:
    net = Network(spec)
    w = {k: np.asarray(v, np.float32) for k, v in net.init_params(seed).items()}
    opt = optim.get(cfg.optimizer.kind)
    acc = {k: opt.init(v.size, cfg.optimizer) for k, v in w.items()}
    scratch = optim.Scratch()
    idx = batches(shard_indices(len(x), 0, 1, seed), cfg.batch_size, seed, 0)
    t0 = time.perf_counter()
    for _ in range(steps):
        _, grads, _ = net.tica(w, x[next(idx)])
        for k, g in grads.items():
            optim.update(cfg.optimizer, w[k], acc[k], g, scratch)
    return net, w, time.perf_counter() - t0


def stage_features(net: Network, params: dict, x: np.ndarray) -> dict[str, np.ndarray]:
    """Each stage's pooled output (its output when it has no pool), flattened; all of them; and all of
    them summed over the four quarters of each map (the eval's ``quadrants`` readout)."""
    layers = [f"{st.name}.{'pool' if st.spec.pool is not None else 'output'}" for st in net.stages]
    acts = C.activations(net, params, x, layers=layers)
    out = {st.name: acts[k].astype(np.float64) for st, k in zip(net.stages, layers)}
    out["all stages"] = np.concatenate([out[st.name] for st in net.stages], axis=1)
    out["all stages, quadrants"] = from_activations(net, acts, "quadrants")
    return out


def probe(feats_l, yl, feats_t, yt, labels, seed, classes) -> dict:
    res = {}
    for n in labels:
        idx = balanced_subset(yl, n, classes, seed)
        for name in feats_l:
            a, l2, val = linear_accuracy(feats_l[name][idx], yl[idx], feats_t[name], yt, classes, seed=seed)
            res[f"{name} @{n}"] = {"test": a, "validation": max(val.values()) if val else None, "l2": l2}
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--variants", nargs="+", default=["free/joint", "unit_decoder/joint", "unit_encoder/joint"])
    ap.add_argument("--steps", type=int, default=3000, help="pretraining steps (the eval's 2 replicas x 1500)")
    ap.add_argument("--labels", type=int, nargs="+", default=[2000, 300])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--unlabeled", type=int, default=20000)
    ap.add_argument("--maps", type=int, nargs="+", default=None, help="maps per stage instead of the preset's")
    ap.add_argument(
        "--whiten", choices=("none", "zca"), default="none", help="ZCA-whiten every image, fitted on the unlabeled pool"
    )
    ap.add_argument("--out", default="features.json")
    args = ap.parse_args()
    cfg = jobconfig.load(env={}, overrides={"preset": args.preset})
    base = presets.get(args.preset)
    if args.maps:
        if len(args.maps) != len(base.stages):
            raise SystemExit(f"--maps needs {len(base.stages)} values, one per stage")
        stages = tuple(
            dataclasses.replace(s, filter=dataclasses.replace(s.filter, maps=m)) for s, m in zip(base.stages, args.maps)
        )
        base = dataclasses.replace(base, stages=stages)
    results: dict = {
        "preset": args.preset,
        "maps": [s.filter.maps for s in base.stages],
        "steps": args.steps,
        "whiten": args.whiten,
        "seeds": {},
    }
    for seed in args.seeds:
        what, xu, xl, yl, xt, yt, classes = load_data(
            "", base, normalize="standardize", n_unlabeled=args.unlabeled, n_labeled=max(args.labels),
            n_test=2000, seed=0, labeled_seed=seed,
        )  # fmt: skip
        print(f"seed {seed}: {what}", flush=True)
        rows: dict = {}
        pix = {"pixels": xl.reshape(len(xl), -1).astype(np.float64)}
        pix_t = {"pixels": xt.reshape(len(xt), -1).astype(np.float64)}
        rows["pixels"] = probe(pix, yl, pix_t, yt, args.labels, seed, classes)
        if args.whiten == "zca":  # the networks read whitened images; the pixel row stays the eval's
            zca = ZCA(xu)
            xu, xl, xt = zca(xu), zca(xl), zca(xt)
            pix = {"whitened pixels": xl.reshape(len(xl), -1).astype(np.float64)}
            pix_t = {"whitened pixels": xt.reshape(len(xt), -1).astype(np.float64)}
            rows["whitened pixels"] = probe(pix, yl, pix_t, yt, args.labels, seed, classes)
        random_rows: dict = {}  # the random encoder is the same for every constraint but unit_encoder
        for v in args.variants:
            c, t = v.split("/")
            spec = variant_spec(base, c, t)
            net = Network(spec)
            rnd = {k: np.asarray(a, np.float32) for k, a in net.init_params(seed).items()}
            key = c == "unit_encoder"
            if key not in random_rows:
                random_rows[key] = probe(
                    stage_features(net, rnd, xl), yl, stage_features(net, rnd, xt), yt, args.labels, seed, classes
                )
            rows[f"{v} random"] = random_rows[key]
            net, w, secs = pretrain(spec, xu, args.steps, seed, cfg)
            rows[f"{v} trained"] = probe(
                stage_features(net, w, xl), yl, stage_features(net, w, xt), yt, args.labels, seed, classes
            )
            rows[f"{v} trained"]["pretrain_seconds"] = secs
            for kind in ("random", "trained"):
                r = rows[f"{v} {kind}"]
                cells = "  ".join(
                    f"{k} {100 * x['test']:.1f} (val {100 * x['validation']:.1f})"
                    for k, x in r.items()
                    if isinstance(x, dict)
                )
                print(f"  {v} {kind}: {cells}", flush=True)
        for name in ("pixels", "whitened pixels"):
            for k, x in rows.get(name, {}).items():
                print(f"  {k} {100 * x['test']:.1f} (val {100 * x['validation']:.1f})")
        results["seeds"][str(seed)] = rows
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
