"""The data of ``downpour eval supervised``: an unlabeled pool, labeled
training images and test images, preprocessed as a job's feeder would.

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
"""

from __future__ import annotations

import os

import numpy as np

from downpour.evals import common as C
from downpour.feeder import bundled
from downpour.feeder.datasets import ConcatDataset, Dataset, open_dataset
from downpour.nn.spec import NetworkSpec

FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def fashion_dir() -> str | None:
    for d in (os.environ.get("DOWNPOUR_FASHION_MNIST", ""), *FASHION_DIRS):
        if (
            d
            and os.path.isfile(os.path.join(d, "train-images-idx3-ubyte.gz"))
            and os.path.isfile(os.path.join(d, "t10k-images-idx3-ubyte.gz"))
        ):
            return d
    return None


def _take(ds, n: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    idx = np.sort(np.random.default_rng(seed).permutation(len(ds))[:n])
    return ds.get(idx)


def _patches(ds: Dataset) -> bundled.PatchDataset:
    """``ds`` as the bundled natural-image patches it is: their positions name the photograph."""
    if not isinstance(ds, bundled.PatchDataset):
        raise TypeError(f"expected the bundled natural-image patches, got a {type(ds).__name__}")
    return ds


def load_data(
    data: str,
    spec: NetworkSpec,
    *,
    normalize: str,
    n_unlabeled: int,
    n_labeled: int,
    n_test: int,
    test_data: str = "",
    seed: int = 0,
    labeled_seed: int | None = None,
):
    """(description, unlabeled x, labeled x, y, test x, y, classes).

    ``seed`` draws the unlabeled pool and the test images; ``labeled_seed`` (default: ``seed``)
    the labeled images, so that seeds can differ in their labeled sets alone."""
    lseed = seed if labeled_seed is None else labeled_seed
    pp = C.preprocess_for(spec, normalize)
    d = fashion_dir() if data in ("", "fashion-mnist") else None
    if d is not None:
        train = open_dataset(os.path.join(d, "train-images-idx3-ubyte.gz"), pp)
        test = open_dataset(os.path.join(d, "t10k-images-idx3-ubyte.gz"), pp)
        xu, _ = _take(train, n_unlabeled, seed)
        xl, yl = _take(train, n_labeled, lseed + 1)
        xt, yt = _take(test, n_test, seed + 2)
        return (
            (
                f"Fashion-MNIST ({d}): {len(xu)} unlabeled + {len(xl)} labeled training images, "
                f"{len(xt)} test images from t10k"
            ),
            xu,
            xl,
            yl,
            xt,
            yt,
            10,
        )
    if data == "fashion-mnist":
        raise ValueError(
            "Fashion-MNIST not found: install Debian's dataset-fashion-mnist package "
            "(/usr/share/datasets/fashion-mnist) or set DOWNPOUR_FASHION_MNIST"
        )
    if data in ("", "bundled"):
        sp = bundled.build(pp)
        if not isinstance(sp.train, ConcatDataset):
            raise TypeError(f"the bundled train split is a {type(sp.train).__name__}, not patches and more")
        patches = _patches(sp.train.parts[0])
        xl, _ = patches.get(np.arange(len(patches)))
        yl = patches.positions[:, 0].astype(np.int64)
        held = _patches(sp.heldout_natural)
        xt, _ = held.get(np.arange(len(held)))
        yt = held.positions[:, 0].astype(np.int64)
        xu, _ = sp.train.get(np.arange(len(sp.train)))
        k = len(bundled.NATURAL_IMAGES)
        why = "requested" if data == "bundled" else "Fashion-MNIST not installed"
        return (
            (
                f"bundled pip-only set ({why}): which of {k} photographs a patch comes from; "
                f"{len(xl)} training patches, {len(xt)} test patches from held-out columns"
            ),
            xu,
            xl,
            yl,
            xt,
            yt,
            k,
        )
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
    assert yt is not None  # both sets were checked for labels above
    classes = int(max(ds.num_classes, int(yt.max()) + 1))
    return (
        (f"{data}: {len(xl)} labeled training examples, {len(xt)} test examples, {classes} classes"),
        xu,
        xl,
        yl,
        xt,
        yt,
        classes,
    )


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
    return np.sort(np.concatenate([take, rest[: n - len(take)]]))
