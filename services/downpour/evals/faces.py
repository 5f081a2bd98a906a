"""``downpour eval faces``: is there a face neuron? (Le et al. 2012, section 4.1 and table 1)

The test set is the held-out part of the bundled dataset, none of it seen in
training: 50 LFW faces, 50 LFW non-faces and 200 distractors (textured
natural-image crops whose mean and contrast match the faces', so that no
neuron wins on brightness or contrast alone). For each row, the best single
neuron and its threshold are chosen on a stratified validation half and the
balanced accuracy is measured on the other half, then the halves swap; this is
repeated over ``--splits`` random halvings and the folds are averaged
(``downpour.evals.common``). Chance is 50%.

Rows, in the paper's order: chance; the best linear filter (every training
example used as a template); the best first-stage neuron of the trained
network; the same network with random weights; the trained network; the
network trained without LCN. Without ``--checkpoint`` both networks are
trained here (TICA, Adagrad, the Downpour loop against an in-memory store);
with it, the trained network is the newest committed checkpoint in the folder
and only the no-LCN variant is trained here.

Training data (without ``--checkpoint``): the bundled train split, the
preset's TICA sparsity weights. Two levers for experiments, off by default:
``--face-frames K`` adds K jittered views of each of its 50 training faces
(``bundled.face_frames``: small shifts, scales, rotations, mirroring), as a
video shows one face in many frames (the paper trained on YouTube frames); no
held-out image and no label is used. ``--lam`` sets every stage's sparsity
weight. They stay off by default because the only way to pick them here is on
the held-out test set itself, and the gains measured that way are within the
fold-to-fold spread (docs/experiments.md).

Outputs in ``--out``: report.html, results.json, the PNGs (top inputs, optimal
stimulus, first-stage filters, invariance curves, the table) and params.npz
(the trained blocks: ``downpour serve neurons --params``).
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import os
import time

import numpy as np

from downpour.evals import common as C
from downpour.evals import report
from downpour.feeder import bundled, preprocess
from downpour.neurons.model import NeuronModel
from downpour.nn import Network, presets
from downpour.nn.spec import NetworkSpec

GROUPS = ("faces", "LFW non-faces", "distractors")
FACE_FRAMES = 0  # jittered views per training face added to the training data (an experiment's lever)
LAM = None  # TICA sparsity weight of every stage when training here (None: the preset's)


def load_checkpoint_dir(checkpoint_dir: str):
    """(network spec, normalize, blocks, manifest) of the newest committed checkpoint."""
    from downpour.neurons.sources import list_manifests, load_checkpoint

    found = list_manifests(checkpoint_dir)
    if not found:
        raise ValueError(f"--checkpoint {checkpoint_dir}: no committed checkpoint (no MANIFEST.json) there")
    m = found[-1]
    cfg, blocks = load_checkpoint(checkpoint_dir, m)
    return cfg.network_spec(), cfg.normalize, blocks, m


def transform(imgs: np.ndarray, *, shift=(0.0, 0.0), scale: float = 1.0, angle: float = 0.0) -> np.ndarray:
    """Shift (dy, dx pixels), scale and rotate (degrees) (N, C, H, W) images about their centre."""
    from skimage.transform import AffineTransform, warp

    n, c, h, w = imgs.shape
    centre = np.array([(w - 1) / 2, (h - 1) / 2])
    t = (AffineTransform(translation=-centre) + AffineTransform(scale=scale, rotation=np.deg2rad(angle))
         + AffineTransform(translation=centre + np.array([shift[1], shift[0]])))
    out = np.empty_like(imgs)
    for i in range(n):
        for j in range(c):
            out[i, j] = warp(imgs[i, j], t.inverse, mode="edge", preserve_range=True)
    return out


def invariance(model: NeuronModel, unit, faces_raw: np.ndarray, normalize: str, threshold: float) -> dict:
    """Mean activation and fraction above threshold of the faces under each transformation."""
    h = faces_raw.shape[2]
    curves = {
        "horizontal shift (pixels)": [("shift", (0.0, float(d))) for d in np.linspace(-h / 4, h / 4, 9)],
        "vertical shift (pixels)": [("shift", (float(d), 0.0)) for d in np.linspace(-h / 4, h / 4, 9)],
        "scale (factor)": [("scale", float(s)) for s in np.linspace(0.5, 1.5, 11)],
        "in-plane rotation (degrees)": [("angle", float(a)) for a in np.linspace(-90, 90, 13)],
    }
    out = {}
    for name, points in curves.items():
        xs, mean, frac = [], [], []
        for kind, v in points:
            x = preprocess.normalize(transform(faces_raw, **{kind: v}), normalize)
            a = model.activations(x, [unit])[:, 0]
            xs.append(v[0] + v[1] if kind == "shift" else v)
            mean.append(float(a.mean()))
            frac.append(float((a > threshold).mean()))
        out[name] = {"x": xs, "mean_activation": mean, "fraction_above_threshold": frac}
    return out


def run(out: str, *, checkpoint: str = "", preset: str = "small", steps: int = 4000, batch_size: int = 32,
        lr: float = C.DEFAULT_LR, seed: int = 0, face_frames: int = FACE_FRAMES, lam: float | None = LAM,
        time_budget: float | None = None, stimulus_steps: int = 200,
        n_splits: int = 5, log=print) -> dict:
    t_start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    manifest = None
    if checkpoint:
        spec, normalize, trained_params, manifest = load_checkpoint_dir(checkpoint)
        log(f"trained network: checkpoint {manifest['checkpoint_id']} (step {manifest['step']}) in {checkpoint}")
    else:
        spec, normalize, trained_params = presets.get(preset), "standardize", None
    if lam is not None:  # the networks trained here; a checkpoint's weights are what they are
        spec = dataclasses.replace(spec, stages=tuple(dataclasses.replace(s, lam=lam) for s in spec.stages))
    if spec.classes:
        spec = NetworkSpec(input=spec.input, stages=spec.stages)  # the head plays no part here
    pp = C.preprocess_for(spec, normalize)
    splits = bundled.build(pp, face_frames=face_frames)
    raw = bundled.build(C.preprocess_for(spec, "none"))
    x, y = splits.heldout.get(np.arange(len(splits.heldout)))
    groups = np.repeat(np.arange(3), [len(splits.heldout_faces), len(splits.heldout_nonfaces), len(splits.distractors)])
    halves = [C.stratified_halves(groups, seed + i) for i in range(n_splits)]
    net = Network(spec)
    training = {}
    if trained_params is None:
        log(f"training {steps} TICA steps on the bundled train split ({len(splits.train)} examples, "
            f"{50 * (1 + face_frames)} of them faces)")
        tr = C.train(net, splits.train, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                     time_budget=time_budget, log=log)
        trained_params = tr.params
        training["trained"] = {"steps": tr.steps, "seconds": tr.seconds, "loss_first": tr.first_loss,
                               "loss_last": tr.last_loss}
    nolcn_spec = C.without_lcn(spec)
    nolcn_net = Network(nolcn_spec)
    log(f"training the no-LCN variant: {steps} TICA steps")
    tr2 = C.train(nolcn_net, splits.train, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                  time_budget=time_budget, log=log)
    training["no_lcn"] = {"steps": tr2.steps, "seconds": tr2.seconds, "loss_first": tr2.first_loss,
                          "loss_last": tr2.last_loss}
    np.savez(os.path.join(out, "params.npz"), **{k: np.asarray(v) for k, v in trained_params.items()})

    # the rows --------------------------------------------------------------------------
    xt, _ = splits.train.get(np.arange(len(splits.train) - 50 * face_frames))  # the frames are views of these
    templates = xt.reshape(len(xt), -1)
    trained_acts = C.activations(net, trained_params, x)
    rows = []

    def row(name, layers, note=""):
        r = C.best_single_neuron(layers, y, halves)
        rows.append({"row": name, "accuracy": r.accuracy, "std": r.std, "note": note,
                     "folds": [f.__dict__ for f in r.folds]})
        log(f"  {name:<48} {100 * r.accuracy:5.1f}% +- {100 * r.std:3.1f}  ({r.choice.layer} #{r.choice.index})")
        return r

    rows.append({"row": "chance", "accuracy": 0.5, "std": 0.0, "note": "balanced accuracy", "folds": []})
    row("best linear filter (training-sample template)",
        {"template": (x.reshape(len(x), -1) @ templates.T).astype(np.float32)},
        f"{len(templates)} templates")
    row("best first-stage neuron", {k: v for k, v in trained_acts.items() if k.startswith("stage1.")})
    random_acts = C.activations(net, net.init_params(seed), x)
    row("same network, random weights", random_acts)
    best = row("trained network (best neuron)", trained_acts)
    nolcn_acts = C.activations(nolcn_net, tr2.params, x)
    row("trained without LCN", nolcn_acts)
    # where the best neuron is, stage by stage (does depth help?)
    by_stage = {}
    for name, acts in (("trained", trained_acts), ("random weights", random_acts), ("without LCN", nolcn_acts)):
        by_stage[name] = {}
        for s in range(1, len(spec.stages) + 1):
            sub = {k: v for k, v in acts.items() if k.startswith(f"stage{s}.")}
            by_stage[name][f"stage{s}"] = C.best_single_neuron(sub, y, halves).accuracy
    log("  best neuron per stage: " + "; ".join(
        f"{n}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in d.items()) for n, d in by_stage.items()))

    # the best face neuron: pictures and curves ----------------------------------------------
    model = NeuronModel(spec, trained_params)
    unit = model.unit(best.choice.layer, best.choice.index)
    faces_raw, _ = raw.heldout_faces.get(np.arange(len(raw.heldout_faces)))
    curves = invariance(model, unit, faces_raw, normalize, best.choice.threshold)
    order, top_a = model.top_inputs(x, unit, 16)
    stim = model.optimal_stimulus(unit, steps=stimulus_steps, seed=seed)
    w1 = np.asarray(trained_params["stage1.W1"]).reshape(net.stages[0].filter.weight_shape)

    make_up = {g: int((groups == i).sum()) for i, g in enumerate(GROUPS)}
    results = {
        "test_set": {"make_up": make_up, "total": int(len(y)), "faces": int(y.sum()),
                     "chance_balanced": 0.5, "majority_class_rate": float(1 - y.mean()),
                     "protocol": f"best single neuron + threshold chosen on a stratified validation half, balanced "
                                 f"accuracy on the other half, halves swapped; mean (+- spread) over {2 * n_splits} "
                                 f"folds of {n_splits} random halvings"},
        "spec": "checkpoint" if checkpoint else preset, "normalize": normalize,
        "training_data": {"examples": len(splits.train), "face_frames_per_face": face_frames,
                          "faces": 50 * (1 + face_frames), "lam": [s.lam for s in spec.stages]},
        "checkpoint": None if manifest is None else {"dir": checkpoint, "id": manifest["checkpoint_id"],
                                                      "step": manifest["step"]},
        "training": training, "rows": rows, "best_neuron_by_stage": by_stage,
        "best_neuron": {"layer": unit.layer, "map": unit.map, "y": unit.y, "x": unit.x,
                        "threshold": best.choice.threshold},
        "top_inputs": [{"index": int(i), "activation": float(a), "group": GROUPS[groups[i]]}
                       for i, a in zip(order, top_a)],
        "optimal_stimulus": {"activation": stim["activation"], "random_mean": stim["random_mean"],
                             "random_max": stim["random_max"]},
        "invariance": curves,
    }
    targets = {r["row"]: r["accuracy"] for r in rows}
    tr_acc, rnd = targets["trained network (best neuron)"], targets["same network, random weights"]
    results["targets"] = {
        "trained_minus_random_points": 100 * (tr_acc - rnd),
        "trained_ge_random_plus_15": bool(tr_acc >= rnd + 0.15),
        "paper_order (trained > no-LCN > first-stage > random)": bool(
            tr_acc > targets["trained without LCN"] > targets["best first-stage neuron"] > rnd),
    }
    results["seconds"] = time.perf_counter() - t_start

    # pictures and the report ------------------------------------------------------------------
    report.image_grid(os.path.join(out, "top_inputs.png"), x[order],
                      [f"{GROUPS[groups[i]][:5]} {a:.2f}" for i, a in zip(order, top_a)],
                      f"top 16 held-out inputs of {unit.layer} ({unit.map},{unit.y},{unit.x})")
    report.image_grid(os.path.join(out, "optimal_stimulus.png"), stim["stimulus"][None],
                      [f"act {stim['activation']:.3g} (random max {stim['random_max']:.3g})"],
                      "optimal stimulus (unit norm)", scale=3)
    centre = w1.shape[0] // 2
    k = net.stages[0].filter.k
    cin = spec.input[0]
    filters = w1[centre].reshape(w1.shape[1], k, k, cin).transpose(0, 3, 1, 2)
    report.image_grid(os.path.join(out, "filters.png"), filters, [f"map {m}" for m in range(len(filters))],
                      "first-stage filters (W1) at the central location", scale=1.6)
    report.curves(os.path.join(out, "invariance.png"), curves, best.choice.threshold,
                  f"invariance of {unit.layer} ({unit.map},{unit.y},{unit.x}) on {len(faces_raw)} held-out faces")
    report.table_png(os.path.join(out, "table.png"), rows, table_caption(results))
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=float)
    write_html(out, results)
    log(format_table(results))
    log(f"report: {os.path.join(out, 'report.html')}  ({results['seconds']:.0f}s)")
    return results


def table_caption(results: dict) -> str:
    ts = results["test_set"]
    mk = ", ".join(f"{v} {k}" for k, v in ts["make_up"].items())
    return (f"test set: {ts['total']} held-out images ({mk}); balanced accuracy, chance 50% "
            f"(always 'non-face' would score {100 * ts['majority_class_rate']:.1f}% plain accuracy)")


def format_table(results: dict) -> str:
    lines = [table_caption(results), f"{'row':<48} {'accuracy':>8} {'+-':>5}   neuron (fold 1)"]
    for r in results["rows"]:
        f = r["folds"][0] if r["folds"] else None
        where = f"{f['layer']} #{f['index']}" if f else ""
        lines.append(f"{r['row']:<48} {100 * r['accuracy']:7.1f}% {100 * r.get('std', 0):5.1f}   {where}")
    t = results["targets"]
    lines.append(f"trained - random = {t['trained_minus_random_points']:+.1f} points "
                 f"(target +15: {'met' if t['trained_ge_random_plus_15'] else 'missed'}); paper's order: "
                 f"{'yes' if t['paper_order (trained > no-LCN > first-stage > random)'] else 'no'}")
    return "\n".join(lines)


def write_html(out: str, results: dict) -> None:
    def folds(r):
        return " / ".join("%s #%d: val %.1f%%, test %.1f%%" % (f["layer"], f["index"], 100 * f["val_accuracy"],
                                                               100 * f["test_accuracy"]) for f in r["folds"][:2])

    rows = "".join(
        f"<tr><td>{html.escape(r['row'])}</td><td>{100 * r['accuracy']:.1f}% &plusmn; {100 * r.get('std', 0):.1f}</td>"
        f"<td>{html.escape(folds(r))}</td></tr>"
        for r in results["rows"])
    stage_rows = "".join(f"<tr><td>{html.escape(n)}</td>" + "".join(f"<td>{100 * v:.1f}%</td>" for v in d.values())
                         + "</tr>" for n, d in results["best_neuron_by_stage"].items())
    b = results["best_neuron"]
    tr = "".join(f"<li>{html.escape(k)}: {v['steps']} steps in {v['seconds']:.0f}s, TICA loss "
                 f"{v['loss_first']:.4g} &rarr; {v['loss_last']:.4g}</li>" for k, v in results["training"].items())
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>downpour eval faces</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:.2em .6em;border-bottom:1px solid #ddd}}</style>
</head><body><h1>Face neurons (Le et al. 2012, table 1)</h1>
<p>{html.escape(table_caption(results))}. {html.escape(results['test_set']['protocol'])}.</p>
<table><tr><th>row</th><th>balanced accuracy (mean &plusmn; spread over folds)</th><th>neuron chosen on the first two validation halves</th></tr>{rows}</table>
<p>Targets: trained &minus; random = {results['targets']['trained_minus_random_points']:+.1f} points.</p>
<p>Best single neuron restricted to one stage (same protocol):</p><table><tr><th>network</th>{''.join(f"<th>{k}</th>" for k in next(iter(results['best_neuron_by_stage'].values())))}</tr>{stage_rows}</table>
<img src="table.png"><h2>Training</h2><ul>{tr}</ul>
<h2>The best face neuron: {html.escape(b['layer'])} (map {b['map']}, y {b['y']}, x {b['x']})</h2>
<h3>Top held-out inputs</h3><img src="top_inputs.png">
<h3>Optimal stimulus</h3><p>activation {results['optimal_stimulus']['activation']:.4g}; random unit-norm inputs:
mean {results['optimal_stimulus']['random_mean']:.4g}, max {results['optimal_stimulus']['random_max']:.4g}</p>
<img src="optimal_stimulus.png">
<h3>Invariance</h3><img src="invariance.png">
<h2>First-stage filters</h2><img src="filters.png">
</body></html>"""
    with open(os.path.join(out, "report.html"), "w", encoding="utf-8") as f:
        f.write(doc)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="", metavar="DIR",
                   help="a checkpoint directory: evaluate its newest committed checkpoint instead of training here")
    p.add_argument("--preset", default="small", help="network preset when training here (default small)")
    p.add_argument("--steps", type=int, default=4000, help="TICA steps per network trained here")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=C.DEFAULT_LR, help="Adagrad learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--face-frames", type=int, default=FACE_FRAMES,
                   help="jittered views of each training face added to the training data (0: none)")
    p.add_argument("--lam", type=float, default=LAM,
                   help="TICA sparsity weight of every stage of the networks trained here (default: the preset's)")
    p.add_argument("--time-budget", type=float, default=None, help="stop each training after this many seconds")
    p.add_argument("--splits", type=int, default=5, help="random validation/test halvings (each used both ways)")
    p.add_argument("--out", default="eval-faces", help="output folder (report.html, PNGs, results.json)")


def cmd(args: argparse.Namespace) -> int:
    run(args.out, checkpoint=args.checkpoint, preset=args.preset, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, face_frames=args.face_frames, lam=args.lam, time_budget=args.time_budget,
        n_splits=args.splits)
    return 0
