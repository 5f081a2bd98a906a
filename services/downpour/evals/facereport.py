"""The table, pictures and report of ``downpour eval faces``.

``assemble`` turns both folds' choices into the rows (balanced accuracy and
ROC AUC with identity-bootstrap intervals, Le et al.'s plain accuracy beside
them), the best neuron per stage, the paired differences the targets name,
the targets and the test's power; ``neuron_pictures`` draws the best
top-stage neuron of fold 0's trained network (top inputs, optimal stimulus,
invariance curves) and ``filter_pictures`` its first-stage filters;
``format_table`` and ``write_html`` print and publish the results.
"""

from __future__ import annotations

import html
import os
from typing import Any

import numpy as np

from downpour.evals import facefold as F
from downpour.evals import facenets as N
from downpour.evals import faceviews as V
from downpour.evals import report
from downpour.evals.facestats import Fold, Resampler, detectable
from downpour.neurons.api import StimulusSettings
from downpour.neurons.model import NeuronModel
from downpour.nn import Network
from downpour.nn.spec import NetworkSpec

PROTOCOL = (
    "two folds by identity: each trains on one half of the category's identities and is tested on the other; "
    "every neuron and threshold is chosen on the same test built from the training identities and reported on "
    "the held-out ones (every identity held out once). balanced: balanced accuracy over both folds' held-out "
    "images; auc: mean of the folds' ROC AUCs; both with 95% intervals from a bootstrap over identities "
    "(clusters: an identity with all its views); paper: Le et al.'s plain accuracy at the best of 20 evenly "
    "spaced thresholds (mean of the folds; chosen on the training identities, not on the test as the paper did)"
)
# (name, a, b): the paired differences reported; a and b are row keys
DIFFERENCES = (
    ("trained - random weights (top stage)", "trained_top", "random_top"),
    ("trained - control without the objects (top stage)", "trained_top", "no_faces_top"),
    ("trained - trained without LCN (top stage)", "trained_top", "no_lcn_top"),
    ("trained without LCN - best first-stage neuron", "no_lcn_top", "first_stage"),
    ("best first-stage neuron - random weights (top stage)", "first_stage", "random_top"),
    ("trained (top stage) - k-means", "trained_top", "kmeans"),
    ("trained (top stage) - autoencoder", "trained_top", "autoencoder"),
    ("trained - random weights (every unit)", "trained_all", "random_all"),
)


def assemble(folds: list[dict], held: list[dict], fold_info: list[dict]) -> dict:
    """results.json's measurements from every fold's picks (``facefold.score_fold``) and held-out
    sets (``held[k][test]``: the Labelled images each fold was judged on)."""
    tests = list(F.TESTS)
    rs = {t: Resampler([Fold(h[t].y, h[t].cluster) for h in held]) for t in tests}
    boots: dict[tuple[str, str], dict] = {}
    rows: list[dict[str, Any]] = []
    chance: dict[str, Any] = {"row": "chance", "key": "chance"}
    for t in tests:
        y = np.concatenate([h[t].y for h in held])
        maj = float(max(y.mean(), 1 - y.mean()))
        chance[t] = {"balanced": _flat(0.5), "auc": _flat(0.5), "paper": maj}
    rows.append(chance)
    for key, label, _, which in F.ROWS:
        if key not in folds[0]["rows"]:
            continue
        row: dict[str, Any] = {"row": label, "key": key, "candidates": which}
        for t in tests:
            picks = [f["rows"][key][t] for f in folds]
            bal = rs[t].balanced([p.correct for p in picks])
            auc = rs[t].auc([p.scores for p in picks])
            boots[(key, t)] = {"balanced": bal, "auc": auc}
            row[t] = {
                "balanced": rs[t].interval(*bal),
                "auc": rs[t].interval(*auc),
                "paper": float(np.mean([p.choice["paper"]["test"] for p in picks])),
                "selection_balanced": [p.choice["balanced"]["val"] for p in picks],
                "neurons": [f"{p.choice['balanced']['layer']}#{p.choice['balanced']['index']}" for p in picks],
            }
        rows.append(row)
    by_stage = {
        net: {
            s: {t: rs[t].interval(*rs[t].balanced([f["by_stage"][net][t][s].correct for f in folds])) for t in tests}
            for s in folds[0]["by_stage"][net]["B"]
        }
        for net in folds[0]["by_stage"]
    }
    diffs = {
        t: {
            name: {m: rs[t].difference(boots[(a, t)][m], boots[(b, t)][m]) for m in ("balanced", "auc")}
            for name, a, b in DIFFERENCES
            if (a, t) in boots and (b, t) in boots
        }
        for t in tests
    }
    out = {
        "protocol": PROTOCOL,
        "folds": fold_info,
        "rows": rows,
        "best_neuron_by_stage": by_stage,
        "differences": diffs,
        "targets": targets(rows, diffs["B"]),
        "power": {t: power(rows, diffs[t], t) for t in tests},
    }
    return out


def _flat(v: float) -> dict:
    return {"mean": v, "lo": v, "hi": v, "se": 0.0}


def targets(rows: list[dict], diffs: dict) -> dict:
    """The issue's targets on test B (balanced accuracy, top-stage candidates)."""
    acc = {r["key"]: r["B"]["balanced"]["mean"] for r in rows}
    if "trained_top" not in acc:
        return {}
    d_rand = diffs.get("trained - random weights (top stage)", {}).get("balanced")
    d_ctrl = diffs.get("trained - control without the objects (top stage)", {}).get("balanced")
    out: dict[str, Any] = {}
    if d_rand:
        out["trained_minus_random_points"] = 100 * d_rand["mean"]
        out["trained_ge_random_plus_10_ci_above_0"] = bool(d_rand["mean"] >= 0.10 and d_rand["above_zero"])
    if d_ctrl:
        out["trained_minus_control_points"] = 100 * d_ctrl["mean"]
        out["trained_ge_control_plus_5_ci_above_0"] = bool(d_ctrl["mean"] >= 0.05 and d_ctrl["above_zero"])
    order = ("trained_top", "no_lcn_top", "first_stage", "random_top")
    if all(k in acc for k in order):
        tr, nl, fs, rn = (acc[k] for k in order)
        out["paper_order (trained > no-LCN > first-stage >= random)"] = bool(tr > nl > fs >= rn)
    for k in ("kmeans", "autoencoder"):
        if k in acc:
            out[f"trained_beats_{k}"] = bool(acc["trained_top"] > acc[k])
    return out


def power(rows: list[dict], diffs: dict, test: str) -> dict:
    """What the test can detect: from the bootstrap standard errors, the smallest true difference
    found 80% of the time at 5% (two-sided), for one row and for the paired differences."""
    se = {r["key"]: r[test]["balanced"]["se"] for r in rows if r["key"] != "chance"}
    return {
        "row_se_points": {k: 100 * v for k, v in se.items()},
        "row_detectable_points": {k: 100 * detectable(v) for k, v in se.items()},
        "paired_detectable_points": {n: 100 * d["balanced"]["detectable"] for n, d in diffs.items()},
    }


def neuron_pictures(
    out: str, spec: NetworkSpec, params: dict, prep, data, choice: dict, seed: int, stimulus_steps: int
) -> dict:
    """Pictures of one chosen neuron of a fold's trained network (``choice``: a balanced
    neuronscore choice): its top held-out test-B inputs, optimal stimulus and invariance curves
    on the held-out aligned objects; what results.json says about it."""
    model = NeuronModel(spec, params)
    unit = model.unit(choice["layer"], choice["index"])
    held_b, held_a = data.tests["B"][1], data.tests["A"][1]
    x_show = prep(held_b.x)
    label_of = [V.GROUPS_B[g] for g in held_b.group]
    objects_raw = held_a.x[held_a.y == 1]
    curves = N.invariance(model, unit, objects_raw, prep, choice["threshold"])
    order, top_a = model.top_inputs(x_show, unit, 16)
    stim = model.optimal_stimulus(unit, StimulusSettings(steps=stimulus_steps, seed=seed))
    where = f"{unit.layer} (map {unit.map}, y {unit.y}, x {unit.x})"
    report.image_grid(
        os.path.join(out, "top_inputs.png"),
        x_show[order],
        [f"{label_of[i][:16]} {a:.2f}" for i, a in zip(order, top_a)],
        f"top 16 held-out test-B inputs of {where}",
    )
    report.image_grid(
        os.path.join(out, "optimal_stimulus.png"),
        stim["stimulus"][None],
        [f"act {stim['activation']:.3g} (random max {stim['random_max']:.3g})"],
        "optimal stimulus (unit norm)",
        scale=3,
    )
    report.curves(
        os.path.join(out, "invariance.png"),
        curves,
        choice["threshold"],
        f"invariance of {where} on {len(objects_raw)} held-out aligned images",
    )
    return {
        "layer": unit.layer,
        "map": unit.map,
        "y": unit.y,
        "x": unit.x,
        "threshold": choice["threshold"],
        "selection_balanced": choice["val"],
        "heldout_balanced": choice["test"],
        "top_inputs": [{"index": int(i), "activation": float(a), "what": label_of[i]} for i, a in zip(order, top_a)],
        "optimal_stimulus": {k: stim[k] for k in ("activation", "random_mean", "random_max")},
        "invariance": curves,
    }


def filter_pictures(out: str, spec: NetworkSpec, params: dict) -> None:
    """The first-stage filters (W1) at the central location, as filters.png."""
    first = Network(spec).stages[0].filter
    if first is None:
        raise ValueError("the first stage has no filter to draw")
    c = spec.input[0]
    w1 = np.asarray(params["stage1.W1"]).reshape(first.weight_shape)
    k = first.k
    filters = w1[w1.shape[0] // 2].reshape(w1.shape[1], k, k, c).transpose(0, 3, 1, 2)
    report.image_grid(
        os.path.join(out, "filters.png"),
        filters,
        [f"map {m}" for m in range(len(filters))],
        "first-stage filters (W1) at the central location",
        scale=1.6,
    )


def _ci(v: dict) -> str:
    return f"{100 * v['mean']:5.1f} [{100 * v['lo']:5.1f}, {100 * v['hi']:5.1f}]"


def format_table(results: dict) -> str:
    cat = results.get("category", {}).get("name", "faces")
    lines = [
        f"category: {cat}; two folds by identity, every identity held out once",
        f"{'row':<62} {'test B balanced [95% CI]':>26} {'B AUC':>6} {'test A balanced':>26}",
    ]
    for r in results["rows"]:
        lines.append(
            f"{r['row']:<62} {_ci(r['B']['balanced']):>26} {100 * r['B']['auc']['mean']:6.1f} "
            f"{_ci(r['A']['balanced']):>26}"
        )
    for name, d in results["differences"]["B"].items():
        b = d["balanced"]
        lines.append(f"test B, {name}: {_ci(b)} points{' (CI above 0)' if b['above_zero'] else ''}")
    lines.append("targets (test B): " + "; ".join(f"{k}: {v}" for k, v in results["targets"].items()))
    return "\n".join(lines)


def write_html(out: str, results: dict) -> None:
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(r['row'])}</td>"
        + "".join(
            f"<td>{_ci(r[t]['balanced'])}</td><td>{100 * r[t]['auc']['mean']:.1f}</td><td>{100 * r[t]['paper']:.1f}</td>"
            for t in F.TESTS
        )
        + f"<td>{e(', '.join(r['B'].get('neurons', [])))}</td></tr>"
        for r in results["rows"]
    )
    diffs = "".join(
        f"<tr><td>{e(n)}</td>"
        + "".join(f"<td>{_ci(results['differences'][t][n]['balanced'])}</td>" for t in F.TESTS)
        + f"<td>{100 * d['balanced']['detectable']:.1f}</td></tr>"
        for n, d in results["differences"]["B"].items()
    )
    by_stage = results["best_neuron_by_stage"]
    stage_names = list(next(iter(by_stage.values())))
    stage_rows = "".join(
        f"<tr><td>{e(n)}</td>" + "".join(f"<td>{_ci(d[s]['B'])}</td>" for s in stage_names) + "</tr>"
        for n, d in by_stage.items()
    )
    tr = "".join(
        f"<li>{e(k)}: {v['steps']} steps in {v['seconds']:.0f}s, TICA loss {v['loss_first']:.4g} &rarr; "
        f"{v['loss_last']:.4g}</li>"
        for k, v in results["training"].items()
    )
    n = results["neuron"]
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>downpour eval faces</title>
<style>body{{font-family:sans-serif;max-width:80em;margin:2em auto}}td,th{{padding:.2em .6em;border-bottom:1px solid #ddd}}</style>
</head><body><h1>Object-selective neurons: {e(results["category"]["name"])} (Le et al. 2012, tables 1 and 2)</h1>
<p>{e(results["protocol"])}.</p>
<table><tr><th>row</th><th>test B balanced [95% CI]</th><th>B AUC</th><th>B paper</th>
<th>test A balanced [95% CI]</th><th>A AUC</th><th>A paper</th><th>neurons (test B, per fold)</th></tr>{rows}</table>
<h2>Paired differences (balanced accuracy, same resampled identities)</h2>
<table><tr><th>difference</th><th>test B</th><th>test A</th><th>detectable on B (80% power)</th></tr>{diffs}</table>
<p>Targets (test B): {e("; ".join(f"{k}: {v}" for k, v in results["targets"].items()))}</p>
<h2>Best neuron restricted to one stage (test B)</h2>
<table><tr><th>network</th>{"".join(f"<th>{s}</th>" for s in stage_names)}</tr>{stage_rows}</table>
<img src="table.png"><h2>Training</h2><p>{e(results["trained_through"])}, {results["budget_seconds"]:.0f} s of
training per network; inputs {e(results["normalize"])}, whitening {e(results["whiten"])}.</p><ul>{tr}</ul>
<h2>The best top-stage neuron of fold 0: {e(n["layer"])} (map {n["map"]})</h2>
<p>balanced accuracy on test B: training identities {100 * n["selection_balanced"]:.1f}%, held-out
{100 * n["heldout_balanced"]:.1f}%</p>
<h3>Top held-out inputs</h3><img src="top_inputs.png">
<h3>Optimal stimulus</h3><p>activation {n["optimal_stimulus"]["activation"]:.4g}; random unit-norm inputs: mean
{n["optimal_stimulus"]["random_mean"]:.4g}, max {n["optimal_stimulus"]["random_max"]:.4g}</p>
<img src="optimal_stimulus.png"><h3>Invariance</h3><img src="invariance.png">
<h2>First-stage filters</h2><img src="filters.png">
</body></html>"""
    with open(os.path.join(out, "report.html"), "w", encoding="utf-8") as f:
        f.write(doc)
