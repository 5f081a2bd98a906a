"""``downpour eval supervised``: does unsupervised pretraining help? (Le et al. 2012, section 5)

Rows:
  * linear classifier on raw pixels (a reference point);
  * linear classifier on deep features: the network is pretrained without
    labels (TICA), frozen, and a softmax layer is trained on its last stage;
  * the network trained from random weights (supervised, every layer);
  * the network fine-tuned from the unsupervised one (same steps, same data).

Data (``--data``): by default Fashion-MNIST (10 classes, 28x28 grey, resized to
the model's input) read from Debian's ``dataset-fashion-mnist`` package
(/usr/share/datasets/fashion-mnist, IDX): pretraining on ``--unlabeled``
training images, supervised training on ``--labeled`` of them, test on
``--test`` images of the separate t10k set. Without that package: the bundled
pip-only fallback, 18-way "which photograph is this patch from" on the bundled
natural images (2000 training patches from the left three quarters of every
image, 500 test patches from the held-out right quarter). Any labeled folder,
.npz (x, y) or IDX file works with ``--data`` (a seeded 80/20 split, or
``--test-data``).

Every network is trained through the distributed system (``downpour.evals.jobs``):
a ``downpour up`` cluster per training, ``--replicas`` model replicas running
asynchronous Downpour SGD against ``--shards`` Adagrad parameter shards. The
pretraining job is unsupervised (TICA); the fine-tuning job starts from its last
checkpoint (``init_from``: the stages from there, a fresh softmax head) and
trains every layer with labels; the from-random job is the same job without
``init_from``. Run folders: ``<out>/jobs/{pretrain,from_random,fine_tune}``.
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
              test_data: str = "", seed: int = 0):
    """(description, unlabeled x, labeled x, y, test x, y, classes)."""
    pp = C.preprocess_for(spec, normalize)
    if data in ("", "fashion-mnist") and fashion_dir():
        d = fashion_dir()
        train = open_dataset(os.path.join(d, "train-images-idx3-ubyte.gz"), pp)
        test = open_dataset(os.path.join(d, "t10k-images-idx3-ubyte.gz"), pp)
        xu, _ = _take(train, n_unlabeled, seed)
        xl, yl = _take(train, n_labeled, seed + 1)
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
        xl, yl = _take(ds, min(n_labeled, len(ds)), seed + 1)
        xu, _ = _take(ds, min(n_unlabeled, len(ds)), seed)
        xt, yt = _take(tds, min(n_test, len(tds)), seed + 2)
    else:
        perm = np.random.default_rng(seed).permutation(len(ds))
        cut = int(0.8 * len(ds))
        tr, te = np.sort(perm[:cut]), np.sort(perm[cut:])
        xu, _ = ds.get(tr[:n_unlabeled])
        xl, yl = ds.get(tr[:n_labeled])
        xt, yt = ds.get(te[:n_test])
    classes = int(max(ds.num_classes, int(yt.max()) + 1))
    return (f"{data}: {len(xl)} labeled training examples, {len(xt)} test examples, {classes} classes"), \
        xu, xl, yl, xt, yt, classes


def softmax_regression(f_train: np.ndarray, y: np.ndarray, classes: int, *, steps: int = 500, lr: float = 0.1,
                       l2: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """A linear softmax classifier on fixed features, full-batch Adagrad; features standardised inside."""
    n, d = f_train.shape
    W = np.zeros((d, classes))
    b = np.zeros(classes)
    aW, ab = np.zeros_like(W), np.zeros_like(b)
    Y = np.eye(classes)[y]
    for _ in range(steps):
        z = f_train @ W + b
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        g = (p - Y) / n
        gW, gb = f_train.T @ g + l2 * W, g.sum(0)
        aW += gW * gW
        ab += gb * gb
        W -= lr * gW / (np.sqrt(aW) + 1e-8)
        b -= lr * gb / (np.sqrt(ab) + 1e-8)
    return W, b


def linear_accuracy(f_train, y_train, f_test, y_test, classes) -> float:
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    a, t = (f_train - mu) / sd, (f_test - mu) / sd
    W, b = softmax_regression(a, y_train, classes)
    return float(((t @ W + b).argmax(1) == y_test).mean())


def features(net: Network, params: dict, x: np.ndarray) -> np.ndarray:
    last = f"stage{len(net.stages)}.output"
    return C.activations(net, params, x, layers=[last])[last].astype(np.float64)


def network_accuracy(net: Network, params: dict, x: np.ndarray, y: np.ndarray) -> float:
    logits = C.activations(net, params, x, layers=["head.logits"])["head.logits"]
    return float((logits.argmax(1) == y).mean())


def run(out: str, *, data: str = "", test_data: str = "", preset: str = "small", pretrain_steps: int = 1500,
        finetune_steps: int = 750, replicas: int = 2, shards: int = 2, batch_size: int = 32,
        lr: float = C.DEFAULT_LR, n_unlabeled: int = 20000, n_labeled: int = 2000, n_test: int = 2000, seed: int = 0,
        log=print) -> dict:
    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    base = presets.get(preset)
    what, xu, xl, yl, xt, yt, classes = load_data(
        data, base, normalize="standardize", n_unlabeled=n_unlabeled, n_labeled=n_labeled, n_test=n_test,
        test_data=test_data, seed=seed)
    log(what)
    spec = NetworkSpec(input=base.input, stages=base.stages, classes=classes)
    unsup_net, net = Network(base), Network(spec)
    jobs = os.path.join(os.path.abspath(out), "jobs")
    kw = dict(replicas=replicas, shards=shards, batch_size=batch_size, lr=lr, seed=seed, log=log)
    rows, training = [], {}

    def add(name, acc, note=""):
        rows.append({"row": name, "accuracy": acc, "note": note})
        log(f"  {name:<52} {100 * acc:5.1f}%")

    def record(name, tr):
        training[name] = {"steps_per_replica": tr.steps, "replicas": replicas, "seconds": tr.seconds,
                          "loss_first": tr.first_loss, "loss_last": tr.last_loss,
                          "run_dir": os.path.join(jobs, name)}

    counts = np.bincount(yt, minlength=classes)
    add("chance (most frequent test class)", float(counts.max() / counts.sum()))
    add("linear classifier on pixels", linear_accuracy(xl.reshape(len(xl), -1).astype(np.float64), yl,
                                                       xt.reshape(len(xt), -1).astype(np.float64), yt, classes))
    log(f"unsupervised pretraining: TICA on {len(xu)} unlabeled images")
    pre = train_job(os.path.join(jobs, "pretrain"), base, xu, steps=pretrain_steps, **kw)
    record("pretrain", pre)
    add("linear classifier on deep features (pretrained, frozen)",
        linear_accuracy(features(unsup_net, pre.params, xl), yl, features(unsup_net, pre.params, xt), yt, classes))
    log(f"supervised from random weights: {len(xl)} labeled images")
    scratch = train_job(os.path.join(jobs, "from_random"), spec, xl, yl, steps=finetune_steps, **kw)
    record("from_random", scratch)
    add("network trained from random weights", network_accuracy(net, scratch.params, xt, yt))
    log("fine-tuning the pretrained network (same job, starting from the pretraining's checkpoint)")
    ft = train_job(os.path.join(jobs, "fine_tune"), spec, xl, yl, steps=finetune_steps,
                   init_from=os.path.join(jobs, "pretrain", "checkpoints"), **kw)
    record("fine_tune", ft)
    add("network fine-tuned from unsupervised pretraining", network_accuracy(net, ft.params, xt, yt))
    results = {"data": what, "classes": classes, "preset": preset, "rows": rows, "training": training,
               "trained_by": f"downpour up: {replicas} replicas (asynchronous Downpour SGD), {shards} Adagrad "
                             f"parameter shards, local processes",
               "seconds": time.perf_counter() - t0}
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    log(format_table(results))
    return results


def format_table(results: dict) -> str:
    lines = [f"data: {results['data']}", f"{'row':<56} {'test accuracy':>13}"]
    lines += [f"{r['row']:<56} {100 * r['accuracy']:12.1f}%" for r in results["rows"]]
    lines.append(f"(trained by {results['trained_by']}; {results['seconds']:.0f}s)")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="", help="'fashion-mnist', 'bundled', or a labeled folder/.npz/IDX file "
                                              "(default: Fashion-MNIST if installed, else bundled)")
    p.add_argument("--test-data", default="", help="a separate labeled test set (default: 20%% of --data)")
    p.add_argument("--preset", default="small")
    p.add_argument("--pretrain-steps", type=int, default=1500, help="unsupervised (TICA) steps per replica")
    p.add_argument("--finetune-steps", type=int, default=750, help="supervised steps per replica, per network")
    p.add_argument("--replicas", type=int, default=2, help="model replicas of every training job")
    p.add_argument("--shards", type=int, default=2, help="parameter shards of every training job")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=C.DEFAULT_LR)
    p.add_argument("--unlabeled", type=int, default=20000, help="images for pretraining")
    p.add_argument("--labeled", type=int, default=2000, help="labeled training images")
    p.add_argument("--test", type=int, default=2000, help="test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="eval-supervised")


def cmd(args: argparse.Namespace) -> int:
    run(args.out, data=args.data, test_data=args.test_data, preset=args.preset, pretrain_steps=args.pretrain_steps,
        finetune_steps=args.finetune_steps, replicas=args.replicas, shards=args.shards, batch_size=args.batch_size,
        lr=args.lr, n_unlabeled=args.unlabeled, n_labeled=args.labeled, n_test=args.test, seed=args.seed)
    return 0
