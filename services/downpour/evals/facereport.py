"""The table, pictures and report of ``downpour eval faces``.

``table`` turns every seed's scores into the rows (mean and spread over the
seeds), the best neuron per stage and the targets; ``neuron_pictures`` draws
seed 0's chosen neurons (top inputs, optimal stimulus, invariance curves) and
``filter_pictures`` its first-stage filters; ``format_table`` and
``write_html`` print and publish the results.
"""

from __future__ import annotations

import html
import os
from typing import Any

import numpy as np

from downpour.evals import facedata as D
from downpour.evals import facenets as N
from downpour.evals import neuronscore as S
from downpour.evals import report
from downpour.neurons.api import StimulusSettings
from downpour.neurons.model import NeuronModel
from downpour.nn import Network
from downpour.nn.spec import NetworkSpec

ROWS = (
    "chance",
    "best linear filter (training-sample templates)",
    "best first-stage neuron",
    "same network, random weights",
    "trained network",
    "trained without LCN",
    "control: trained on the pool without faces",
)


def table(per_seed: list[dict], majority: float) -> tuple[list[dict], dict, list[str], dict]:
    """(rows, best neuron by stage, the trained network's winning layer per seed, targets)."""
    rows: list[dict[str, Any]] = [
        {
            "row": "chance",
            "paper": {"mean": majority, "std": 0.0},
            "balanced": {"mean": 0.5, "std": 0.0},
            "auc": {"mean": 0.5, "std": 0.0},
            "neurons": [],
        }
    ]
    keys = {
        ROWS[1]: ("linear", "all"),
        ROWS[2]: ("first_stage", None),
        ROWS[3]: ("random", "all"),
        ROWS[4]: ("trained", "all"),
        ROWS[5]: ("no_lcn", "all"),
        ROWS[6]: ("no_faces", "all"),
    }
    for name in ROWS[1:]:
        k, sub = keys[name]
        choices = [r[k][sub] if sub else r[k] for r in per_seed]
        row: dict[str, Any] = {"row": name, "neurons": [ch["balanced"]["layer"] for ch in choices]}
        for m in S.MEASURES:
            v = [ch[m]["test"] for ch in choices]
            row[m] = {
                "mean": float(np.mean(v)),
                "std": float(np.std(v)),
                "per_seed": v,
                "val": [ch[m]["val"] for ch in choices],
            }
        rows.append(row)
    by_stage = {}
    for net_name in ("trained", "random", "no_lcn", "no_faces"):
        stages = [s for s in per_seed[0][net_name] if s.startswith("stage")]
        by_stage[net_name] = {
            s: {
                m: {
                    "mean": float(np.mean([r[net_name][s][m]["test"] for r in per_seed])),
                    "std": float(np.std([r[net_name][s][m]["test"] for r in per_seed])),
                }
                for m in S.MEASURES
            }
            for s in stages
        }
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
            tr_acc > acc["trained without LCN"] > acc["best first-stage neuron"] >= rnd
        ),
    }
    return rows, by_stage, winners, targets


def neuron_pictures(
    out: str, nets: dict, res0: dict, prep: N.Prep, ev: D.EvalSet, seed: int, stimulus_steps: int
) -> dict:
    """Pictures of seed 0's trained network (``nets``, scored in ``res0``): the overall winner and
    the best stage-2/3 neuron; what results.json says about each."""
    model = NeuronModel(nets["trained"][0], nets["trained"][1])
    faces_raw = ev.x_test[ev.y_test == 1]
    x_show = prep(ev.x)
    gh, val_mask = ev.groups, ev.val_mask
    label_of = ["val " + D.HELDOUT_GROUPS[g] for g in gh[val_mask]] + (
        ev.test_names if ev.test_names else ["test " + D.HELDOUT_GROUPS[g] for g in gh[~val_mask]]
    )
    neurons = {}
    for tag, sel in (
        ("best", res0["trained"]["all"]["balanced"]),
        ("higher", res0["trained"].get("higher", {}).get("balanced")),
    ):
        if sel is None:
            continue
        unit = model.unit(sel["layer"], sel["index"])
        curves = N.invariance(model, unit, faces_raw, prep, sel["threshold"])
        order, top_a = model.top_inputs(x_show, unit, 16)
        stim = model.optimal_stimulus(unit, StimulusSettings(steps=stimulus_steps, seed=seed))
        where = f"{unit.layer} (map {unit.map}, y {unit.y}, x {unit.x})"
        report.image_grid(
            os.path.join(out, f"top_inputs_{tag}.png"),
            x_show[order],
            [f"{label_of[i][:16]} {a:.2f}" for i, a in zip(order, top_a)],
            f"top 16 evaluation inputs of {where}",
        )
        report.image_grid(
            os.path.join(out, f"optimal_stimulus_{tag}.png"),
            stim["stimulus"][None],
            [f"act {stim['activation']:.3g} (random max {stim['random_max']:.3g})"],
            "optimal stimulus (unit norm)",
            scale=3,
        )
        report.curves(
            os.path.join(out, f"invariance_{tag}.png"),
            curves,
            sel["threshold"],
            f"invariance of {where} on {len(faces_raw)} test faces",
        )
        neurons[tag] = {
            "layer": unit.layer,
            "map": unit.map,
            "y": unit.y,
            "x": unit.x,
            "threshold": sel["threshold"],
            "val_balanced": sel["val"],
            "test_balanced": sel["test"],
            "top_inputs": [
                {"index": int(i), "activation": float(a), "what": label_of[i]} for i, a in zip(order, top_a)
            ],
            "optimal_stimulus": {
                "activation": stim["activation"],
                "random_mean": stim["random_mean"],
                "random_max": stim["random_max"],
            },
            "invariance": curves,
        }
    return neurons


def filter_pictures(out: str, spec: NetworkSpec, params: dict) -> None:
    """The first-stage filters (W1) at the central location, as filters.png."""
    net0 = Network(spec)
    first = net0.stages[0].filter
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


def caption(results: dict) -> str:
    t = results["test"]
    return (
        f"test: {t['faces']} faces, {t['other']} other ({t['source']}); neurons chosen on "
        f"{results['validation']['images']} validation images; {len(results['seeds'])} seed(s)"
    )


def format_table(results: dict) -> str:
    lines = [
        caption(results),
        f"{'row':<46} {'paper acc':>13} {'balanced':>13} {'ROC AUC':>13}   winning layers (balanced)",
    ]
    for r in results["rows"]:
        cells = " ".join(f"{100 * r[m]['mean']:6.1f} +- {100 * r[m]['std']:3.1f}" for m in S.MEASURES)
        lines.append(f"{r['row']:<46} {cells}   {', '.join(r['neurons'])}")
    lines.append(
        "best neuron per stage (balanced, test): "
        + "; ".join(
            f"{n}: " + ", ".join(f"{s} {100 * v['balanced']['mean']:.1f}" for s, v in d.items())
            for n, d in results["best_neuron_by_stage"].items()
        )
    )
    t = results["targets"]
    lines.append(
        f"trained - random = {t['trained_minus_random_points']:+.1f} points (target >= +10: "
        f"{'met' if t['trained_ge_random_plus_10'] else 'missed'}); winner in stage 2/3: "
        f"{'yes' if t['winner_is_stage_2_or_3'] else 'no'}; no-faces - random = "
        f"{t['no_faces_minus_random_points']:+.1f} (target <= +3: "
        f"{'met' if t['no_faces_le_random_plus_3'] else 'missed'}); paper's order: "
        f"{'yes' if t['paper_order (trained > no-LCN > first-stage >= random)'] else 'no'}"
    )
    return "\n".join(lines)


def write_html(out: str, results: dict) -> None:
    e = html.escape

    def cell(v):
        return f"{100 * v['mean']:.1f}% &plusmn; {100 * v['std']:.1f}"

    rows = "".join(
        f"<tr><td>{e(r['row'])}</td>"
        + "".join(f"<td>{cell(r[m])}</td>" for m in S.MEASURES)
        + f"<td>{e(', '.join(r['neurons']))}</td></tr>"
        for r in results["rows"]
    )
    by_stage = results["best_neuron_by_stage"]
    stage_names = list(next(iter(by_stage.values())))
    stage_rows = "".join(
        f"<tr><td>{e(n)}</td>" + "".join(f"<td>{cell(d[s]['balanced'])}</td>" for s in stage_names) + "</tr>"
        for n, d in by_stage.items()
    )
    tr = "".join(
        f"<li>{e(k)}: {v['steps']} steps in {v['seconds']:.0f}s, TICA loss {v['loss_first']:.4g} &rarr; "
        f"{v['loss_last']:.4g}</li>"
        for k, v in results["training"].items()
    )
    pools = "".join(
        f"<li>seed {p['seed']}: {p['frames']} frames, {p['face_frames']} with a face "
        f"({100 * p['face_fraction']:.1f}%); control {p['control_frames']} frames, none with a face</li>"
        for p in results["pool"]["per_seed"]
    )
    sections = ""
    titles = {"best": "The best neuron overall", "higher": "The best stage-2 or stage-3 neuron"}
    for tag, n in results["neurons"].items():
        os_ = n["optimal_stimulus"]
        sections += f"""<h2>{titles[tag]}: {e(n["layer"])} (map {n["map"]}, y {n["y"]}, x {n["x"]})</h2>
<p>balanced accuracy: validation {100 * n["val_balanced"]:.1f}%, test {100 * n["test_balanced"]:.1f}%</p>
<h3>Top inputs</h3><img src="top_inputs_{tag}.png">
<h3>Optimal stimulus</h3><p>activation {os_["activation"]:.4g}; random unit-norm inputs: mean
{os_["random_mean"]:.4g}, max {os_["random_max"]:.4g}</p><img src="optimal_stimulus_{tag}.png">
<h3>Invariance</h3><img src="invariance_{tag}.png">"""
    t = results["targets"]
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>downpour eval faces</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto}}td,th{{padding:.2em .6em;border-bottom:1px solid #ddd}}</style>
</head><body><h1>Face neurons (Le et al. 2012, table 1)</h1>
<p>{e(caption(results))}.</p><p>{e(results["protocol"])}.</p>
<table><tr><th>row</th><th>paper's accuracy (20 thresholds)</th><th>balanced accuracy</th><th>ROC AUC</th>
<th>winning layer per seed</th></tr>{rows}</table>
<p>Targets: trained &minus; random = {t["trained_minus_random_points"]:+.1f} points (balanced);
no-faces control &minus; random = {t["no_faces_minus_random_points"]:+.1f} points.</p>
<p>Best neuron restricted to one stage (balanced accuracy, test):</p>
<table><tr><th>network</th>{"".join(f"<th>{s}</th>" for s in stage_names)}</tr>{stage_rows}</table>
<img src="table.png"><h2>Training</h2><p>{e(results["trained_through"])}; inputs
{e(results["normalize"])}, whitening {e(results["whiten"])}.</p><ul>{pools}</ul><ul>{tr}</ul>
{sections}
<h2>First-stage filters</h2><img src="filters.png">
</body></html>"""
    with open(os.path.join(out, "report.html"), "w", encoding="utf-8") as f:
        f.write(doc)
