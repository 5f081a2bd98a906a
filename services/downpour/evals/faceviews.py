"""The data of the faces experiment by identity: two folds, each fold's video-like pool, and
its two tests (test B: jittered views against hard negatives; test A: aligned images).

Identities (one per positive image: a person, a coin) are split into two
folds that swap (``identity_folds``): fold 0 trains on the even indices and
holds out the odd ones (for the faces, the bundled even/odd split), fold 1
the reverse; the negatives (the same photos without the object) are split
the same way by their own index. Every identity is held out exactly once.

Per fold:

- ``fold_pool``: the unlabeled training frames: the bundled train split's
  natural crops (training columns only) plus views of each training positive
  and negative over natural training-column crops (``facedata.video_pool``),
  drawn with ``VIEW_JITTER``; ``with_positives=False`` is the no-object
  control, the same frames less the positive ones.
- ``test_b``: for a set of identities, a labelled set (``GROUPS_B``): views
  of the object drawn with the pool's own jitter, views of the non-object
  photos, natural crops matched to the views' brightness and contrast,
  phase-scrambled views, and (faces only) crops the face cascade fires on.
  ``heldout=False`` is the selection set of the training identities (neuron
  and threshold are chosen on it: training columns of the natural images);
  ``heldout=True`` the test set of the held-out identities (held-out
  columns). The two never share an identity, a photo or a column region.
- ``test_a``: the aligned images as they are (``GROUPS_A``): the objects,
  the non-object photos and brightness-matched distractors.

Every labelled row carries a ``cluster``: the unit a bootstrap resamples
(all views of one identity, of one photo, one scrambled identity; each
natural crop and hard negative alone), distinct across groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from downpour.evals import facedata, viewjitter
from downpour.evals import facenegatives as negs
from downpour.evals.common import stratified_halves
from downpour.evals.facecategory import Category
from downpour.evals.viewjitter import Jitter
from downpour.feeder import bundled, preprocess

# The view jitter of the pool and of test B, fixed before any result was seen.
VIEW_SCALE = (0.55, 1.05)  # the object's side over the frame's: log-uniform between these
VIEW_ROTATION = 15.0  # degrees, uniform within +-
# the centre moves up to (1 - s) / 2 of the side (the room a smaller object leaves) plus 2 pixels:
# at least ~80% of the object stays in the frame
VIEW_SHIFT_SLACK = 1.0
VIEW_SHIFT_PX = 2.0
VIEW_LOG_CONTRAST = 0.4  # contrast multiplied by exp(uniform(+-0.4)) about the object's mean
VIEW_BRIGHTNESS = 0.1  # added brightness, uniform within +-0.1 on the [0, 1] scale
VIEW_JITTER = Jitter(
    log_scale=(float(np.log(VIEW_SCALE[0])), float(np.log(VIEW_SCALE[1]))),
    max_rotation=VIEW_ROTATION,
    shift_slack=VIEW_SHIFT_SLACK,
    shift_frac=0.0,
    shift_px=VIEW_SHIFT_PX,
    log_contrast=VIEW_LOG_CONTRAST,
    max_brightness=VIEW_BRIGHTNESS,
    mirror=True,  # mirrored half the time
)
N_BACKGROUNDS = 500  # natural crops of one side's columns that test B's views are drawn over
BACKGROUND_SEED = 7  # draws those crops (fixed: the scenery is no test's choice)
DISTRACTOR_SPLIT_SEED = 2012  # the fixed halving of the distractors between selection and test
N_DISTRACTORS_A = 100  # a user category's test-A distractors per half (the faces' bundled 200 halved)
DISTRACTOR_SEED = 11  # draws a user category's test-A distractors
GROUPS_B = (
    "views of the object",
    "views of the non-object photos",
    "natural crops",
    "phase-scrambled objects",
    "hard negatives",
)
GROUPS_A = ("aligned objects", "non-object photos", "distractors")


def identity_folds(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Two folds (train_ids, heldout_ids) over ``n`` identities that swap: fold 0 trains on
    the even positions and holds out the odd ones, fold 1 the reverse.

    ``seed`` 0 takes the identities in index order (the bundled faces' even/odd
    split is fold 0); another seed shuffles them first. ``n`` may be 0 (a
    category without negatives): every array is then empty.
    """
    if n < 0:
        raise ValueError(f"identity_folds: n must be >= 0, got {n}")
    order = np.arange(n) if seed == 0 else np.random.default_rng(seed).permutation(n)
    even, odd = np.sort(order[0::2]), np.sort(order[1::2])
    return [(even, odd), (odd, even)]


def _ids(ids, n: int, what: str) -> np.ndarray:
    a = np.asarray(ids, np.int64).reshape(-1)
    if len(a) and (a.min() < 0 or a.max() >= n):
        raise ValueError(f"{what} must index the category's {n} images; got {a.min()}..{a.max()}")
    if len(np.unique(a)) != len(a):
        raise ValueError(f"{what} repeat an index")
    return a


def _fit(images: np.ndarray, size: tuple[int, int], channels: int) -> np.ndarray:
    """Images to ``channels`` and the frame ``size`` (a no-op for a category built at that size)."""
    x = preprocess.convert_channels(np.asarray(images, np.float32), channels)
    if x.shape[2:] == tuple(size):
        return x
    if not len(x):
        return np.zeros((0, channels, *size), np.float32)
    return np.stack([preprocess.resize(v, size) for v in x]).astype(np.float32)


def fold_pool(
    category: Category,
    train_ids,
    train_neg_ids,
    size: tuple[int, int],
    channels: int,
    *,
    per_positive: int = 30,
    per_negative: int = 10,
    with_positives: bool = True,
    seed: int = facedata.POOL_SEED,
) -> facedata.Pool:
    """One fold's unlabeled pool: the bundled train split's natural crops, ``per_positive``
    views of each training positive and ``per_negative`` of each training negative over
    natural training-column crops (``VIEW_JITTER``). ``with_positives=False``: the control,
    the same frames less the positive ones. ``Pool.has_face`` marks the positive frames."""
    pos = category.positives[_ids(train_ids, len(category.positives), "train_ids")]
    neg = category.negatives[_ids(train_neg_ids, len(category.negatives), "train_neg_ids")]
    return facedata.video_pool(
        (int(size[0]), int(size[1])),
        channels,
        per_face=per_positive,
        per_nonface=per_negative,
        faces=with_positives,
        seed=seed,
        positives=_fit(pos, size, channels),
        negatives=_fit(neg, size, channels),
        jitter=VIEW_JITTER,
    )


@dataclass
class Labelled:
    """A labelled test set: raw [0, 1] float32 images and, per row, its label, group and cluster."""

    x: np.ndarray  # (N, C, H, W)
    y: np.ndarray  # int64: 1 the object, 0 not
    group: np.ndarray  # int64 index into group_names
    cluster: np.ndarray  # int64: the bootstrap's resampling unit; distinct across groups
    index: np.ndarray  # int64: the positive's or negative photo's index in the category; -1 for crops
    group_names: tuple[str, ...]
    notes: dict = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """How many rows each group holds."""
        return {g: int((self.group == i).sum()) for i, g in enumerate(self.group_names)}


class _Builder:
    """Collects the groups of a labelled set, numbering clusters so none repeats across groups."""

    def __init__(self, names: tuple[str, ...], size: tuple[int, int], channels: int):
        self.names, self.next_cluster = names, 0
        self.parts: list[tuple[np.ndarray, int, int, np.ndarray, np.ndarray]] = []
        self.empty = np.zeros((0, channels, *size), np.float32)

    def add(self, group: int, x: np.ndarray, label: int, clusters: np.ndarray, index: np.ndarray) -> None:
        """Rows ``x`` of ``group``; ``clusters`` numbers them from 0 within the group."""
        clusters = np.asarray(clusters, np.int64)
        self.parts.append((x, label, group, clusters + self.next_cluster, np.asarray(index, np.int64)))
        self.next_cluster += int(clusters.max()) + 1 if len(clusters) else 0

    def build(self, notes: dict) -> Labelled:
        def column(i: int) -> np.ndarray:
            cols = [np.broadcast_to(np.asarray(p[i], np.int64), len(p[0])) for p in self.parts]
            return np.concatenate(cols) if cols else np.zeros(0, np.int64)

        x = np.concatenate([p[0] for p in self.parts] or [self.empty]).astype(np.float32)
        return Labelled(x, column(1), column(2), column(3), column(4), self.names, notes)


def _side(category: Category, pos_ids, neg_ids, size, channels: int, heldout: bool):
    """One side's (size, split name, positive ids, negative ids, fitted positives, fitted negatives)."""
    size = (int(size[0]), int(size[1]))
    pid = _ids(pos_ids, len(category.positives), "pos_ids")
    nid = _ids(neg_ids, len(category.negatives), "neg_ids")
    pos = _fit(category.positives[pid], size, channels)
    neg = _fit(category.negatives[nid], size, channels)
    return size, ("heldout" if heldout else "train"), pid, nid, pos, neg


def _stats(x: np.ndarray) -> np.ndarray:
    """(N, 2): each image's mean and standard deviation over all its pixels and channels."""
    flat = x.reshape(len(x), -1)
    return np.stack([flat.mean(1), flat.std(1)], 1)


def test_b(
    category: Category,
    pos_ids,
    neg_ids,
    size: tuple[int, int],
    channels: int,
    *,
    heldout: bool,
    seed: int,
    views: int = 8,
    neg_views: int = 4,
    natural: int = 400,
    scrambled_views: int = 4,
    hard: int = 200,
    jitter: Jitter = VIEW_JITTER,
) -> Labelled:
    """Test B of the identities ``pos_ids`` and negative photos ``neg_ids`` (module docstring).

    Natural-image crops (backgrounds, natural negatives, hard negatives) come
    from the held-out columns when ``heldout``, else from the training
    columns. Each part draws from its own stream of ``seed``: a part's images
    do not depend on another's size. ``notes``: the split, the natural crops'
    boxes (image, row0, col0, row1, col1), and for hard negatives the cascade
    scans' counts (``hard_scan``, ``hard_hits``; ``hard_short`` when fewer
    than ``hard`` were found) and each one's hit and cut (``hard_boxes``:
    image name, row, col, side, mirrored, cut row, cut col, cut side).
    """
    size, split, pid, nid, pos, neg = _side(category, pos_ids, neg_ids, size, channels, heldout)

    def rng(part: int) -> np.random.Generator:
        return np.random.default_rng([seed, int(heldout), part])

    backgrounds, _ = negs.natural_crops(split, N_BACKGROUNDS, size, channels, np.random.default_rng(BACKGROUND_SEED))
    b = _Builder(GROUPS_B, size, channels)
    notes: dict = {"split": split, "jitter": "view" if jitter == VIEW_JITTER else "custom"}

    xv = _views(pos, views, backgrounds, rng(0), jitter)
    b.add(0, xv, 1, np.repeat(np.arange(len(pid)), views), np.repeat(pid, views))
    xn = _views(neg, neg_views, backgrounds, rng(1), jitter)
    b.add(1, xn, 0, np.repeat(np.arange(len(nid)), neg_views), np.repeat(nid, neg_views))

    # matched one for one to the object's views (cycling), so their brightness and contrast
    # are distributed as the positives' are
    targets = _stats(xv) if len(xv) else (_stats(pos) if len(pos) else None)
    xc, boxes = negs.natural_crops(split, natural, size, channels, rng(2), targets)
    b.add(2, xc, 0, np.arange(natural), np.full(natural, -1))
    notes["natural_boxes"] = boxes.tolist()

    src = _views(pos, scrambled_views, backgrounds, rng(3), jitter)
    noise = rng(4)
    xs = np.stack([negs.phase_scramble(v, noise)[0] for v in src]) if len(src) else b.empty
    b.add(3, xs, 0, np.repeat(np.arange(len(pid)), scrambled_views), np.repeat(pid, scrambled_views))

    if category.hard_negatives and hard > 0:
        xh, hboxes, hnotes = negs.hard_negatives(split, hard, size, channels, rng(5))
        b.add(4, xh, 0, np.arange(len(xh)), np.full(len(xh), -1))
        notes.update(hnotes)
        notes["hard_boxes"] = [[bundled.NATURAL_IMAGES[k], *map(int, rest)] for k, *rest in hboxes]
    return b.build(notes)


def _views(images: np.ndarray, per_image: int, backgrounds: np.ndarray, rng, jitter: Jitter) -> np.ndarray:
    if not (per_image and len(images)):
        return backgrounds[:0]
    return viewjitter.views(images, per_image, backgrounds, rng, jitter)


def distractor_half(n: int, heldout: bool) -> np.ndarray:
    """Indices of the fixed half of ``n`` bundled distractors that test A uses: distractor ``i``
    is matched to held-out face ``i % 50``, so each face's distractors are split evenly."""
    groups = np.arange(n) % (bundled.N_FACES // 2)
    first = stratified_halves(groups, DISTRACTOR_SPLIT_SEED)
    return np.flatnonzero(first if heldout else ~first)


def test_a(category: Category, pos_ids, neg_ids, size: tuple[int, int], channels: int, *, heldout: bool) -> Labelled:
    """Test A (``GROUPS_A``): the aligned images of ``pos_ids`` as they are, the negative
    photos ``neg_ids``, and distractors: the category's own (the faces' bundled 200, halved:
    the held-out half when ``heldout``) or ``N_DISTRACTORS_A`` natural crops of the held-out
    (or training) columns matched to the positives' brightness and contrast."""
    size, split, pid, nid, pos, neg = _side(category, pos_ids, neg_ids, size, channels, heldout)
    b = _Builder(GROUPS_A, size, channels)
    b.add(0, pos, 1, np.arange(len(pid)), pid)
    b.add(1, neg, 0, np.arange(len(nid)), nid)
    if category.distractors is not None:
        half = distractor_half(len(category.distractors), heldout)
        xd = _fit(category.distractors[half], size, channels)
        notes = {"split": split, "distractors": f"the category's own, {'held-out' if heldout else 'selection'} half"}
    else:
        rng = np.random.default_rng([DISTRACTOR_SEED, int(heldout)])
        xd, boxes = negs.natural_crops(split, N_DISTRACTORS_A, size, channels, rng, _stats(pos) if len(pos) else None)
        notes = {"split": split, "distractors": f"natural crops of the {split} columns", "boxes": boxes.tolist()}
    b.add(2, xd, 0, np.arange(len(xd)), np.full(len(xd), -1))
    return b.build(notes)
