"""The harder negatives of the faces experiment's tests: natural crops matched to the object's
brightness and contrast, phase-scrambled objects, and crops a face detector fires on.

Every crop comes from one side of the bundled natural images' fixed cut:
``"train"`` (the left three quarters of each image's columns) or
``"heldout"`` (the right quarter), exactly as ``feeder.bundled`` cuts them,
so a selection set and a test set never share a column region.

No crop shows a real face: images in ``bundled.WITH_FACES`` (the astronaut
portrait) are left out, as bundled leaves them out of its distractors, and so
is every crop that overlaps a face box of ``FACE_BOXES`` (the cameraman of
``camera``, whose face the cascade finds in the training columns).

Hard negatives: scikit-image's LBP frontal-face cascade
(``lbpcascade_frontalface_opencv.xml``) is run over every face-free image's
columns at every window from 24 to 256 pixels (scale factor 1.2, exhaustive
step, a single detection enough: ``CASCADE``); each hit, squared and
enlarged by ``HARD_MARGIN``, is cut out and resized to the frame; near-flat
cuts are dropped, as bundled drops near-flat patches. When one side's hits
are too few, the mirrored images are scanned as well (hits that repeat an
unmirrored one are dropped). The scans are cached per process; on the
held-out columns they find fewer hits than test B asks for by default, and
test B then takes what there is and says so in its notes.
"""

from __future__ import annotations

import functools

import numpy as np

from downpour.feeder import bundled, preprocess

SPLITS = ("train", "heldout")
# real faces in images bundled does not mark WITH_FACES: (row0, col0, row1, col1), full-image pixels
FACE_BOXES = {"camera": (60, 150, 210, 290)}
NATURAL_ZOOM = 3.0  # natural crops are cut at 1 to 3 frame sides (log-uniform) and resized to the frame
MATCH_TRIES = 300  # candidates tried per matched crop before the last one is kept (as bundled's _matched)
# the detector's settings: permissive (one detection is enough) so the held-out columns give ~200 hits
CASCADE = {
    "scale_factor": 1.2,
    "step_ratio": 1.0,
    "min_size": (24, 24),
    "max_size": (256, 256),
    "min_neighbor_number": 1,
    "intersection_score_threshold": 0.5,
}
HARD_MARGIN = 1.25  # a hit's box is squared and enlarged by this factor about its centre
DEDUP_IOU = 0.3  # a mirrored scan's hit overlapping an unmirrored one this much is the same hit


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def columns(width: int, split: str) -> tuple[int, int]:
    """The column range [c0, c1) of an image ``width`` wide that ``split`` may use (bundled's cut)."""
    _check_split(split)
    cut = int(round(width * (1 - bundled.HELDOUT_FRACTION)))
    return (0, cut) if split == "train" else (cut, width)


def face_free() -> list[int]:
    """Indices into ``bundled.NATURAL_IMAGES`` of the images crops may come from."""
    return [i for i, n in enumerate(bundled.NATURAL_IMAGES) if n not in bundled.WITH_FACES]


def shows_face(image: int, r0: int, c0: int, r1: int, c1: int) -> bool:
    """Whether the box [r0, r1) x [c0, c1) of natural image ``image`` overlaps a real face."""
    name = bundled.NATURAL_IMAGES[image]
    if name in bundled.WITH_FACES:
        return True
    box = FACE_BOXES.get(name)
    return box is not None and r0 < box[2] and box[0] < r1 and c0 < box[3] and box[1] < c1


def natural_crops(
    split: str,
    n: int,
    size: tuple[int, int],
    channels: int,
    rng: np.random.Generator,
    targets: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` crops of the face-free natural images' ``split`` columns, at random positions and
    scales (1 to ``NATURAL_ZOOM`` frame sides), resized to ``size``: (x (n, C, H, W), boxes
    (n, 5): image, row0, col0, row1, col1 in full-image pixels).

    ``targets`` (m, 2) of (mean, std): crop ``i`` is then shifted and scaled to
    ``targets[i % m]`` and kept only if, clipped to [0, 1], it is within
    ``bundled.MATCH_TOL`` of both (as bundled matches its distractors).
    """
    images = bundled.natural_images(channels)
    allowed = face_free()
    H, W = size
    min_std = bundled.MIN_PATCH_STD if targets is None else bundled.MIN_DISTRACTOR_STD
    x = np.empty((n, channels, H, W), np.float32)
    boxes = np.empty((n, 5), np.int64)
    for i in range(n):
        for _ in range(MATCH_TRIES):
            k = allowed[rng.integers(len(allowed))]
            img = images[k]
            c0, c1 = columns(img.shape[2], split)
            rh, rw = img.shape[1], c1 - c0
            z = min(np.exp(rng.uniform(0.0, np.log(NATURAL_ZOOM))), rh / H, rw / W)
            h, w = max(1, int(round(H * z))), max(1, int(round(W * z)))
            t = int(rng.integers(rh - h + 1))
            l = c0 + int(rng.integers(rw - w + 1))
            if shows_face(k, t, l, t + h, l + w):
                continue
            p = preprocess.resize(np.ascontiguousarray(img[:, t : t + h, l : l + w]), (H, W))
            if p.std() < min_std:
                continue  # flat (sky, margins): no texture to tell apart
            if targets is not None:
                m, sd = targets[i % len(targets)]
                g = sd / p.std()
                p = np.clip(p * g + (m - p.mean() * g), 0.0, 1.0)
                if abs(p.mean() - m) > bundled.MATCH_TOL or abs(p.std() - sd) > bundled.MATCH_TOL:
                    continue
            break
        x[i], boxes[i] = p, (k, t, l, t + h, l + w)
    return x, boxes


def phase_scramble(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (C, H, W) image with its Fourier amplitudes kept and the phases of white noise's
    spectrum put in: (the scrambled image matched to ``x``'s mean and std per channel and
    clipped to [0, 1], the scrambled image before that).

    White noise's spectrum is Hermitian, and so is the amplitude spectrum of a
    real image, so the inverse transform is real: the raw image has exactly
    ``x``'s amplitude spectrum. One noise phase serves every channel, which
    keeps the colours' correlation.
    """
    phase = np.angle(np.fft.fft2(rng.standard_normal(x.shape[1:])))
    amp = np.abs(np.fft.fft2(x.astype(np.float64), axes=(-2, -1)))
    raw = np.real(np.fft.ifft2(amp * np.exp(1j * phase), axes=(-2, -1)))
    out = np.empty_like(raw)
    for k in range(len(x)):
        sd = raw[k].std()
        z = (raw[k] - raw[k].mean()) / sd if sd > 0 else raw[k] * 0.0
        out[k] = x[k].mean() + z * x[k].std()
    return np.clip(out, 0.0, 1.0).astype(np.float32), raw


@functools.lru_cache(maxsize=1)
def _cascade():
    from skimage import data  # noqa: PLC0415 - heavy (~0.4 s), loaded only when hard negatives are asked for
    from skimage.feature import Cascade  # noqa: PLC0415 - heavy, loaded only when hard negatives are asked for

    return Cascade(data.lbp_frontal_face_cascade_filename())


@functools.lru_cache(maxsize=4)
def cascade_hits(split: str, mirrored: bool = False) -> tuple[np.ndarray, dict]:
    """The cascade's hits on the face-free images' ``split`` columns (grey), scanned as they
    are or mirrored: (int64 (K, 5): image, row, col, side, mirrored, in the unmirrored
    image's full-size pixels; counts of the detections and of those dropped).

    A hit is dropped when its cut (``crop_box``) overlaps a real face
    (``shows_face``), or is near-flat (grey std below ``bundled.MIN_PATCH_STD``,
    the rule bundled's natural crops follow: the cascade, which compares sums
    of pixels, fires on faint textures no frame would show).
    """
    _check_split(split)
    cascade = _cascade()
    grey = bundled.natural_images(1)
    out, counts = [], {"detections": 0, "on_faces": 0, "flat": 0}
    for k in face_free():
        c0, c1 = columns(grey[k].shape[2], split)
        region = grey[k][0, :, c0:c1]
        region = np.ascontiguousarray(region[:, ::-1] if mirrored else region)
        for d in cascade.detect_multi_scale(region, **CASCADE):
            counts["detections"] += 1
            r, c, side = int(d["r"]), int(d["c"]), int(max(d["width"], d["height"]))
            hit = (k, r, c0 + ((c1 - c0) - c - side if mirrored else c), side, int(mirrored))
            top, left, big = crop_box(np.array(hit), region.shape[0], c0, c1)
            if shows_face(k, top, left, top + big, left + big):  # the cut, not just the hit
                counts["on_faces"] += 1
            elif grey[k][0, top : top + big, left : left + big].std() < bundled.MIN_PATCH_STD:
                counts["flat"] += 1
            else:
                out.append(hit)
    return np.array(out, np.int64).reshape(-1, 5), counts


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (row, col, side) squares."""
    ih = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iw = max(0, min(a[1] + a[2], b[1] + b[2]) - max(a[1], b[1]))
    inter = ih * iw
    return inter / float(a[2] ** 2 + b[2] ** 2 - inter)


def hard_hits(split: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Up to ``n`` cascade hits of ``split`` (rows of ``cascade_hits``), in scan order, and notes
    of how many there were (``hard_scan``: each scan's detections, drops and kept hits). The mirrored scan is added only when the plain one has fewer than
    ``n``; more than ``n`` are subsampled with ``rng``."""
    hits, counts = cascade_hits(split, False)
    notes: dict = {"hard_scan": {"plain": dict(counts, kept=len(hits))}}
    if len(hits) < n:
        mirrored, counts = cascade_hits(split, True)
        extra = [m for m in mirrored if not any(h[0] == m[0] and _iou(h[1:4], m[1:4]) > DEDUP_IOU for h in hits)]
        notes["hard_scan"]["mirrored"] = dict(counts, kept=len(mirrored), new=len(extra))
        hits = np.concatenate([hits, np.array(extra, np.int64).reshape(-1, 5)])
    notes["hard_hits"] = len(hits)
    if len(hits) > n:
        hits = hits[np.sort(rng.choice(len(hits), n, replace=False))]
    elif len(hits) < n:
        notes["hard_short"] = f"{len(hits)} cascade hits in the {split} columns, fewer than the {n} asked for"
    return hits, notes


def crop_box(hit: np.ndarray, height: int, c0: int, c1: int) -> tuple[int, int, int]:
    """The square (row, col, side) cut for one hit: enlarged by ``HARD_MARGIN`` about its centre
    and moved (or shrunk) to lie within rows [0, height) and columns [c0, c1)."""
    _, r, c, side, _ = (int(v) for v in hit)
    big = min(int(round(side * HARD_MARGIN)), height, c1 - c0)
    top = int(np.clip(r + side / 2 - big / 2, 0, height - big))
    left = int(np.clip(c + side / 2 - big / 2, c0, c1 - big))
    return top, left, big


def hard_negatives(
    split: str, n: int, size: tuple[int, int], channels: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Crops the face cascade fires on: (x (K, C, H, W), boxes (K, 8), notes); K = min(n, hits).

    A box row is the hit (image, row, col, side, mirrored: ``cascade_hits``)
    then the square cut for it (row, col, side: ``crop_box``), in full-image
    pixels; a mirrored hit's cut is mirrored, as the scan saw it.
    """
    hits, notes = hard_hits(split, n, rng)
    images = bundled.natural_images(channels)
    x = np.empty((len(hits), channels, *size), np.float32)
    boxes = np.empty((len(hits), 8), np.int64)
    for i, hit in enumerate(hits):
        img = images[hit[0]]
        c0, c1 = columns(img.shape[2], split)
        top, left, big = crop_box(hit, img.shape[1], c0, c1)
        p = img[:, top : top + big, left : left + big]
        p = p[:, :, ::-1] if hit[4] else p
        x[i] = preprocess.resize(np.ascontiguousarray(p), size)
        boxes[i] = (*hit, top, left, big)
    return x, boxes, notes
