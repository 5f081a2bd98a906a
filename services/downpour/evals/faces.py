"""``downpour eval faces``: is there a face neuron? (Le et al. 2012, section 4.1, tables 1 and 2)

The protocol (docs/experiments.md), fixed before any network was trained:

- **Identities, two folds.** The category's images (the bundled default: the
  100 LFW faces and the 100 non-face photographs of ``lfw_subset``) are cut in
  two halves by identity (``faceviews.identity_folds``). Each fold trains on
  one half and tests on the other, then the halves swap: every face is held
  out once, and no view of a face sits on both sides.
- **Training data** per fold (``faceviews.fold_pool``): a video-like pool of the
  training identities (moved, scaled, turned, relit views over natural
  scenery), the non-face photographs' views and natural crops, all from the
  training side; the no-objects control trains on the same pool less every
  frame with the object.
- **Test B**, the primary measure (``faceviews.test_b``): views of the held-out
  identities anywhere in the frame over held-out backgrounds, against views of
  the held-out non-face photographs, held-out natural crops, phase-scrambled
  objects and natural crops the frontal-face cascade fires on. **Test A**: the
  aligned images, as the earlier eval and the paper used.
- **Choosing**: every neuron and threshold is chosen on the same kind of test
  built from the *training* identities (their labels choose, never train) and
  reported on the held-out ones. Candidates: the top stage's non-negative
  pooled units (primary: a few, as in the paper), and every unit of every
  layer (secondary).
- **Rows** (``facefold.ROWS``): chance, best linear filter, best first-stage
  neuron, random weights, trained, trained without LCN, the no-objects
  control, k-means and an autoencoder (``facebaselines``); per stage too.
- **Numbers**: balanced accuracy and ROC AUC with 95% intervals by a bootstrap
  over identities, and the paired differences the targets name
  (``facestats``); Le et al.'s plain accuracy at 20 thresholds beside them.

Each network trains through a ``downpour up`` cluster (2 replicas, 2 shards)
for the same wall-clock budget (``--budget`` seconds of training each);
``--in-process`` trains in this process instead. ``--positives DIR
[--negatives DIR]`` runs any category; ``--test DIR`` (``faces/`` and
``other/``) replaces the held-out half of test A; ``--checkpoint DIR``
evaluates a job's newest checkpoint as the trained network.

Outputs in ``--out``: report.html, results.json, the pictures of the best
top-stage neuron (top inputs, optimal stimulus, invariance), the first-stage
filters, table.png and params.npz (fold 0's trained blocks).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any

import numpy as np

from downpour.evals import facecategory as K
from downpour.evals import facefold as F
from downpour.evals import facenets as N
from downpour.evals import facereport as R
from downpour.evals import faceviews as V
from downpour.evals import report
from downpour.evals.facenets import Prep, load_checkpoint_dir
from downpour.nn import presets
from downpour.nn.spec import FilterSpec, LCNSpec, NetworkSpec, PoolSpec, StageSpec

__all__ = ["Prep", "add_arguments", "cmd", "face_spec", "load_checkpoint_dir", "run"]

# defaults (docs/experiments.md says how each was chosen)
PRESET = "faces"
BUDGET = 200.0  # seconds of training per network: six trainings and the rest fit 30 minutes on 2 cores
SEED = 0
PER_FACE = 30  # views of each training identity in the pool
PER_NONFACE = 10  # views of each training non-object photograph
WHITEN = "none"
MAPS = 16
TOP_MAPS = 64
TOP_FIELD = 10
# the baselines' settings: k-means on whole frames as in Le et al.'s second table (k-means on
# 40x40 frames), the autoencoder's steps keeping its two trainings near a minute each here
BASELINES = {"kmeans": {"k": 1024, "patch": None}, "autoencoder": {"steps": 1000}}
LR = N.C.DEFAULT_LR


def face_spec(
    *, maps: int = MAPS, top_maps: int = TOP_MAPS, top_field: int = TOP_FIELD, tied: bool = True, size: int = 32
) -> NetworkSpec:
    """The eval's network: stages 1 and 2 of 8x8 and 6x6 tied filters, 3x3 L2 pooling and 5x5 LCN;
    stage 3 ``top_maps`` tied filters of ``top_field`` over the stage-2 map, each map L2-pooled over
    every location: one non-negative pooled unit per map that sees the whole input and responds
    wherever in it its pattern sits (the primary candidates)."""

    def stage(m, field, t):
        return StageSpec(filter=FilterSpec(maps=m, field=field, tied=t), pool=PoolSpec(size=3), lcn=LCNSpec(size=5))

    side = size - 8 + 1 - 2 - 6 + 1 - 2  # the stage-2 map's side
    if not 1 <= top_field <= side:
        raise ValueError(f"--top-field {top_field}: the stage-2 map is {side} wide at input size {size}")
    top = StageSpec(
        filter=FilterSpec(maps=top_maps, field=top_field, tied=True), pool=PoolSpec(size=side - top_field + 1), lcn=None
    )
    return NetworkSpec(input=(1, size, size), stages=(stage(maps, 8, tied), stage(maps, 6, tied), top))


def _category(positives: str, negatives: str, name: str, size, c) -> K.Category:
    if positives:
        return K.load_category(positives, negatives or None, size, c, name)
    if negatives:
        raise ValueError("--negatives needs --positives (the images of the category)")
    return K.face_category(size, c)


def run(
    out: str,
    *,
    positives: str = "",
    negatives: str = "",
    name: str = "",
    test_dir: str = "",
    checkpoint: str = "",
    preset: str = PRESET,
    budget: float = BUDGET,
    steps: int = 100_000,
    in_process: bool = False,
    seed: int = SEED,
    batch_size: int = 32,
    lr: float = LR,
    per_face: int = PER_FACE,
    per_nonface: int = PER_NONFACE,
    whiten: str = WHITEN,
    tied: bool = True,
    maps: int = MAPS,
    top_maps: int = TOP_MAPS,
    lam: float | None = None,
    baselines: dict | None = None,
    stimulus_steps: int = 200,
    log=print,
) -> dict:
    t_start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    manifest, ck_params = None, None
    if checkpoint:
        spec, normalize, ck_params, manifest = load_checkpoint_dir(checkpoint)
        whiten = "none"  # a job's checkpoint saw its own preprocessing only
        log(f"trained network: checkpoint {manifest['checkpoint_id']} (step {manifest['step']}) in {checkpoint}")
    else:
        spec = face_spec(maps=maps, top_maps=top_maps, tied=tied) if preset == "faces" else presets.get(preset)
        normalize = "standardize"
    if lam is not None:
        spec = dataclasses.replace(spec, stages=tuple(dataclasses.replace(s, lam=lam) for s in spec.stages))
    if spec.classes:
        spec = NetworkSpec(input=spec.input, stages=spec.stages, training=spec.training)  # the head plays no part
    c, h, w = spec.input
    category = _category(positives, negatives, name, (h, w), c)
    user_test = N.user_test(test_dir, (h, w), c) if test_dir else None
    train = N.trainer(not in_process, out, batch_size, lr, budget, steps, log)
    folds = V.identity_folds(len(category.positives))
    neg_folds = V.identity_folds(len(category.negatives)) if len(category.negatives) else [(None, None)] * 2
    fold_results, fold_info, held, training, kept = [], [], [], {}, None
    for k, ((tr_ids, ho_ids), (tr_neg, ho_neg)) in enumerate(zip(folds, neg_folds)):
        fseed = seed + 1000 * k
        data = N.fold_data(category, (tr_ids, ho_ids), (tr_neg, ho_neg), (h, w), c, per_face, per_nonface, fseed)
        if user_test is not None:
            data.tests["A"] = (data.tests["A"][0], user_test)
        fold_info.append(data.info(k))
        held.append({t: data.tests[t][1] for t in F.TESTS})
        log(
            f"fold {k}: training on {len(tr_ids)} identities, testing on {len(ho_ids)}; pool of "
            f"{len(data.pool.x)} frames, {100 * data.pool.face_fraction:.1f}% with the object; "
            f"test B {len(data.tests['B'][1].y)} images, test A {len(data.tests['A'][1].y)}"
        )
        nets, info = N.train_networks(train, spec, data, normalize, whiten, fseed, ck_params, k)
        training.update(info)
        t0 = time.perf_counter()
        acts = N.fold_activations(nets, data, BASELINES if baselines is None else baselines, fseed, log)
        t1 = time.perf_counter()
        labels = {t: (data.tests[t][0].y, data.tests[t][1].y) for t in F.TESTS}
        fold_results.append(F.score_fold(acts, labels))
        log(f"  units and baselines {t1 - t0:.0f}s, choosing and judging {time.perf_counter() - t1:.0f}s")
        if k == 0:
            kept = (nets, data)
    assert kept is not None
    results = R.assemble(fold_results, held, fold_info)
    nets0, data0 = kept
    trained_spec, trained_params, prep0 = nets0["trained"]
    arrays: dict[str, Any] = {k: np.asarray(v) for k, v in trained_params.items()}
    np.savez(os.path.join(out, "params.npz"), **arrays)
    best = fold_results[0]["rows"]["trained_top"]["B"].choice["balanced"]
    results["neuron"] = R.neuron_pictures(out, trained_spec, trained_params, prep0, data0, best, seed, stimulus_steps)
    R.filter_pictures(out, trained_spec, trained_params)
    settings: dict[str, Any] = {
        "category": {
            "name": category.name,
            "source": category.source,
            "positives": len(category.positives),
            "negatives": len(category.negatives),
        },
        "network": spec.to_dict(),
        "spec": "checkpoint" if checkpoint else preset,
        "normalize": normalize,
        "whiten": whiten,
        "budget_seconds": budget,
        "max_steps": steps,
        "seed": seed,
        "lr": lr,
        "batch_size": batch_size,
        "trained_through": "in-process Downpour loop" if in_process else "downpour up (2 replicas, 2 shards)",
        "pool": {"per_face": per_face, "per_nonface": per_nonface},
        "user_test": test_dir or None,
        "checkpoint": None
        if manifest is None
        else {"dir": checkpoint, "id": manifest["checkpoint_id"], "step": manifest["step"]},
        "training": training,
    }
    results.update(settings)
    results["seconds"] = time.perf_counter() - t_start
    report.table_png(
        os.path.join(out, "table.png"),
        [{"row": r["row"], "accuracy": r["B"]["balanced"]["mean"]} for r in results["rows"]],
        "test B: balanced accuracy of each row's neuron (held-out identities)",
    )
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=float)
    R.write_html(out, results)
    log(R.format_table(results))
    log(f"report: {os.path.join(out, 'report.html')}  ({results['seconds']:.0f}s)")
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--positives", default="", metavar="DIR", help="images of the category (default: the LFW faces)")
    p.add_argument(
        "--negatives", default="", metavar="DIR", help="photographs of the same kind without the category (optional)"
    )
    p.add_argument("--name", default="", help="the category's name in the report (default: the folder's)")
    p.add_argument(
        "--test",
        default="",
        metavar="DIR",
        dest="test_dir",
        help="your own aligned test images for test A: DIR/faces/ and DIR/other/ (any format Pillow reads)",
    )
    p.add_argument(
        "--checkpoint",
        default="",
        metavar="DIR",
        help="evaluate a job's newest committed checkpoint as the trained net",
    )
    p.add_argument("--preset", default=PRESET, help="network: faces (default) or a preset name (tiny, small)")
    p.add_argument("--budget", type=float, default=BUDGET, help="seconds of training per network")
    p.add_argument("--steps", type=int, default=100_000, help="at most this many steps per replica")
    p.add_argument("--in-process", action="store_true", help="train in this process instead of a downpour up cluster")
    p.add_argument("--seed", type=int, default=SEED, help="initial weights, data order and the pools' jitter")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=LR, help="Adagrad learning rate")
    p.add_argument("--per-face", type=int, default=PER_FACE, help="views of each training identity in the pool")
    p.add_argument("--per-nonface", type=int, default=PER_NONFACE, help="views of each training non-object photograph")
    p.add_argument("--whiten", default=WHITEN, choices=("none", "zca"), help="input whitening (fitted on the pool)")
    p.add_argument("--untied", action="store_true", help="untied (locally connected) stages 1 and 2")
    p.add_argument("--maps", type=int, default=MAPS, help="maps of stages 1 and 2 (faces network)")
    p.add_argument("--top-maps", type=int, default=TOP_MAPS, help="maps of stage 3: the primary candidates")
    p.add_argument("--lam", type=float, default=None, help="TICA sparsity weight of every stage (default 0.1)")
    p.add_argument("--out", default="eval-faces", help="output folder (report.html, PNGs, results.json)")


def cmd(args: argparse.Namespace) -> int:
    run(
        args.out,
        positives=args.positives,
        negatives=args.negatives,
        name=args.name,
        test_dir=args.test_dir,
        checkpoint=args.checkpoint,
        preset=args.preset,
        budget=args.budget,
        steps=args.steps,
        in_process=args.in_process,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        per_face=args.per_face,
        per_nonface=args.per_nonface,
        whiten=args.whiten,
        tied=not args.untied,
        maps=args.maps,
        top_maps=args.top_maps,
        lam=args.lam,
    )
    return 0
