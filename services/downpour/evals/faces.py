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
import html
import json
import os
import time

import numpy as np

from downpour.evals import common as C
from downpour.evals import facedata as D
from downpour.evals import neuronscore as S
from downpour.evals import report
from downpour.feeder import preprocess
from downpour.feeder.datasets import ArrayDataset
from downpour.neurons.model import NeuronModel
from downpour.nn import Network, presets
from downpour.nn.spec import FilterSpec, LCNSpec, NetworkSpec, PoolSpec, StageSpec

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

ROWS = ("chance", "best linear filter (training-sample templates)", "best first-stage neuron",
        "same network, random weights", "trained network", "trained without LCN",
        "control: trained on the pool without faces")
NETWORKS = {"trained network": "trained", "same network, random weights": "random",
            "trained without LCN": "no_lcn", "control: trained on the pool without faces": "no_faces"}


def face_spec(*, maps: int = MAPS, top_maps: int = TOP_MAPS, tied: bool = TIED, lam: float = 0.1,
              size: int = 32) -> NetworkSpec:
    """The eval's network: 8x8 fields, 3x3 L2 pooling and 5x5 LCN in stages 1 and 2; stage 3 a
    filter whose field is the whole stage-2 map (one location: it sees the whole input)."""
    def stage(m, field, pool, t):
        return StageSpec(filter=FilterSpec(maps=m, field=field, tied=t),
                         pool=PoolSpec(size=pool) if pool else None,
                         lcn=LCNSpec(size=5) if pool else None, lam=lam)
    f1, f2 = 8, 6
    top = size - f1 + 1 - 2 - f2 + 1 - 2  # the stage-2 map's side
    return NetworkSpec(input=(1, size, size), stages=(stage(maps, f1, 3, tied), stage(maps, f2, 3, tied),
                                                      stage(top_maps, top, 0, False)))


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


def invariance(model: NeuronModel, unit, faces_raw: np.ndarray, prep, threshold: float) -> dict:
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
            a = model.activations(prep(transform(faces_raw, **{kind: v})), [unit])[:, 0]
            xs.append(v[0] + v[1] if kind == "shift" else v)
            mean.append(float(a.mean()))
            frac.append(float((a > threshold).mean()))
        out[name] = {"x": xs, "mean_activation": mean, "fraction_above_threshold": frac}
    return out


class Prep:
    """Raw [0, 1] images -> network input: per-example normalisation, then ZCA if fitted."""

    def __init__(self, normalize: str, whiten: str = "none", pool_raw: np.ndarray | None = None):
        self.normalize, self.whiten = normalize, whiten
        self.zca = None
        if whiten == "zca":
            self.zca = D.ZCA(preprocess.normalize(pool_raw, normalize))
        elif whiten != "none":
            raise ValueError(f"--whiten {whiten!r} is unknown; allowed: none, zca")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = preprocess.normalize(np.asarray(x, np.float32), self.normalize)
        return self.zca(x) if self.zca is not None else x


def _trainer(up: bool, out: str, batch_size: int, lr: float, time_budget, log):
    def train(name: str, spec: NetworkSpec, x: np.ndarray, steps: int, seed: int) -> C.TrainResult:
        if up:
            from downpour.evals import jobs

            # one replica: the in-process run's examples and steps, through the system
            return jobs.train_job(os.path.join(out, "runs", f"{name}-seed{seed}"), spec, x, steps=steps,
                                  replicas=1, shards=2, batch_size=batch_size, lr=lr, seed=seed, log=log)
        return C.train(Network(spec), ArrayDataset(x), steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                       time_budget=time_budget, log=log)
    return train


def _scores(acts: dict, y, val) -> dict:
    """Every measure's choice overall and restricted to each stage."""
    out = {"all": S.as_dict(S.choose_and_test(acts, y, val))}
    stages = sorted({k.split(".")[0] for k in acts if k.startswith("stage")})
    for s in stages:
        out[s] = S.as_dict(S.choose_and_test({k: v for k, v in acts.items() if k.startswith(s + ".")}, y, val))
    higher = {k: v for k, v in acts.items() if k.split(".")[0] in stages[1:]}
    if higher:
        out["higher"] = S.as_dict(S.choose_and_test(higher, y, val))
    return out


def run(out: str, *, checkpoint: str = "", test_dir: str = "", preset: str = PRESET, steps: int = STEPS,
        seeds=SEEDS, batch_size: int = 32, lr: float = LR, per_face: int = PER_FACE,
        per_nonface: int = PER_NONFACE, whiten: str = WHITEN, tied: bool = TIED, maps: int = MAPS,
        top_maps: int = TOP_MAPS, lam: float | None = None, up: bool = False, time_budget: float | None = None,
        stimulus_steps: int = 200, log=print) -> dict:
    t_start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    seeds = list(seeds)
    if not seeds:
        raise ValueError("--seeds: give at least one seed")
    manifest = None
    if checkpoint:
        spec, normalize, ck_params, manifest = load_checkpoint_dir(checkpoint)
        whiten = "none"  # a job's checkpoint saw its own preprocessing only
        seeds = seeds[:1]
        log(f"trained network: checkpoint {manifest['checkpoint_id']} (step {manifest['step']}) in {checkpoint}")
    else:
        spec = (face_spec(maps=maps, top_maps=top_maps, tied=tied) if preset == "faces"
                else presets.get(preset))
        normalize, ck_params = "standardize", None
    if lam is not None:  # the networks trained here
        spec = dataclasses.replace(spec, stages=tuple(dataclasses.replace(s, lam=lam) for s in spec.stages))
    if spec.classes:
        spec = NetworkSpec(input=spec.input, stages=spec.stages)  # the head plays no part here
    c, h, w = spec.input

    # the evaluation set: validation half of the held-out set, then the test half (or the user's folder)
    xh, yh, gh = D.heldout((h, w), c)
    val_mask = D.heldout_split(gh)
    if test_dir:
        xt, yt, test_names = D.load_test_dir(test_dir, (h, w), c)
        test_what = {"source": test_dir, "faces": int(yt.sum()), "other": int(len(yt) - yt.sum())}
    else:
        xt, yt = xh[~val_mask], yh[~val_mask]
        test_names = None
        test_what = {"source": "bundled held-out test half", "faces": int(yt.sum()), "other": int(len(yt) - yt.sum()),
                     "make_up": {g: int(((gh == i) & ~val_mask).sum()) for i, g in enumerate(D.HELDOUT_GROUPS)}}
    x_eval = np.concatenate([xh[val_mask], xt])
    y_eval = np.concatenate([yh[val_mask], yt])
    val = np.r_[np.ones(int(val_mask.sum()), bool), np.zeros(len(xt), bool)]
    majority = float(max(yt.mean(), 1 - yt.mean()))

    train = _trainer(up, out, batch_size, lr, time_budget, log)
    nolcn_spec = C.without_lcn(spec)
    per_seed, training, pool_info = [], {}, []
    keep = {}  # seed 0's networks, for the pictures
    for si, seed in enumerate(seeds):
        pool = D.video_pool((h, w), c, per_face=per_face, per_nonface=per_nonface, seed=D.POOL_SEED + seed)
        control = D.video_pool((h, w), c, per_face=per_face, per_nonface=per_nonface, faces=False,
                               seed=D.POOL_SEED + seed)
        pool_info.append({"seed": seed, "frames": len(pool.x), "face_frames": int(pool.has_face.sum()),
                          "face_fraction": pool.face_fraction, "control_frames": len(control.x),
                          "control_face_frames": int(control.has_face.sum())})
        log(f"seed {seed}: pool of {len(pool.x)} frames, {100 * pool.face_fraction:.1f}% with a face; "
            f"control pool {len(control.x)} frames, none with a face")
        prep = Prep(normalize, whiten, pool.x)
        prep_c = Prep(normalize, whiten, control.x)
        xp = prep(pool.x)
        nets = {}
        if ck_params is None:
            log(f"  training the network: {steps} TICA steps")
            tr = train("trained", spec, xp, steps, seed)
            nets["trained"] = (spec, tr.params, prep)
            training[f"trained/seed{seed}"] = _train_info(tr)
        else:
            nets["trained"] = (spec, ck_params, prep)
        nets["random"] = (spec, Network(spec).init_params(seed), prep)
        log(f"  training without LCN: {steps} steps")
        tr = train("no_lcn", nolcn_spec, xp, steps, seed)
        nets["no_lcn"] = (nolcn_spec, tr.params, prep)
        training[f"no_lcn/seed{seed}"] = _train_info(tr)
        log(f"  training the no-faces control: {steps} steps")
        tr = train("no_faces", spec, prep_c(control.x), steps, seed)
        nets["no_faces"] = (spec, tr.params, prep_c)
        training[f"no_faces/seed{seed}"] = _train_info(tr)

        res = {}
        acts_of = {}
        for name, (sp, params, pr) in nets.items():
            acts_of[name] = C.activations(Network(sp), params, pr(x_eval))
            res[name] = _scores(acts_of[name], y_eval, val)
        res["first_stage"] = res["trained"]["stage1"]
        xe = prep(x_eval)
        templates = xp.reshape(len(xp), -1)
        res["linear"] = {"all": S.as_dict(S.choose_and_test(
            {"template": (xe.reshape(len(xe), -1) @ templates.T).astype(np.float32)}, y_eval, val))}
        per_seed.append(res)
        for name, r in res.items():
            if name in nets:
                b = r["all"]["balanced"]
                log(f"  {name:<10} balanced {100 * b['test']:5.1f}% (val {100 * b['val']:5.1f}%, {b['layer']} "
                    f"#{b['index']}); " + ", ".join(f"{s} {100 * r[s]['balanced']['test']:.1f}%"
                                                  for s in r if s.startswith("stage")))
        if si == 0:
            keep = {"nets": nets, "res": res, "pool": pool, "prep": prep}
    if keep["nets"]["trained"][1] is not None:
        np.savez(os.path.join(out, "params.npz"),
                 **{k: np.asarray(v) for k, v in keep["nets"]["trained"][1].items()})

    # the table: mean and spread over the seeds -------------------------------------------
    rows = [{"row": "chance", "paper": {"mean": majority, "std": 0.0}, "balanced": {"mean": 0.5, "std": 0.0},
             "auc": {"mean": 0.5, "std": 0.0}, "neurons": []}]
    keys = {ROWS[1]: ("linear", "all"), ROWS[2]: ("first_stage", None), ROWS[3]: ("random", "all"),
            ROWS[4]: ("trained", "all"), ROWS[5]: ("no_lcn", "all"), ROWS[6]: ("no_faces", "all")}
    for name in ROWS[1:]:
        k, sub = keys[name]
        choices = [r[k][sub] if sub else r[k] for r in per_seed]
        row = {"row": name, "neurons": [ch["balanced"]["layer"] for ch in choices]}
        for m in S.MEASURES:
            v = [ch[m]["test"] for ch in choices]
            row[m] = {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_seed": v,
                      "val": [ch[m]["val"] for ch in choices]}
        rows.append(row)
    by_stage = {}
    for net_name in ("trained", "random", "no_lcn", "no_faces"):
        stages = [s for s in per_seed[0][net_name] if s.startswith("stage")]
        by_stage[net_name] = {s: {m: {"mean": float(np.mean([r[net_name][s][m]["test"] for r in per_seed])),
                                      "std": float(np.std([r[net_name][s][m]["test"] for r in per_seed]))}
                                  for m in S.MEASURES} for s in stages}
    acc = {r["row"]: r["balanced"]["mean"] for r in rows}
    winners = [r["trained"]["all"]["balanced"]["layer"] for r in per_seed]
    tr_acc, rnd = acc["trained network"], acc["same network, random weights"]
    targets = {
        "trained_minus_random_points": 100 * (tr_acc - rnd),
        "trained_ge_random_plus_10": bool(tr_acc >= rnd + 0.10),
        "winner_is_stage_2_or_3": all(wn.startswith(("stage2", "stage3")) for wn in winners),
        "no_faces_minus_random_points": 100 * (acc[ROWS[6]] - rnd),
        "no_faces_le_random_plus_3": bool(acc[ROWS[6]] <= rnd + 0.03),
        "paper_order (trained > no-LCN > first-stage >= random)": bool(
            tr_acc > acc["trained without LCN"] > acc["best first-stage neuron"] >= rnd),
    }

    # pictures of seed 0's trained network: the overall winner and the best stage-2/3 neuron ------
    nets, res0, prep = keep["nets"], keep["res"], keep["prep"]
    model = NeuronModel(nets["trained"][0], nets["trained"][1])
    faces_raw = xt[yt == 1]
    x_show = prep(x_eval)
    label_of = (["val " + D.HELDOUT_GROUPS[g] for g in gh[val_mask]]
                + (test_names if test_names else ["test " + D.HELDOUT_GROUPS[g] for g in gh[~val_mask]]))
    neurons = {}
    for tag, sel in (("best", res0["trained"]["all"]["balanced"]), ("higher", res0["trained"].get("higher", {})
                                                                    .get("balanced"))):
        if sel is None:
            continue
        unit = model.unit(sel["layer"], sel["index"])
        curves = invariance(model, unit, faces_raw, prep, sel["threshold"])
        order, top_a = model.top_inputs(x_show, unit, 16)
        stim = model.optimal_stimulus(unit, steps=stimulus_steps, seed=seeds[0])
        where = f"{unit.layer} (map {unit.map}, y {unit.y}, x {unit.x})"
        report.image_grid(os.path.join(out, f"top_inputs_{tag}.png"), x_show[order],
                          [f"{label_of[i][:16]} {a:.2f}" for i, a in zip(order, top_a)],
                          f"top 16 evaluation inputs of {where}")
        report.image_grid(os.path.join(out, f"optimal_stimulus_{tag}.png"), stim["stimulus"][None],
                          [f"act {stim['activation']:.3g} (random max {stim['random_max']:.3g})"],
                          "optimal stimulus (unit norm)", scale=3)
        report.curves(os.path.join(out, f"invariance_{tag}.png"), curves, sel["threshold"],
                      f"invariance of {where} on {len(faces_raw)} test faces")
        neurons[tag] = {"layer": unit.layer, "map": unit.map, "y": unit.y, "x": unit.x,
                        "threshold": sel["threshold"], "val_balanced": sel["val"], "test_balanced": sel["test"],
                        "top_inputs": [{"index": int(i), "activation": float(a), "what": label_of[i]}
                                       for i, a in zip(order, top_a)],
                        "optimal_stimulus": {"activation": stim["activation"], "random_mean": stim["random_mean"],
                                             "random_max": stim["random_max"]},
                        "invariance": curves}
    net0 = Network(nets["trained"][0])
    w1 = np.asarray(nets["trained"][1]["stage1.W1"]).reshape(net0.stages[0].filter.weight_shape)
    k = net0.stages[0].filter.k
    filters = w1[w1.shape[0] // 2].reshape(w1.shape[1], k, k, c).transpose(0, 3, 1, 2)
    report.image_grid(os.path.join(out, "filters.png"), filters, [f"map {m}" for m in range(len(filters))],
                      "first-stage filters (W1) at the central location", scale=1.6)

    results = {
        "protocol": ("every neuron, threshold and setting chosen on the validation half of the bundled held-out "
                     "set; measured on the test split, never used for a choice. paper: plain accuracy at the best "
                     "of 20 evenly spaced thresholds between the neuron's min and max (Le et al. chose on their "
                     "test set; here on validation); balanced: balanced accuracy; auc: ROC AUC. Mean and spread "
                     f"(std) over {len(seeds)} seed(s)"),
        "validation": {"images": int(val_mask.sum()), "faces": int(yh[val_mask].sum()),
                       "make_up": {g: int(((gh == i) & val_mask).sum()) for i, g in enumerate(D.HELDOUT_GROUPS)}},
        "test": test_what, "chance": {"paper": majority, "balanced": 0.5, "auc": 0.5},
        "spec": "checkpoint" if checkpoint else preset, "network": spec.to_dict(), "normalize": normalize,
        "whiten": whiten, "steps": steps, "seeds": seeds, "lr": lr, "batch_size": batch_size,
        "trained_through": "downpour up (1 replica, 2 shards)" if up else "in-process Downpour loop",
        "pool": {"per_face": per_face, "per_nonface": per_nonface, "per_seed": pool_info},
        "checkpoint": None if manifest is None else {"dir": checkpoint, "id": manifest["checkpoint_id"],
                                                      "step": manifest["step"]},
        "training": training, "rows": rows, "best_neuron_by_stage": by_stage, "winners": winners,
        "neurons": neurons, "targets": targets, "per_seed": per_seed,
    }
    results["seconds"] = time.perf_counter() - t_start
    report.table_png(os.path.join(out, "table.png"),
                     [{"row": r["row"], "accuracy": r["balanced"]["mean"]} for r in rows],
                     "balanced accuracy on the test split, mean over seeds")
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=float)
    write_html(out, results)
    log(format_table(results))
    log(f"report: {os.path.join(out, 'report.html')}  ({results['seconds']:.0f}s)")
    return results


def _train_info(tr: C.TrainResult) -> dict:
    return {"steps": tr.steps, "seconds": tr.seconds, "loss_first": tr.first_loss, "loss_last": tr.last_loss}


def caption(results: dict) -> str:
    t = results["test"]
    return (f"test: {t['faces']} faces, {t['other']} other ({t['source']}); neurons chosen on "
            f"{results['validation']['images']} validation images; {len(results['seeds'])} seed(s)")


def format_table(results: dict) -> str:
    lines = [caption(results),
             f"{'row':<46} {'paper acc':>13} {'balanced':>13} {'ROC AUC':>13}   winning layers (balanced)"]
    for r in results["rows"]:
        cells = " ".join(f"{100 * r[m]['mean']:6.1f} +- {100 * r[m]['std']:3.1f}" for m in S.MEASURES)
        lines.append(f"{r['row']:<46} {cells}   {', '.join(r['neurons'])}")
    lines.append("best neuron per stage (balanced, test): " + "; ".join(
        f"{n}: " + ", ".join(f"{s} {100 * v['balanced']['mean']:.1f}" for s, v in d.items())
        for n, d in results["best_neuron_by_stage"].items()))
    t = results["targets"]
    lines.append(f"trained - random = {t['trained_minus_random_points']:+.1f} points (target >= +10: "
                 f"{'met' if t['trained_ge_random_plus_10'] else 'missed'}); winner in stage 2/3: "
                 f"{'yes' if t['winner_is_stage_2_or_3'] else 'no'}; no-faces - random = "
                 f"{t['no_faces_minus_random_points']:+.1f} (target <= +3: "
                 f"{'met' if t['no_faces_le_random_plus_3'] else 'missed'}); paper's order: "
                 f"{'yes' if t['paper_order (trained > no-LCN > first-stage >= random)'] else 'no'}")
    return "\n".join(lines)


def write_html(out: str, results: dict) -> None:
    e = html.escape

    def cell(v):
        return f"{100 * v['mean']:.1f}% &plusmn; {100 * v['std']:.1f}"

    rows = "".join(f"<tr><td>{e(r['row'])}</td>" + "".join(f"<td>{cell(r[m])}</td>" for m in S.MEASURES)
                   + f"<td>{e(', '.join(r['neurons']))}</td></tr>" for r in results["rows"])
    by_stage = results["best_neuron_by_stage"]
    stage_names = list(next(iter(by_stage.values())))
    stage_rows = "".join(f"<tr><td>{e(n)}</td>" + "".join(f"<td>{cell(d[s]['balanced'])}</td>" for s in stage_names)
                         + "</tr>" for n, d in by_stage.items())
    tr = "".join(f"<li>{e(k)}: {v['steps']} steps in {v['seconds']:.0f}s, TICA loss {v['loss_first']:.4g} &rarr; "
                 f"{v['loss_last']:.4g}</li>" for k, v in results["training"].items())
    pools = "".join(f"<li>seed {p['seed']}: {p['frames']} frames, {p['face_frames']} with a face "
                    f"({100 * p['face_fraction']:.1f}%); control {p['control_frames']} frames, none with a face</li>"
                    for p in results["pool"]["per_seed"])
    sections = ""
    titles = {"best": "The best neuron overall", "higher": "The best stage-2 or stage-3 neuron"}
    for tag, n in results["neurons"].items():
        os_ = n["optimal_stimulus"]
        sections += f"""<h2>{titles[tag]}: {e(n['layer'])} (map {n['map']}, y {n['y']}, x {n['x']})</h2>
<p>balanced accuracy: validation {100 * n['val_balanced']:.1f}%, test {100 * n['test_balanced']:.1f}%</p>
<h3>Top inputs</h3><img src="top_inputs_{tag}.png">
<h3>Optimal stimulus</h3><p>activation {os_['activation']:.4g}; random unit-norm inputs: mean
{os_['random_mean']:.4g}, max {os_['random_max']:.4g}</p><img src="optimal_stimulus_{tag}.png">
<h3>Invariance</h3><img src="invariance_{tag}.png">"""
    t = results["targets"]
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>downpour eval faces</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto}}td,th{{padding:.2em .6em;border-bottom:1px solid #ddd}}</style>
</head><body><h1>Face neurons (Le et al. 2012, table 1)</h1>
<p>{e(caption(results))}.</p><p>{e(results['protocol'])}.</p>
<table><tr><th>row</th><th>paper's accuracy (20 thresholds)</th><th>balanced accuracy</th><th>ROC AUC</th>
<th>winning layer per seed</th></tr>{rows}</table>
<p>Targets: trained &minus; random = {t['trained_minus_random_points']:+.1f} points (balanced);
no-faces control &minus; random = {t['no_faces_minus_random_points']:+.1f} points.</p>
<p>Best neuron restricted to one stage (balanced accuracy, test):</p>
<table><tr><th>network</th>{''.join(f"<th>{s}</th>" for s in stage_names)}</tr>{stage_rows}</table>
<img src="table.png"><h2>Training</h2><p>{e(results['trained_through'])}; inputs
{e(results['normalize'])}, whitening {e(results['whiten'])}.</p><ul>{pools}</ul><ul>{tr}</ul>
{sections}
<h2>First-stage filters</h2><img src="filters.png">
</body></html>"""
    with open(os.path.join(out, "report.html"), "w", encoding="utf-8") as f:
        f.write(doc)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="", metavar="DIR",
                   help="a checkpoint directory: evaluate its newest committed checkpoint instead of training here")
    p.add_argument("--test", default="", metavar="DIR", dest="test_dir",
                   help="your own test images: DIR/faces/ and DIR/other/ (any format Pillow reads, any size)")
    p.add_argument("--preset", default=PRESET, help="network: faces (default) or a preset name (tiny, small)")
    p.add_argument("--steps", type=int, default=STEPS, help="TICA steps per network trained here")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="one training of each network per seed")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=LR, help="Adagrad learning rate")
    p.add_argument("--per-face", type=int, default=PER_FACE, help="views of each training face in the pool")
    p.add_argument("--per-nonface", type=int, default=PER_NONFACE,
                   help="views of each training LFW non-face in the pool")
    p.add_argument("--whiten", default=WHITEN, choices=("none", "zca"), help="input whitening (fitted on the pool)")
    p.add_argument("--untied", action="store_true", help="untied (locally connected) stages 1 and 2 (faces network)")
    p.add_argument("--maps", type=int, default=MAPS, help="maps of stages 1 and 2 (faces network)")
    p.add_argument("--top-maps", type=int, default=TOP_MAPS, help="maps of stage 3 (faces network)")
    p.add_argument("--lam", type=float, default=None, help="TICA sparsity weight of every stage (default 0.1)")
    p.add_argument("--up", action="store_true", help="train every network through a downpour up cluster")
    p.add_argument("--time-budget", type=float, default=None, help="stop each training after this many seconds")
    p.add_argument("--out", default="eval-faces", help="output folder (report.html, PNGs, results.json)")


def cmd(args: argparse.Namespace) -> int:
    run(args.out, checkpoint=args.checkpoint, test_dir=args.test_dir, preset=args.preset, steps=args.steps,
        seeds=args.seeds, batch_size=args.batch_size, lr=args.lr, per_face=args.per_face,
        per_nonface=args.per_nonface, whiten=args.whiten, tied=not args.untied, maps=args.maps,
        top_maps=args.top_maps, lam=args.lam, up=args.up, time_budget=args.time_budget)
    return 0
