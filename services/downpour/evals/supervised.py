"""``downpour eval supervised``: does unsupervised pretraining help? (Le et al. 2012, section 5)

Rows, at every labeled-set size (``--labels``: 2,000 and 300 by default, the
same unlabeled pool for all), each measured over ``--seeds`` seeds (3) and
reported as mean and spread (the sample standard deviation over the seeds):
  * linear classifier on raw pixels (a reference point);
  * linear classifier on deep features: the network is pretrained without
    labels (TICA), frozen, and a softmax layer is trained on the L2-pooled
    outputs of every stage, before their contrast normalisation (``--readout``);
  * the network trained from random weights (supervised, every layer);
  * the network fine-tuned from the unsupervised one: its fresh softmax head
    trains alone for ``--head-only-steps`` steps (the job's ``head_only_steps``),
    then every layer (same steps in all, same data);
  * per-stage linear probes (``probes``), after those: a linear classifier on
    every stage's pooled output of the pretrained network and on the same
    stage of the same network at the weights its pretraining started from
    (the job's seed), and on the random network's all-stage readout; each
    pretrained row is compared with its random one.
One row beats another only when the difference of their means exceeds the
spread of that difference (sqrt(sd_a^2 + sd_b^2)); otherwise the table says
"within the spread". Every seed pretrains its own network (its own initial
weights and data order) and draws its own class-balanced labeled sets; the
unlabeled pool and the test images are the same for every seed. The linear
classifiers' L2 penalty is chosen per row on a validation fifth of that row's
labeled set (then refitted on all of it): the test images decide nothing.
``--full`` is the longer version (5 seeds, 300 to 5,000 labels, longer training).

Data (``--data``): see ``supdata``; the linear classifiers: see ``linear``.

Every network is trained through the distributed system (``downpour.evals.jobs``):
a ``downpour up`` cluster per training, ``--replicas`` model replicas running
asynchronous Downpour SGD against ``--shards`` Adagrad parameter shards. The
pretraining job is unsupervised (TICA); the fine-tuning job starts from its last
checkpoint (``init_from``: the stages from there, a fresh softmax head) and
trains every layer with labels; the from-random job is the same job without
``init_from``. Run folders: ``<out>/jobs/seed<s>/pretrain`` and
``<out>/jobs/seed<s>/labels<n>/{from_random,fine_tune}``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np

from downpour.evals import common as C
from downpour.evals import probes, report
from downpour.evals.jobs import train_job
from downpour.evals.linear import (
    L2_GRID,
    READOUTS,
    feature_layers,
    features,
    linear_accuracy,
    row_space,
    softmax_regression,
    validation_mask,
)
from downpour.evals.supdata import FASHION_CLASSES, FASHION_DIRS, balanced_subset, fashion_dir, load_data
from downpour.nn import Network, presets
from downpour.nn.spec import NetworkSpec

# the eval's public names, defined beside the code that uses them
__all__ = [
    "COMPARISONS",
    "FASHION_CLASSES",
    "FASHION_DIRS",
    "FULL",
    "L2_GRID",
    "READOUTS",
    "ROWS",
    "add_arguments",
    "balanced_subset",
    "cmd",
    "compare",
    "fashion_dir",
    "feature_layers",
    "features",
    "format_table",
    "linear_accuracy",
    "load_data",
    "network_accuracy",
    "parse_labels",
    "resolve",
    "row_space",
    "run",
    "softmax_regression",
    "spread",
    "validation_mask",
]

FULL: dict[str, Any] = {"seeds": 5, "labels": (300, 1000, 2000, 5000), "pretrain_steps": 4000, "finetune_steps": 1000}


def network_accuracy(net: Network, params: dict, x: np.ndarray, y: np.ndarray) -> float:
    logits = C.activations(net, params, x, layers=["head.logits"])["head.logits"]
    return float((logits.argmax(1) == y).mean())


ROWS = (
    "chance (most frequent test class)",
    "linear classifier on pixels",
    "linear classifier on deep features (pretrained, frozen)",
    "network trained from random weights",
    "network fine-tuned from unsupervised pretraining",
)
# (better row, worse row, what the paper found): the comparisons every table states
COMPARISONS = (
    (ROWS[4], ROWS[3], "fine-tuned vs from random"),
    (ROWS[2], ROWS[1], "features vs pixels"),
    (ROWS[3], ROWS[2], "from random vs features"),
)


def spread(values) -> float:
    """The sample standard deviation (0 for a single value)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def compare(a: list[float], b: list[float]) -> dict:
    """Mean difference a - b and whether it exceeds its spread sqrt(sd_a^2 + sd_b^2)."""
    d = float(np.mean(a) - np.mean(b))
    s = float(np.hypot(spread(a), spread(b)))
    verdict = "gain" if d > s else "loss" if d < -s else "within the spread"
    return {"difference": d, "spread": s, "verdict": verdict}


def run(
    out: str,
    *,
    data: str = "",
    test_data: str = "",
    preset: str = "small",
    seeds: int = 3,
    labels: tuple[int, ...] = (2000, 300),
    pretrain_steps: int = 1500,
    finetune_steps: int = 400,
    head_only_steps: int = 100,
    readout: str = "pooled",
    replicas: int = 2,
    shards: int = 2,
    batch_size: int = 32,
    lr: float = C.DEFAULT_LR,
    n_unlabeled: int = 20000,
    n_test: int = 2000,
    seed: int = 0,
    log=print,
) -> dict:
    t0 = time.perf_counter()
    labels = tuple(sorted({int(n) for n in labels}, reverse=True))
    if not labels or labels[-1] < 1 or seeds < 1:
        raise ValueError(f"need at least one seed and labeled-set sizes >= 1, got seeds={seeds}, labels={labels}")
    if head_only_steps >= finetune_steps:
        raise ValueError(f"head_only_steps={head_only_steps} must be below finetune_steps={finetune_steps}")
    os.makedirs(out, exist_ok=True)
    base = presets.get(preset)
    jobs = os.path.join(os.path.abspath(out), "jobs")
    kw = dict(replicas=replicas, shards=shards, batch_size=batch_size, lr=lr, log=log)
    probe_net = Network(base)
    all_rows = (*ROWS, *probes.probe_rows(probe_net))
    acc: dict[int, dict[str, list[float]]] = {n: {r: [] for r in all_rows} for n in labels}
    training, choices = {}, []
    what = classes = None
    seed_list = list(range(seed, seed + seeds))
    for s in seed_list:
        what, xu, xl_all, yl_all, xt, yt, classes = load_data(
            data,
            base,
            normalize="standardize",
            n_unlabeled=n_unlabeled,
            n_labeled=labels[0],
            n_test=n_test,
            test_data=test_data,
            seed=seed,
            labeled_seed=s,
        )
        if len(xl_all) < labels[0]:
            raise ValueError(f"--labels {labels[0]}: the data has only {len(xl_all)} labeled training examples")
        spec = NetworkSpec(input=base.input, stages=base.stages, classes=classes)
        net = Network(spec)
        log(f"seed {s}: {what}")
        sdir = os.path.join(jobs, f"seed{s}")
        log(f"unsupervised pretraining: TICA on {len(xu)} unlabeled images")
        pre = train_job(os.path.join(sdir, "pretrain"), base, xu, steps=pretrain_steps, seed=s, **kw)
        training[f"seed{s}/pretrain"] = _training(pre, replicas, os.path.join(sdir, "pretrain"))
        pix_l, pix_t = xl_all.reshape(len(xl_all), -1).astype(np.float64), xt.reshape(len(xt), -1).astype(np.float64)
        # the pretrained network's readout and stages, and the same at the job's initial weights
        random_params = probe_net.init_params(s)
        linear = {ROWS[1]: (pix_l, pix_t)}
        linear.update(probes.feature_sets(probe_net, pre.params, random_params, xl_all, xt, readout, ROWS[2]))
        counts = np.bincount(yt, minlength=classes)
        for n in labels:
            idx = balanced_subset(yl_all, n, classes, s)
            xl, yl = xl_all[idx], yl_all[idx]
            row = acc[n]

            def add(name, a, _row=row, _n=n, _s=s):
                _row[name].append(a)
                log(f"  seed {_s}, {_n} labels: {name:<60} {100 * a:5.1f}%")

            add(ROWS[0], float(counts.max() / counts.sum()))
            for name, (fl, ft) in linear.items():
                fl, ft = np.asarray(fl[idx], np.float64), np.asarray(ft, np.float64)
                a, l2, val = linear_accuracy(fl, yl, ft, yt, classes, seed=s)
                choices.append(
                    {
                        "seed": s,
                        "labels": n,
                        "row": name,
                        "l2": l2,
                        "validation_accuracy": {str(k): v for k, v in val.items()},
                    }
                )
                add(name, a)
            ldir = os.path.join(sdir, f"labels{n}")
            log(f"supervised from random weights: {n} labeled images")
            scratch = train_job(os.path.join(ldir, "from_random"), spec, xl, yl, steps=finetune_steps, seed=s, **kw)
            training[f"seed{s}/labels{n}/from_random"] = _training(scratch, replicas, os.path.join(ldir, "from_random"))
            add(ROWS[3], network_accuracy(net, scratch.params, xt, yt))
            log(f"fine-tuning the pretrained network: {n} labeled images, the head alone for {head_only_steps} steps")
            ft = train_job(
                os.path.join(ldir, "fine_tune"),
                spec,
                xl,
                yl,
                steps=finetune_steps,
                seed=s,
                init_from=os.path.join(sdir, "pretrain", "checkpoints"),
                settings={"head_only_steps": head_only_steps},
                **kw,
            )
            training[f"seed{s}/labels{n}/fine_tune"] = _training(ft, replicas, os.path.join(ldir, "fine_tune"))
            add(ROWS[4], network_accuracy(net, ft.params, xt, yt))
    rows = [
        {"row": r, "labels": n, "accuracies": acc[n][r], "mean": float(np.mean(acc[n][r])), "spread": spread(acc[n][r])}
        for n in labels
        for r in all_rows
    ]
    comparisons = [
        dict(compare(acc[n][a], acc[n][b]), labels=n, what=what_, better=a, worse=b)
        for n in labels
        for a, b, what_ in (*COMPARISONS, *probes.probe_comparisons(probe_net, ROWS[2]))
    ]
    results = {
        "data": what,
        "classes": classes,
        "preset": preset,
        "seeds": seed_list,
        "labels": list(labels),
        "rows": rows,
        "comparisons": comparisons,
        "probe_layers": probes.stage_layers(probe_net),
        "linear_choices": choices,
        "training": training,
        "settings": {
            "pretrain_steps": pretrain_steps,
            "finetune_steps": finetune_steps,
            "head_only_steps": head_only_steps,
            "readout": readout,
            "batch_size": batch_size,
            "lr": lr,
            "unlabeled": n_unlabeled,
            "test": n_test,
        },
        "trained_by": f"downpour up: {replicas} replicas (asynchronous Downpour SGD), {shards} Adagrad "
        f"parameter shards, local processes",
        "seconds": time.perf_counter() - t0,
    }
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    caption = f"{what}; mean and spread over seeds {seed_list}"
    if len(labels) > 1:
        main = dict(results, rows=[r for r in rows if r["row"] in ROWS])
        report.label_curve(os.path.join(out, "curve.png"), main, caption)
    probes.chart(os.path.join(out, "probes.png"), results, ROWS[2], f"pretrained vs random weights: {caption}")
    log(format_table(results))
    return results


def _training(tr, replicas: int, run_dir: str) -> dict:
    return {
        "steps_per_replica": tr.steps,
        "replicas": replicas,
        "seconds": tr.seconds,
        "loss_first": tr.first_loss,
        "loss_last": tr.last_loss,
        "run_dir": run_dir,
    }


def format_table(results: dict) -> str:
    """Rows (in the results' order) x labeled-set sizes, "mean ± spread" in percent, then the comparisons."""
    labels = results["labels"]
    cells = {(r["row"], r["labels"]): f"{100 * r['mean']:.1f} ± {100 * r['spread']:.1f}" for r in results["rows"]}
    names = list(dict.fromkeys(r["row"] for r in results["rows"]))
    w = max(56, *(len(k) + 1 for k in names))
    ww = max(26, *(len(c["what"]) for c in results["comparisons"]))
    lines = [
        f"data: {results['data']}",
        f"test accuracy (%), mean ± spread over seeds {results['seeds']}",
        f"{'row':<{w}}" + "".join(f"{f'{n} labels':>16}" for n in labels),
    ]
    lines += [f"{name:<{w}}" + "".join(f"{cells[name, n]:>16}" for n in labels) for name in names]
    for c in results["comparisons"]:
        lines.append(
            f"{c['labels']:>5} labels, {c['what']:<{ww}} {100 * c['difference']:+5.1f} points "
            f"(spread {100 * c['spread']:.1f}): {c['verdict']}"
        )
    lines.append(f"(trained by {results['trained_by']}; {results['seconds']:.0f}s)")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        default="",
        help="'fashion-mnist', 'bundled', or a labeled folder/.npz/IDX file "
        "(default: Fashion-MNIST if installed, else bundled)",
    )
    p.add_argument("--test-data", default="", help="a separate labeled test set (default: 20%% of --data)")
    p.add_argument("--preset", default="small")
    p.add_argument(
        "--full",
        action="store_true",
        help=f"the longer version: {FULL['seeds']} seeds, labels {','.join(map(str, FULL['labels']))}, "
        f"{FULL['pretrain_steps']} pretraining and {FULL['finetune_steps']} supervised steps "
        "(flags given explicitly still win)",
    )
    p.add_argument("--seeds", type=int, default=None, help="seeds per row (default 3)")
    p.add_argument("--labels", default=None, help="labeled-set sizes, comma-separated (default 2000,300)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="unsupervised (TICA) steps per replica (1500)")
    p.add_argument("--finetune-steps", type=int, default=None, help="supervised steps per replica, per network (400)")
    p.add_argument(
        "--head-only-steps",
        type=int,
        default=100,
        help="fine-tuning's first steps that train the fresh head alone (the job's head_only_steps)",
    )
    p.add_argument(
        "--readout",
        choices=READOUTS,
        default="pooled",
        help="what the linear classifier on deep features reads: every stage's pooled output (before "
        "contrast normalisation), every stage's output, the top stage's output, or every stage's pooled "
        "output summed over the four quarters of each map (4 features a map)",
    )
    p.add_argument("--replicas", type=int, default=2, help="model replicas of every training job")
    p.add_argument("--shards", type=int, default=2, help="parameter shards of every training job")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=C.DEFAULT_LR)
    p.add_argument("--unlabeled", type=int, default=20000, help="images for pretraining")
    p.add_argument("--test", type=int, default=2000, help="test images")
    p.add_argument("--seed", type=int, default=0, help="the first seed; also draws the unlabeled pool and test images")
    p.add_argument("--out", default="eval-supervised")


def parse_labels(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise ValueError(f"--labels {text!r}: comma-separated whole numbers, e.g. 2000,300") from None
    if not out or min(out) < 1:
        raise ValueError(f"--labels {text!r}: at least one size, every size >= 1")
    return out


def resolve(args: argparse.Namespace) -> dict:
    """The run's settings: the defaults, or ``--full``'s, under the flags given explicitly."""
    d = dict(FULL) if args.full else {"seeds": 3, "labels": (2000, 300), "pretrain_steps": 1500, "finetune_steps": 400}
    for k in d:
        v = getattr(args, k)
        if v is not None:
            d[k] = parse_labels(v) if k == "labels" else v
    return d


def cmd(args: argparse.Namespace) -> int:
    run(
        args.out,
        data=args.data,
        test_data=args.test_data,
        preset=args.preset,
        head_only_steps=args.head_only_steps,
        readout=args.readout,
        replicas=args.replicas,
        shards=args.shards,
        batch_size=args.batch_size,
        lr=args.lr,
        n_unlabeled=args.unlabeled,
        n_test=args.test,
        seed=args.seed,
        **resolve(args),
    )
    return 0
