"""``downpour eval faces``: is there a face neuron? (Le et al. 2012, section 4.1 and table 1)

Training data (``facedata.video_pool``): an unlabeled pool built the way
video frames show faces: jittered, scaled, rotated, mirrored and relit views
of the 50 *training* LFW faces over natural-image scenery, beside natural
crops and views of the training LFW non-faces. Its fraction of frames with a
face is reported. No held-out image, and no view of one, enters training.

Test data: the bundled held-out set (50 LFW faces, 50 LFW non-faces, 200
distractors whose brightness and contrast match the faces'), cut once into a
validation half and a test half (``facedata.heldout_split``). Every neuron,
threshold and setting is chosen on the validation half; the test half is
only reported. ``--test DIR`` replaces the test half with a user's folder
(``faces/`` and ``other/``, any image Pillow reads, any size).

Measures (``neuronscore``), each row with its own neuron chosen on validation:
Le et al.'s plain accuracy at the best of 20 evenly spaced thresholds (chance:
the majority class's share; the paper chose on its test set, here on the
validation half), balanced accuracy (chance 50%) and ROC AUC (chance 50%).

Rows: chance; the best linear filter (each training frame as a template);
the best first-stage neuron of the trained network; the same network with
random weights; the trained network; the network trained without LCN; and a
control trained on the same pool with every face frame removed. Each network
is trained once per seed (``--seeds``, default 3) and every row is the mean
and spread over the seeds. The best neuron per stage is reported for every
network.

Network (``face_spec``, the default ``--preset faces``): 32x32 grey input,
three stages; stages 1 and 2 tied (convolutional) by default, the third stage's
field covers the whole stage-2 map, so each of its units sees the whole face
at the test scale. ``--whiten zca`` whitens the inputs (fitted on the pool).
The choices and the validation measurements behind them are in
docs/experiments.md.

``--checkpoint DIR`` evaluates the newest committed checkpoint of a job
instead of the network trained here (its own preprocessing, no whitening;
the no-LCN and no-faces networks are still trained here, one seed).
``--up`` trains every network through a ``downpour up`` cluster
(``evals.jobs``) instead of in this process.

Outputs in ``--out``: report.html, results.json, the PNGs (top inputs,
optimal stimuli and invariance curves of the best neuron and of the best
stage-2/3 neuron, first-stage filters, the table) and params.npz (seed 0's
trained blocks).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any

import numpy as np

from downpour.evals import common as C
from downpour.evals import facedata as D
from downpour.evals import facenets as N
from downpour.evals import facereport as R
from downpour.evals import report
from downpour.evals.facenets import Prep, load_checkpoint_dir
from downpour.evals.facereport import ROWS
from downpour.nn import Network, presets
from downpour.nn.spec import FilterSpec, LCNSpec, NetworkSpec, PoolSpec, StageSpec

# ROWS, Prep and load_checkpoint_dir are the eval's public names, defined beside the code that uses them
__all__ = ["ROWS", "Prep", "add_arguments", "cmd", "face_spec", "load_checkpoint_dir", "run"]

# defaults, each chosen on the validation half (docs/experiments.md)
PRESET = "faces"
STEPS = 800
SEEDS = (0, 1, 2)
PER_FACE = 30  # views of each training face in the pool
PER_NONFACE = 10  # views of each training LFW non-face
WHITEN = "none"
TIED = True
MAPS = 8
TOP_MAPS = 16
LR = C.DEFAULT_LR


NETWORKS = {
    "trained network": "trained",
    "same network, random weights": "random",
    "trained without LCN": "no_lcn",
    "control: trained on the pool without faces": "no_faces",
}


def face_spec(
    *, maps: int = MAPS, top_maps: int = TOP_MAPS, tied: bool = TIED, lam: float = 0.1, size: int = 32
) -> NetworkSpec:
    """The eval's network: 8x8 fields, 3x3 L2 pooling and 5x5 LCN in stages 1 and 2; stage 3 a
    filter whose field is the whole stage-2 map (one location: it sees the whole input)."""

    def stage(m, field, pool, t):
        return StageSpec(
            filter=FilterSpec(maps=m, field=field, tied=t),
            pool=PoolSpec(size=pool) if pool else None,
            lcn=LCNSpec(size=5) if pool else None,
            lam=lam,
        )

    f1, f2 = 8, 6
    top = size - f1 + 1 - 2 - f2 + 1 - 2  # the stage-2 map's side
    return NetworkSpec(
        input=(1, size, size),
        stages=(stage(maps, f1, 3, tied), stage(maps, f2, 3, tied), stage(top_maps, top, 0, False)),
    )


def run(
    out: str,
    *,
    checkpoint: str = "",
    test_dir: str = "",
    preset: str = PRESET,
    steps: int = STEPS,
    seeds=SEEDS,
    batch_size: int = 32,
    lr: float = LR,
    per_face: int = PER_FACE,
    per_nonface: int = PER_NONFACE,
    whiten: str = WHITEN,
    tied: bool = TIED,
    maps: int = MAPS,
    top_maps: int = TOP_MAPS,
    lam: float | None = None,
    up: bool = False,
    time_budget: float | None = None,
    stimulus_steps: int = 200,
    log=print,
) -> dict:
    t_start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    seeds = list(seeds)
    if not seeds:
        raise ValueError("--seeds: give at least one seed")
    manifest = None
    ck_params: dict | None
    if checkpoint:
        spec, normalize, ck_params, manifest = load_checkpoint_dir(checkpoint)
        whiten = "none"  # a job's checkpoint saw its own preprocessing only
        seeds = seeds[:1]
        log(f"trained network: checkpoint {manifest['checkpoint_id']} (step {manifest['step']}) in {checkpoint}")
    else:
        spec = face_spec(maps=maps, top_maps=top_maps, tied=tied) if preset == "faces" else presets.get(preset)
        normalize, ck_params = "standardize", None
    if lam is not None:  # the networks trained here
        spec = dataclasses.replace(spec, stages=tuple(dataclasses.replace(s, lam=lam) for s in spec.stages))
    if spec.classes:
        spec = NetworkSpec(input=spec.input, stages=spec.stages)  # the head plays no part here
    c, h, w = spec.input
    ev = D.eval_set((h, w), c, test_dir)

    train = N.trainer(up, out, batch_size, lr, time_budget, log)
    nolcn_spec = C.without_lcn(spec)
    per_seed: list[dict] = []
    training: dict[str, dict] = {}
    pool_info: list[dict] = []
    keep: tuple[dict, dict, Prep] | None = None  # seed 0's networks, scores and preparation, for the pictures
    for si, seed in enumerate(seeds):
        pool = D.video_pool((h, w), c, per_face=per_face, per_nonface=per_nonface, seed=D.POOL_SEED + seed)
        control = D.video_pool(
            (h, w), c, per_face=per_face, per_nonface=per_nonface, faces=False, seed=D.POOL_SEED + seed
        )
        pool_info.append(
            {
                "seed": seed,
                "frames": len(pool.x),
                "face_frames": int(pool.has_face.sum()),
                "face_fraction": pool.face_fraction,
                "control_frames": len(control.x),
                "control_face_frames": int(control.has_face.sum()),
            }
        )
        log(
            f"seed {seed}: pool of {len(pool.x)} frames, {100 * pool.face_fraction:.1f}% with a face; "
            f"control pool {len(control.x)} frames, none with a face"
        )
        prep = Prep(normalize, whiten, pool.x)
        prep_c = Prep(normalize, whiten, control.x)
        xp = prep(pool.x)
        nets: dict[str, tuple[NetworkSpec, dict, Prep]] = {}
        if ck_params is None:
            log(f"  training the network: {steps} TICA steps")
            tr = train("trained", spec, xp, steps, seed)
            nets["trained"] = (spec, tr.params, prep)
            training[f"trained/seed{seed}"] = N.train_info(tr)
        else:
            nets["trained"] = (spec, ck_params, prep)
        nets["random"] = (spec, Network(spec).init_params(seed), prep)
        log(f"  training without LCN: {steps} steps")
        tr = train("no_lcn", nolcn_spec, xp, steps, seed)
        nets["no_lcn"] = (nolcn_spec, tr.params, prep)
        training[f"no_lcn/seed{seed}"] = N.train_info(tr)
        log(f"  training the no-faces control: {steps} steps")
        tr = train("no_faces", spec, prep_c(control.x), steps, seed)
        nets["no_faces"] = (spec, tr.params, prep_c)
        training[f"no_faces/seed{seed}"] = N.train_info(tr)

        res = N.measure(nets, prep, xp, ev)
        per_seed.append(res)
        for name, r in res.items():
            if name in nets:
                b = r["all"]["balanced"]
                log(
                    f"  {name:<10} balanced {100 * b['test']:5.1f}% (val {100 * b['val']:5.1f}%, {b['layer']} "
                    f"#{b['index']}); "
                    + ", ".join(f"{s} {100 * r[s]['balanced']['test']:.1f}%" for s in r if s.startswith("stage"))
                )
        if si == 0:
            keep = (nets, res, prep)
    assert keep is not None  # seeds is not empty
    nets0, res0, prep0 = keep
    trained_spec, trained_params, _ = nets0["trained"]
    if trained_params is not None:
        arrays: dict[str, Any] = {k: np.asarray(v) for k, v in trained_params.items()}
        np.savez(os.path.join(out, "params.npz"), **arrays)

    rows, by_stage, winners, targets = R.table(per_seed, ev.majority)
    neurons = R.neuron_pictures(out, nets0, res0, prep0, ev, seeds[0], stimulus_steps)
    R.filter_pictures(out, trained_spec, trained_params)

    gh, val_mask = ev.groups, ev.val_mask
    results = {
        "protocol": (
            "every neuron, threshold and setting chosen on the validation half of the bundled held-out "
            "set; measured on the test split, never used for a choice. paper: plain accuracy at the best "
            "of 20 evenly spaced thresholds between the neuron's min and max (Le et al. chose on their "
            "test set; here on validation); balanced: balanced accuracy; auc: ROC AUC. Mean and spread "
            f"(std) over {len(seeds)} seed(s)"
        ),
        "validation": {
            "images": int(val_mask.sum()),
            "faces": int(ev.y_heldout[val_mask].sum()),
            "make_up": {g: int(((gh == i) & val_mask).sum()) for i, g in enumerate(D.HELDOUT_GROUPS)},
        },
        "test": ev.test_what,
        "chance": {"paper": ev.majority, "balanced": 0.5, "auc": 0.5},
        "spec": "checkpoint" if checkpoint else preset,
        "network": spec.to_dict(),
        "normalize": normalize,
        "whiten": whiten,
        "steps": steps,
        "seeds": seeds,
        "lr": lr,
        "batch_size": batch_size,
        "trained_through": "downpour up (1 replica, 2 shards)" if up else "in-process Downpour loop",
        "pool": {"per_face": per_face, "per_nonface": per_nonface, "per_seed": pool_info},
        "checkpoint": None
        if manifest is None
        else {"dir": checkpoint, "id": manifest["checkpoint_id"], "step": manifest["step"]},
        "training": training,
        "rows": rows,
        "best_neuron_by_stage": by_stage,
        "winners": winners,
        "neurons": neurons,
        "targets": targets,
        "per_seed": per_seed,
    }
    results["seconds"] = time.perf_counter() - t_start
    report.table_png(
        os.path.join(out, "table.png"),
        [{"row": r["row"], "accuracy": r["balanced"]["mean"]} for r in rows],
        "balanced accuracy on the test split, mean over seeds",
    )
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=float)
    R.write_html(out, results)
    log(R.format_table(results))
    log(f"report: {os.path.join(out, 'report.html')}  ({results['seconds']:.0f}s)")
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        default="",
        metavar="DIR",
        help="a checkpoint directory: evaluate its newest committed checkpoint instead of training here",
    )
    p.add_argument(
        "--test",
        default="",
        metavar="DIR",
        dest="test_dir",
        help="your own test images: DIR/faces/ and DIR/other/ (any format Pillow reads, any size)",
    )
    p.add_argument("--preset", default=PRESET, help="network: faces (default) or a preset name (tiny, small)")
    p.add_argument("--steps", type=int, default=STEPS, help="TICA steps per network trained here")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="one training of each network per seed")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=LR, help="Adagrad learning rate")
    p.add_argument("--per-face", type=int, default=PER_FACE, help="views of each training face in the pool")
    p.add_argument(
        "--per-nonface", type=int, default=PER_NONFACE, help="views of each training LFW non-face in the pool"
    )
    p.add_argument("--whiten", default=WHITEN, choices=("none", "zca"), help="input whitening (fitted on the pool)")
    p.add_argument("--untied", action="store_true", help="untied (locally connected) stages 1 and 2 (faces network)")
    p.add_argument("--maps", type=int, default=MAPS, help="maps of stages 1 and 2 (faces network)")
    p.add_argument("--top-maps", type=int, default=TOP_MAPS, help="maps of stage 3 (faces network)")
    p.add_argument("--lam", type=float, default=None, help="TICA sparsity weight of every stage (default 0.1)")
    p.add_argument("--up", action="store_true", help="train every network through a downpour up cluster")
    p.add_argument("--time-budget", type=float, default=None, help="stop each training after this many seconds")
    p.add_argument("--out", default="eval-faces", help="output folder (report.html, PNGs, results.json)")


def cmd(args: argparse.Namespace) -> int:
    run(
        args.out,
        checkpoint=args.checkpoint,
        test_dir=args.test_dir,
        preset=args.preset,
        steps=args.steps,
        seeds=args.seeds,
        batch_size=args.batch_size,
        lr=args.lr,
        per_face=args.per_face,
        per_nonface=args.per_nonface,
        whiten=args.whiten,
        tied=not args.untied,
        maps=args.maps,
        top_maps=args.top_maps,
        lam=args.lam,
        up=args.up,
        time_budget=args.time_budget,
    )
    return 0
