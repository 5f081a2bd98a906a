"""The pool's frames of ``downpour eval faces``, ZCA whitening, and a user's own
test folder (read, like any folder of images, by ``read_folder``); the folds,
their pools and tests are ``faceviews``'.

The pool (``video_pool``) is built the way a video shows faces: one face
appears in many frames, shifted, scaled, turned and lit differently, over
whatever scene surrounds it. Every frame is ``size`` (32x32 by default):

- natural-image crops: the bundled train split's 2,000 patches (left three
  quarters of each natural image, never its held-out columns);
- face frames: ``per_face`` views of each of the 50 *training* LFW faces
  (even positions of ``lfw_subset``), each resized to the frame, contrast
  and brightness changed, scaled by up to about +-20%, rotated by up to 12
  degrees, shifted by up to 3 pixels and mirrored half the time, with a
  random natural-image crop from the training columns showing wherever the
  moved face no longer covers the frame;
- background frames: ``per_nonface`` views, made the same way, of each of
  the 50 training LFW non-faces (the scenery of the same photographs).

The views are drawn by ``viewjitter.views`` with this module's constants
(``faceviews`` draws its folds' pools with a wider jitter); ``positives=`` and
``negatives=`` replace the training faces and non-faces with other images.
``faces=False`` gives the no-faces control: the same pool less every face
frame. No held-out image (odd LFW positions, held-out columns) and no view of
one is ever used: the pool is built from ``bundled.build``'s train split only.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from downpour.evals.viewjitter import Jitter, views
from downpour.feeder import bundled, preprocess
from downpour.feeder.datasets import IMAGE_EXTENSIONS
from downpour.feeder.preprocess import PreprocessSpec

POOL_SEED = 314  # draws the frames' jitter and backgrounds
MAX_SHIFT = 3.0 / 32  # of the frame's side
LOG_SCALE = 0.2  # scale factor within exp(+-0.2)
MAX_ROTATION = 12.0  # degrees
LOG_CONTRAST = 0.4  # face contrast within exp(+-0.4)
MAX_BRIGHTNESS = 0.1  # added to the face, on the [0, 1] scale
FACE_DIRS = ("faces",)
OTHER_DIRS = ("other",)


@dataclass
class Pool:
    """Unlabeled training frames, raw ([0, 1]) float32 (N, C, H, W), and which show a face."""

    x: np.ndarray
    has_face: np.ndarray  # bool (N,); never given to training, only reported
    source: np.ndarray  # int (N,): 0 natural crop, 1 face frame, 2 background frame

    @property
    def face_fraction(self) -> float:
        return float(self.has_face.mean())


def today_jitter() -> Jitter:
    """The pool's jitter from this module's constants, read at each call (tests switch them off)."""
    return Jitter(
        log_scale=(-LOG_SCALE, LOG_SCALE),
        max_rotation=MAX_ROTATION,
        shift_slack=0.0,
        shift_frac=MAX_SHIFT,
        shift_px=0.0,
        log_contrast=LOG_CONTRAST,
        max_brightness=MAX_BRIGHTNESS,
    )


@functools.lru_cache(maxsize=2)
def _splits(size: tuple[int, int], channels: int) -> bundled.BundledSplits:
    """The bundled splits, raw pixels (built once per size: the distractors take a while to match)."""
    return bundled.build(PreprocessSpec(channels=channels, size=size, normalize="none"))


def video_pool(
    size: tuple[int, int] = (32, 32),
    channels: int = 1,
    *,
    per_face: int = 30,
    per_nonface: int = 10,
    faces: bool = True,
    seed: int = POOL_SEED,
    positives: np.ndarray | None = None,
    negatives: np.ndarray | None = None,
    jitter: Jitter | None = None,
) -> Pool:
    """The unlabeled training pool (module docstring); raw pixels in [0, 1].

    ``positives`` and ``negatives`` are the raw training images (N, C, h, w)
    whose views are the object and background frames; by default the 50
    training LFW faces and non-faces (even positions). ``jitter`` defaults to
    this module's constants.
    """
    train = _splits(tuple(size), channels).train
    n_nat = bundled.N_TRAIN_PATCHES
    natural, _ = train.get(np.arange(n_nat))
    lfw = bundled.lfw()
    if positives is None:
        positives = lfw[0 : bundled.N_FACES : 2]  # even positions only
    if negatives is None:
        negatives = lfw[bundled.N_FACES :: 2]
    pos = preprocess.convert_channels(np.asarray(positives, np.float32), channels)
    neg = preprocess.convert_channels(np.asarray(negatives, np.float32), channels)
    jit = jitter or today_jitter()
    rng = np.random.default_rng(seed)
    parts, src = [natural], [np.zeros(n_nat, np.int64)]
    # both kinds of frames are drawn whatever ``faces`` is, so the control's
    # background frames are the very frames of the full pool
    fr = views(pos, per_face, natural, rng, jit) if per_face else natural[:0]
    bg = views(neg, per_nonface, natural, rng, jit) if per_nonface and len(neg) else natural[:0]
    if faces:
        parts.append(fr)
        src.append(np.ones(len(fr), np.int64))
    parts.append(bg)
    src.append(np.full(len(bg), 2, np.int64))
    source = np.concatenate(src)
    return Pool(np.concatenate(parts).astype(np.float32), source == 1, source)


def load_test_dir(path: str, size: tuple[int, int], channels: int = 1):
    """A user's test folder with ``faces/`` and ``other/`` sub-folders: (x raw, y, names).

    Any image Pillow reads, any size (``read_folder``). Unreadable files are an
    error naming the file; so are a missing or empty sub-folder.
    """
    if not os.path.isdir(path):
        raise ValueError(f"--test {path}: not a directory")
    x, y, names = [], [], []
    for label, dirs in ((1, FACE_DIRS), (0, OTHER_DIRS)):
        d = os.path.join(path, dirs[0])
        if not os.path.isdir(d):
            raise ValueError(f"--test {path}: needs sub-folders faces/ and other/; {dirs[0]}/ is missing")
        xs, files = read_folder(d, size, channels, what=f"--test {path}:", shown=f"{dirs[0]}/")
        x.append(xs)
        y += [label] * len(xs)
        names += files
    return np.concatenate(x), np.array(y, np.int64), names


def read_folder(
    folder: str, size: tuple[int, int], channels: int = 1, *, what: str = "", shown: str = ""
) -> tuple[np.ndarray, list[str]]:
    """Every image in one folder, sorted by name: (x raw float32 (N, C, H, W) in [0, 1], names).

    Any image Pillow reads, any size: each is fitted to ``size`` (scaled to
    cover it, the centre kept: ``preprocess.fit``). Errors start with ``what``
    and name the folder as ``shown`` (default: its path with a trailing
    slash): a missing folder, one without images, a file that is no image.
    Names are ``shown`` + the file name.
    """
    from PIL import Image  # noqa: PLC0415 - only a user's folders need Pillow here

    shown = shown or folder.rstrip("/") + "/"
    lead = f"{what} " if what else ""
    if not os.path.isdir(folder):
        raise ValueError(f"{lead}{shown} is not a folder (no such directory)")
    files = sorted(f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)) and not f.startswith("."))
    if not files:
        raise ValueError(f"{lead}{shown} holds no images (any format Pillow reads: {', '.join(IMAGE_EXTENSIONS)}, ...)")
    x = []
    for f in files:
        try:
            with Image.open(os.path.join(folder, f)) as im:
                img = im.convert("RGB") if im.mode not in ("L", "F", "I", "I;16") else im
                a = preprocess.to_chw(np.asarray(img))
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
            raise ValueError(f"{lead}cannot read {shown}{f} as an image ({type(e).__name__}: {e})") from None
        if a.max() > 1.0:  # 32-bit integer grey ("I") arrives unscaled
            a = a / a.max()
        x.append(preprocess.fit(preprocess.convert_channels(a, channels), size))
    return np.stack(x).astype(np.float32), [f"{shown}{f}" for f in files]


class ZCA:
    """ZCA whitening fitted on the training pool: x -> (x - mean) U diag(1/sqrt(s + eps)) U^T.

    ``eps`` is relative to the mean eigenvalue, so it means the same at every
    input size; it keeps the noise directions from being blown up.
    """

    def __init__(self, x: np.ndarray, eps: float = 0.1):
        flat = np.asarray(x, np.float64).reshape(len(x), -1)
        self.mean = flat.mean(axis=0)
        cov = np.cov(flat - self.mean, rowvar=False)
        s, u = np.linalg.eigh(cov)
        s = np.maximum(s, 0.0)
        self.eps = eps
        self.matrix = (u * (1.0 / np.sqrt(s + eps * s.mean()))) @ u.T

    def __call__(self, x: np.ndarray) -> np.ndarray:
        flat = np.asarray(x, np.float64).reshape(len(x), -1)
        return ((flat - self.mean) @ self.matrix).astype(np.float32).reshape(x.shape)
