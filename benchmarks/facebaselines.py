"""Fit seconds and a sanity score of the face-neuron baselines (``evals.facebaselines``).

    python benchmarks/facebaselines.py [--kmeans '{"k": 1024}' ...] [--autoencoder '{"steps": 300}' ...]
                                       [--seeds 0 1 2] [--out facebaselines.json]

The pool is fold 0's of the faces eval (``faceviews.fold_pool``: 4,000 32x32 grey frames of the
training identities), each frame standardised (``preprocess.normalize(x, "standardize")``); the
scored sets are fold 0's test B, the training identities' side (which chooses) and the held-out
identities' side, prepared the same way. Every learner (its defaults unless settings are given
as JSON, one learner per argument; the flag with nothing after it skips that kind) is fitted
once per seed; its units are scored by ``neuronscore.choose_and_test`` (unit and threshold
chosen on the training identities, measured on the held-out ones) and the row reports the fit
seconds, the learner's ``info()`` and, per measure, both scores. Choose settings on the
training identities' scores only.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from downpour.evals import facecategory, faceviews
from downpour.evals.facebaselines import AutoencoderFeatures, KMeansFeatures
from downpour.evals.neuronscore import choose_and_test
from downpour.feeder.preprocess import normalize


def row(learner, pool: np.ndarray, sel, held) -> dict:
    learner.fit(pool)
    t = time.perf_counter()
    acts = learner.activations(normalize(np.concatenate([sel.x, held.x]), "standardize"))
    seconds = time.perf_counter() - t
    y, val = np.r_[sel.y, held.y], np.r_[np.ones(len(sel.y), bool), np.zeros(len(held.y), bool)]
    scores = {
        m: {"layer": c.layer, "unit": c.index, "val": round(c.val, 4), "test": round(c.test, 4)}
        for m, c in choose_and_test(acts, y, val).items()
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
    cat = facecategory.face_category((32, 32), 1)
    (tr, ho), (trn, hon) = (
        faceviews.identity_folds(len(cat.positives))[0],
        faceviews.identity_folds(len(cat.negatives))[0],
    )
    pool = normalize(faceviews.fold_pool(cat, tr, trn, (32, 32), 1).x, "standardize")
    sel = faceviews.test_b(cat, tr, trn, (32, 32), 1, heldout=False, seed=0)
    held = faceviews.test_b(cat, ho, hon, (32, 32), 1, heldout=True, seed=0)
    rows = []
    for cls, settings in runs:
        for seed in args.seeds:
            r = row(cls(**{**settings, "seed": seed}), pool, sel, held)
            rows.append(r)
            s, i = r["scores"], r["info"]
            print(
                f"{cls.__name__} {settings} seed {seed}: fit {i['seconds']:.1f} s; "
                + "; ".join(f"{m} val {v['val']:.3f} test {v['test']:.3f}" for m, v in s.items()),
                flush=True,
            )
    with open(args.out, "w") as f:
        json.dump({"pool": list(pool.shape), "scored": [len(sel.y), len(held.y)], "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
