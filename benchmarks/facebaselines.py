"""Fit seconds and a sanity score of the face-neuron baselines (``evals.facebaselines``).

    python benchmarks/facebaselines.py [--kmeans '{"k": 1024}' ...] [--autoencoder '{"steps": 300}' ...]
                                       [--seeds 0 1 2] [--out facebaselines.json]

The pool is the faces eval's (``facedata.video_pool()``: 4,000 32x32 grey frames), each frame
standardised (``preprocess.normalize(x, "standardize")``); the scored set is
``facedata.eval_set((32, 32), 1)`` prepared the same way. Every learner (its defaults unless
settings are given as JSON, one learner per argument; the flag with nothing after it skips that
kind) is fitted once per seed; its units are
scored by ``neuronscore.choose_and_test`` (unit and threshold chosen on the validation half,
measured on the test half) and the row reports the fit seconds, the learner's ``info()`` and,
per measure, the validation and test score. Choose settings on the validation columns only.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from downpour.evals import facedata
from downpour.evals.facebaselines import AutoencoderFeatures, KMeansFeatures
from downpour.evals.neuronscore import choose_and_test
from downpour.feeder.preprocess import normalize


def row(learner, pool: np.ndarray, ev) -> dict:
    learner.fit(pool)
    t = time.perf_counter()
    acts = learner.activations(normalize(ev.x, "standardize"))
    seconds = time.perf_counter() - t
    scores = {
        m: {"layer": c.layer, "unit": c.index, "val": round(c.val, 4), "test": round(c.test, 4)}
        for m, c in choose_and_test(acts, ev.y, ev.val).items()
    }
    return {"info": learner.info(), "activation_seconds": round(seconds, 3), "scores": scores}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kmeans", nargs="*", default=None, help="KMeansFeatures settings, one JSON object each")
    ap.add_argument("--autoencoder", nargs="*", default=None, help="AutoencoderFeatures settings, JSON")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--out", default="facebaselines.json")
    args = ap.parse_args(argv)
    runs = [(KMeansFeatures, json.loads(s)) for s in (args.kmeans if args.kmeans is not None else ["{}"])]
    runs += [
        (AutoencoderFeatures, json.loads(s)) for s in (args.autoencoder if args.autoencoder is not None else ["{}"])
    ]
    pool = normalize(facedata.video_pool().x, "standardize")
    ev = facedata.eval_set((32, 32), 1)
    rows = []
    for cls, settings in runs:
        for seed in args.seeds:
            r = row(cls(**{**settings, "seed": seed}), pool, ev)
            rows.append(r)
            s, i = r["scores"], r["info"]
            print(
                f"{cls.__name__} {settings} seed {seed}: fit {i['seconds']:.1f} s; "
                + "; ".join(f"{m} val {v['val']:.3f} test {v['test']:.3f}" for m, v in s.items()),
                flush=True,
            )
    with open(args.out, "w") as f:
        json.dump({"pool": list(pool.shape), "eval": int(len(ev.y)), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
