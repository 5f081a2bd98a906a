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
    then every layer (same steps in all, same data).
One row beats another only when the difference of their means exceeds the
spread of that difference (sqrt(sd_a^2 + sd_b^2)); otherwise the table says
"within the spread". Every seed pretrains its own network (its own initial
weights and data order) and draws its own class-balanced labeled sets; the
unlabeled pool and the test images are the same for every seed. The linear
classifiers' L2 penalty is chosen per row on a validation fifth of that row's
labeled set (then refitted on all of it): the test images decide nothing.
``--full`` is the longer version (5 seeds, 300 to 5,000 labels, longer training).

Data (``--data``): by default Fashion-MNIST (10 classes, 28x28 grey, resized to
the model's input) read from Debian's ``dataset-fashion-mnist`` package
(/usr/share/datasets/fashion-mnist, IDX): pretraining on ``--unlabeled``
training images, supervised training on the labeled sets drawn from the
training images, test on ``--test`` images of the separate t10k set. Without
that package: the bundled pip-only fallback, 18-way "which photograph is this
patch from" on the bundled natural images (2000 training patches from the left
three quarters of every image, 500 test patches from the held-out right
quarter). Any labeled folder, .npz (x, y) or IDX file works with ``--data`` (a
seeded 80/20 split, or ``--test-data``).

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

import numpy as np

from downpour.evals import common as C
from downpour.evals.jobs import train_job
from downpour.feeder import bundled
from downpour.feeder.datasets import open_dataset
from downpour.nn import Network, presets
from downpour.nn.spec import NetworkSpec

FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


def fashion_dir() -> str | None:
    for d in (os.environ.get("DOWNPOUR_FASHION_MNIST", ""), *FASHION_DIRS):
        if d and os.path.isfile(os.path.join(d, "train-images-idx3-ubyte.gz")) and \
                os.path.isfile(os.path.join(d, "t10k-images-idx3-ubyte.gz")):
            return d
    return None


def _take(ds, n: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    idx = np.sort(np.random.default_rng(seed).permutation(len(ds))[:n])
    return ds.get(idx)


def load_data(data: str, spec: NetworkSpec, *, normalize: str, n_unlabeled: int, n_labeled: int, n_test: int,
              test_data: str = "", seed: int = 0, labeled_seed: int | None = None):
    """(description, unlabeled x, labeled x, y, test x, y, classes).

    ``seed`` draws the unlabeled pool and the test images; ``labeled_seed`` (default: ``seed``)
    the labeled images, so that seeds can differ in their labeled sets alone."""
    lseed = seed if labeled_seed is None else labeled_seed
    pp = C.preprocess_for(spec, normalize)
    if data in ("", "fashion-mnist") and fashion_dir():
        d = fashion_dir()
        train = open_dataset(os.path.join(d, "train-images-idx3-ubyte.gz"), pp)
        test = open_dataset(os.path.join(d, "t10k-images-idx3-ubyte.gz"), pp)
        xu, _ = _take(train, n_unlabeled, seed)
        xl, yl = _take(train, n_labeled, lseed + 1)
        xt, yt = _take(test, n_test, seed + 2)
        return (f"Fashion-MNIST ({d}): {len(xu)} unlabeled + {len(xl)} labeled training images, "
                f"{len(xt)} test images from t10k"), xu, xl, yl, xt, yt, 10
    if data == "fashion-mnist":
        raise ValueError("Fashion-MNIST not found: install Debian's dataset-fashion-mnist package "
                         "(/usr/share/datasets/fashion-mnist) or set DOWNPOUR_FASHION_MNIST")
    if data in ("", "bundled"):
        sp = bundled.build(pp)
        patches = sp.train.parts[0]
        xl, _ = patches.get(np.arange(len(patches)))
        yl = patches.positions[:, 0].astype(np.int64)
        held = sp.heldout_natural
        xt, _ = held.get(np.arange(len(held)))
        yt = held.positions[:, 0].astype(np.int64)
        xu, _ = sp.train.get(np.arange(len(sp.train)))
        k = len(bundled.NATURAL_IMAGES)
        why = "requested" if data == "bundled" else "Fashion-MNIST not installed"
        return (f"bundled pip-only set ({why}): which of {k} photographs a patch comes from; "
                f"{len(xl)} training patches, {len(xt)} test patches from held-out columns"), xu, xl, yl, xt, yt, k
    ds = open_dataset(data, pp)
    if ds.labels is None:
        raise ValueError(f"--data {data}: no labels (an .npz needs 'y'; IDX images need their labels file)")
    if test_data:
        tds = open_dataset(test_data, pp)
        if tds.labels is None:
            raise ValueError(f"--test-data {test_data}: no labels")
        xl, yl = _take(ds, min(n_labeled, len(ds)), lseed + 1)
        xu, _ = _take(ds, min(n_unlabeled, len(ds)), seed)
        xt, yt = _take(tds, min(n_test, len(tds)), seed + 2)
    else:
        perm = np.random.default_rng(seed).permutation(len(ds))
        cut = int(0.8 * len(ds))
        tr, te = np.sort(perm[:cut]), np.sort(perm[cut:])
        xu, _ = ds.get(tr[:n_unlabeled])
        xl, yl = ds.get(np.sort(np.random.default_rng(lseed + 1).permutation(tr)[:n_labeled]))
        xt, yt = ds.get(te[:n_test])
    classes = int(max(ds.num_classes, int(yt.max()) + 1))
    return (f"{data}: {len(xl)} labeled training examples, {len(xt)} test examples, {classes} classes"), \
        xu, xl, yl, xt, yt, classes


L2_GRID = (1e-3, 1e-2, 1e-1)  # the linear classifiers' penalties, one chosen per row on validation
READOUTS = ("pooled", "outputs", "top")
FULL = {"seeds": 5, "labels": (300, 1000, 2000, 5000), "pretrain_steps": 4000, "finetune_steps": 1000}


def softmax_regression(f_train: np.ndarray, y: np.ndarray, classes: int, *, l2: float = 1e-4,
                       max_iter: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """A linear softmax classifier on fixed features: mean cross-entropy + l2/2 |W|^2 (bias not
    penalised), minimised by L-BFGS; (W (d, classes), b)."""
    from scipy.optimize import minimize

    n, d = f_train.shape
    Y = np.eye(classes)[y]

    def loss_and_grad(theta):
        W, b = theta[:d * classes].reshape(d, classes), theta[d * classes:]
        z = f_train @ W + b
        z -= z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        g = (np.exp(logp) - Y) / n
        loss = -(Y * logp).sum() / n + 0.5 * l2 * float((W * W).sum())
        return loss, np.concatenate([(f_train.T @ g + l2 * W).ravel(), g.sum(0)])

    r = minimize(loss_and_grad, np.zeros(d * classes + classes), jac=True, method="L-BFGS-B",
                 options={"maxiter": max_iter})
    return r.x[:d * classes].reshape(d, classes), r.x[d * classes:]


def row_space(f_train: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """The same L2-penalised linear problem in min(n, d) dimensions.

    With more features than examples, the penalised optimum W lies in the row space of the
    training features F = U S V^T (the loss gradient is F^T g): W = V C gives F W = U S C and
    |W| = |C|, so a classifier fitted on F V and applied to X V is the one fitted on F and
    applied to X, at the cost of n instead of d columns."""
    n, d = f_train.shape
    if d <= n:
        return (f_train, *others)
    lam, U = np.linalg.eigh(f_train @ f_train.T)
    keep = lam > lam.max() * 1e-10
    V = f_train.T @ (U[:, keep] / np.sqrt(lam[keep]))
    return (f_train @ V, *(o @ V for o in others))


def _fit_and_score(f_train, y_train, f_test, y_test, classes, l2) -> float:
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    a, t = row_space((f_train - mu) / sd, (f_test - mu) / sd)
    W, b = softmax_regression(a, y_train, classes, l2=l2)
    return float(((t @ W + b).argmax(1) == y_test).mean())


def validation_mask(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for a stratified ``fraction`` of every class (at least one example of a class with two or more)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = max(1, int(round(fraction * len(idx)))) if len(idx) >= 2 else 0
        mask[idx[:k]] = True
    return mask


def linear_accuracy(f_train, y_train, f_test, y_test, classes, *, l2_grid=L2_GRID, seed: int = 0
                    ) -> tuple[float, float, dict]:
    """Test accuracy of a linear softmax classifier whose L2 penalty is chosen on a validation fifth of
    the training examples and which is then refitted on all of them: (accuracy, penalty, validation
    accuracy of every penalty)."""
    val_scores = {}
    if len(l2_grid) > 1:
        val = validation_mask(y_train, 0.2, seed)
        for l2 in l2_grid:
            val_scores[l2] = _fit_and_score(f_train[~val], y_train[~val], f_train[val], y_train[val], classes, l2)
        l2 = max(l2_grid, key=lambda k: val_scores[k])  # the first (smallest) of equals
    else:
        l2 = l2_grid[0]
    return _fit_and_score(f_train, y_train, f_test, y_test, classes, l2), l2, val_scores


def balanced_subset(y: np.ndarray, n: int, classes: int, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` examples, as near an equal number per class as the labels allow."""
    if n > len(y):
        raise ValueError(f"{n} labeled examples asked for, only {len(y)} available")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    per = n // classes
    take = np.concatenate([order[y[order] == c][:per] for c in range(classes)])
    rest = np.setdiff1d(order, take, assume_unique=True)
    rest = order[np.isin(order, rest)]  # in the seeded order, not sorted
    return np.sort(np.concatenate([take, rest[:n - len(take)]]))


def feature_layers(net: Network, readout: str = "pooled") -> list[str]:
    """The layers a linear classifier on deep features reads: ``pooled``, every stage's L2-pooled
    output before its contrast normalisation; ``outputs``, every stage's output; ``top``, the last
    stage's output (what the network's own softmax head reads)."""
    if readout not in READOUTS:
        raise ValueError(f"readout {readout!r} is unknown; allowed: {', '.join(READOUTS)}")
    if readout == "top":
        return [f"{net.stages[-1].name}.output"]
    return [f"{st.name}.{'pool' if readout == 'pooled' and st.spec.pool is not None else 'output'}"
            for st in net.stages]


def features(net: Network, params: dict, x: np.ndarray, readout: str = "pooled") -> np.ndarray:
    layers = feature_layers(net, readout)
    acts = C.activations(net, params, x, layers=layers)
    return np.concatenate([acts[k] for k in layers], axis=1).astype(np.float64)


def network_accuracy(net: Network, params: dict, x: np.ndarray, y: np.ndarray) -> float:
    logits = C.activations(net, params, x, layers=["head.logits"])["head.logits"]
    return float((logits.argmax(1) == y).mean())


ROWS = ("chance (most frequent test class)", "linear classifier on pixels",
        "linear classifier on deep features (pretrained, frozen)", "network trained from random weights",
        "network fine-tuned from unsupervised pretraining")
# (better row, worse row, what the paper found): the comparisons every table states
COMPARISONS = ((ROWS[4], ROWS[3], "fine-tuned vs from random"), (ROWS[2], ROWS[1], "features vs pixels"),
               (ROWS[3], ROWS[2], "from random vs features"))


def spread(values) -> float:
    """The sample standard deviation (0 for a single value)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def compare(a: list[float], b: list[float]) -> dict:
    """Mean difference a - b and whether it exceeds its spread sqrt(sd_a^2 + sd_b^2)."""
    d = float(np.mean(a) - np.mean(b))
    s = float(np.hypot(spread(a), spread(b)))
    verdict = "gain" if d > s else "loss" if d < -s else "within the spread"
    return {"difference": d, "spread": s, "verdict": verdict}


def run(out: str, *, data: str = "", test_data: str = "", preset: str = "small", seeds: int = 3,
        labels: tuple[int, ...] = (2000, 300), pretrain_steps: int = 1500, finetune_steps: int = 400,
        head_only_steps: int = 100, readout: str = "pooled", replicas: int = 2, shards: int = 2, batch_size: int = 32,
        lr: float = C.DEFAULT_LR, n_unlabeled: int = 20000, n_test: int = 2000, seed: int = 0, log=print) -> dict:
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
    acc: dict[int, dict[str, list[float]]] = {n: {r: [] for r in ROWS} for n in labels}
    training, choices = {}, []
    what = classes = None
    seed_list = list(range(seed, seed + seeds))
    for s in seed_list:
        what, xu, xl_all, yl_all, xt, yt, classes = load_data(
            data, base, normalize="standardize", n_unlabeled=n_unlabeled, n_labeled=labels[0], n_test=n_test,
            test_data=test_data, seed=seed, labeled_seed=s)
        if len(xl_all) < labels[0]:
            raise ValueError(f"--labels {labels[0]}: the data has only {len(xl_all)} labeled training examples")
        spec = NetworkSpec(input=base.input, stages=base.stages, classes=classes)
        unsup_net, net = Network(base), Network(spec)
        log(f"seed {s}: {what}")
        sdir = os.path.join(jobs, f"seed{s}")
        log(f"unsupervised pretraining: TICA on {len(xu)} unlabeled images")
        pre = train_job(os.path.join(sdir, "pretrain"), base, xu, steps=pretrain_steps, seed=s, **kw)
        training[f"seed{s}/pretrain"] = _training(pre, replicas, os.path.join(sdir, "pretrain"))
        feats_l = features(unsup_net, pre.params, xl_all, readout)
        feats_t = features(unsup_net, pre.params, xt, readout)
        pix_l, pix_t = xl_all.reshape(len(xl_all), -1).astype(np.float64), xt.reshape(len(xt), -1).astype(np.float64)
        counts = np.bincount(yt, minlength=classes)
        for n in labels:
            idx = balanced_subset(yl_all, n, classes, s)
            xl, yl = xl_all[idx], yl_all[idx]
            row = acc[n]

            def add(name, a, _row=row, _n=n):
                _row[name].append(a)
                log(f"  seed {s}, {_n} labels: {name:<56} {100 * a:5.1f}%")

            add(ROWS[0], float(counts.max() / counts.sum()))
            for name, (fl, ft) in ((ROWS[1], (pix_l, pix_t)), (ROWS[2], (feats_l, feats_t))):
                a, l2, val = linear_accuracy(fl[idx], yl, ft, yt, classes, seed=s)
                choices.append({"seed": s, "labels": n, "row": name, "l2": l2,
                                "validation_accuracy": {str(k): v for k, v in val.items()}})
                add(name, a)
            ldir = os.path.join(sdir, f"labels{n}")
            log(f"supervised from random weights: {n} labeled images")
            scratch = train_job(os.path.join(ldir, "from_random"), spec, xl, yl, steps=finetune_steps, seed=s, **kw)
            training[f"seed{s}/labels{n}/from_random"] = _training(scratch, replicas, os.path.join(ldir, "from_random"))
            add(ROWS[3], network_accuracy(net, scratch.params, xt, yt))
            log(f"fine-tuning the pretrained network: {n} labeled images, the head alone for {head_only_steps} steps")
            ft = train_job(os.path.join(ldir, "fine_tune"), spec, xl, yl, steps=finetune_steps, seed=s,
                           init_from=os.path.join(sdir, "pretrain", "checkpoints"),
                           settings={"head_only_steps": head_only_steps}, **kw)
            training[f"seed{s}/labels{n}/fine_tune"] = _training(ft, replicas, os.path.join(ldir, "fine_tune"))
            add(ROWS[4], network_accuracy(net, ft.params, xt, yt))
    rows = [{"row": r, "labels": n, "accuracies": acc[n][r], "mean": float(np.mean(acc[n][r])),
             "spread": spread(acc[n][r])} for n in labels for r in ROWS]
    comparisons = [dict(compare(acc[n][a], acc[n][b]), labels=n, what=what_, better=a, worse=b)
                   for n in labels for a, b, what_ in COMPARISONS]
    results = {"data": what, "classes": classes, "preset": preset, "seeds": seed_list, "labels": list(labels),
               "rows": rows, "comparisons": comparisons, "linear_choices": choices, "training": training,
               "settings": {"pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps,
                            "head_only_steps": head_only_steps, "readout": readout, "batch_size": batch_size,
                            "lr": lr, "unlabeled": n_unlabeled, "test": n_test},
               "trained_by": f"downpour up: {replicas} replicas (asynchronous Downpour SGD), {shards} Adagrad "
                             f"parameter shards, local processes",
               "seconds": time.perf_counter() - t0}
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    if len(labels) > 1:
        from downpour.evals import report

        report.label_curve(os.path.join(out, "curve.png"), results,
                           f"{what}; mean and spread over seeds {seed_list}")
    log(format_table(results))
    return results


def _training(tr, replicas: int, run_dir: str) -> dict:
    return {"steps_per_replica": tr.steps, "replicas": replicas, "seconds": tr.seconds, "loss_first": tr.first_loss,
            "loss_last": tr.last_loss, "run_dir": run_dir}


def format_table(results: dict) -> str:
    """Rows x labeled-set sizes, "mean ± spread" in percent, then the comparisons."""
    labels = results["labels"]
    cells = {(r["row"], r["labels"]): f"{100 * r['mean']:.1f} ± {100 * r['spread']:.1f}" for r in results["rows"]}
    lines = [f"data: {results['data']}",
             f"test accuracy (%), mean ± spread over seeds {results['seeds']}",
             f"{'row':<56}" + "".join(f"{f'{n} labels':>16}" for n in labels)]
    lines += [f"{name:<56}" + "".join(f"{cells[name, n]:>16}" for n in labels) for name in ROWS]
    for c in results["comparisons"]:
        lines.append(f"{c['labels']:>5} labels, {c['what']:<26} {100 * c['difference']:+5.1f} points "
                     f"(spread {100 * c['spread']:.1f}): {c['verdict']}")
    lines.append(f"(trained by {results['trained_by']}; {results['seconds']:.0f}s)")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="", help="'fashion-mnist', 'bundled', or a labeled folder/.npz/IDX file "
                                              "(default: Fashion-MNIST if installed, else bundled)")
    p.add_argument("--test-data", default="", help="a separate labeled test set (default: 20%% of --data)")
    p.add_argument("--preset", default="small")
    p.add_argument("--full", action="store_true",
                   help=f"the longer version: {FULL['seeds']} seeds, labels {','.join(map(str, FULL['labels']))}, "
                        f"{FULL['pretrain_steps']} pretraining and {FULL['finetune_steps']} supervised steps "
                        "(flags given explicitly still win)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per row (default 3)")
    p.add_argument("--labels", default=None, help="labeled-set sizes, comma-separated (default 2000,300)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="unsupervised (TICA) steps per replica (1500)")
    p.add_argument("--finetune-steps", type=int, default=None, help="supervised steps per replica, per network (400)")
    p.add_argument("--head-only-steps", type=int, default=100,
                   help="fine-tuning's first steps that train the fresh head alone (the job's head_only_steps)")
    p.add_argument("--readout", choices=READOUTS, default="pooled",
                   help="what the linear classifier on deep features reads: every stage's pooled output (before "
                        "contrast normalisation), every stage's output, or the top stage's output")
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
    d = dict(FULL) if args.full else {"seeds": 3, "labels": (2000, 300), "pretrain_steps": 1500,
                                      "finetune_steps": 400}
    for k in d:
        v = getattr(args, k)
        if v is not None:
            d[k] = parse_labels(v) if k == "labels" else v
    return d


def cmd(args: argparse.Namespace) -> int:
    run(args.out, data=args.data, test_data=args.test_data, preset=args.preset, head_only_steps=args.head_only_steps,
        readout=args.readout, replicas=args.replicas, shards=args.shards, batch_size=args.batch_size, lr=args.lr,
        n_unlabeled=args.unlabeled, n_test=args.test, seed=args.seed, **resolve(args))
    return 0
