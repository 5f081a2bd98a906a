"""The bundled default dataset: built from images inside scikit-image's wheel.

Nothing is downloaded: every image below ships in the ``skimage/data``
folder of the scikit-image wheel (only the ``skimage.data`` functions that
need no pooch download are used).

Sources
  Natural images (18): astronaut 512x512 RGB, camera 512x512, coffee 400x600
  RGB, chelsea 300x451 RGB, rocket 427x640 RGB, coins 303x384, moon 512x512,
  page 191x384, text 172x448, immunohistochemistry 512x512 RGB,
  hubble_deep_field 872x1000 RGB, brick 512x512, grass 512x512, gravel
  512x512, clock 300x400, retina 1411x1411 RGB, cell 660x550, and the left
  view of stereo_motorcycle 500x741 RGB. Synthetic pictures (horse
  silhouette, logo, colorwheel, checkerboard, blobs, phantom) are left out.
  LFW subset: ``skimage.data.lfw_subset()``, 200 grey 25x25 images; the
  first 100 are faces, the last 100 non-faces.

Fixed held-out split (never seen by ``train``)
  - LFW: images at odd positions are held out: 50 faces (1, 3, ..., 99) and
    50 non-faces (101, 103, ..., 199); the even positions go to training.
  - Natural images: the rightmost quarter of every image's columns is
    held out; training patches come from the left three quarters, so no
    training patch shares a pixel with a held-out one.

Splits (at the default 32x32 example size; any ``size`` works)
  train             2100 unlabeled: 2000 natural-image patches + 50 faces +
                    50 non-faces (faces are about 2.4% of it).
  heldout_faces     50, label 1.
  heldout_nonfaces  50, label 0.
  heldout_natural   500 unlabeled natural-image patches from held-out columns.
  distractors       200, label 0: textured patches from held-out columns of
                    every natural image but astronaut (it shows a face), each
                    shifted and scaled so that its mean and standard deviation
                    equal those of held-out face ``i % 50`` (within 0.01 after
                    clipping to [0, 1]): the distractors' brightness and
                    contrast are distributed as the faces' are.
  heldout           300 labelled: heldout_faces + heldout_nonfaces + distractors.

Face frames (``build(face_frames=k)``, off by default; ``downpour eval faces
--face-frames k``): ``train`` gets k jittered views of each of its 50 training faces
appended (``face_frames``: shifts up to 2 pixels, scales within about 10%,
rotations up to 10 degrees, mirrored half the time, from a fixed seed), the
way a video shows one face in many frames. With k=20 train holds 3100
examples, 1050 of them faces (34%). Only training faces are jittered: no
held-out image is touched.

Patches are cut at native resolution, at positions drawn from a fixed seed
(``SAMPLING_SEED``) so every process builds the same dataset; a region smaller
than the patch is first upscaled to fit. Near-flat patches (std < 0.02 on the
[0, 1] scale: sky, page margins, black borders) are redrawn: they carry no
texture and would collide between splits. LFW images are resized to the example
size. Grey sources are replicated for ``channels=3``; colour ones turn to luma
for ``channels=1``. Patches are cut on demand, so large sizes cost little memory.

    from downpour.feeder.datasets import open_dataset
    train = open_dataset("default", {"size": 32})
    faces = open_dataset("default:heldout_faces", {"size": 32})
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from . import preprocess
from .base import ArrayDataset, ConcatDataset, Dataset
from .preprocess import PreprocessSpec

NATURAL_IMAGES = (
    "astronaut",
    "camera",
    "coffee",
    "chelsea",
    "rocket",
    "coins",
    "moon",
    "page",
    "text",
    "immunohistochemistry",
    "hubble_deep_field",
    "brick",
    "grass",
    "gravel",
    "clock",
    "retina",
    "cell",
    "motorcycle",
)
WITH_FACES = ("astronaut",)
DEFAULT_SIZE = (32, 32)
HELDOUT_FRACTION = 0.25
N_TRAIN_PATCHES = 2000
N_HELDOUT_PATCHES = 500
N_DISTRACTORS = 200
MIN_PATCH_STD = 0.02
MIN_DISTRACTOR_STD = 0.05  # low-contrast sources would need large gains and then clip
MATCH_TOL = 0.01
SAMPLING_SEED = 2012
N_FACES = 100  # lfw_subset: [0, 100) faces, [100, 200) non-faces
FRAME_SEED = 25  # draws the jitter of the face frames (``build(face_frames=...)``)
FRAME_SHIFT = 2.0  # pixels, at the LFW images' 25x25
FRAME_LOG_SCALE = 0.1  # scale factor in exp(+-0.1): about +-10%
FRAME_ROTATION = 10.0  # degrees
SPLITS = ("train", "heldout_faces", "heldout_nonfaces", "heldout_natural", "distractors", "heldout")


@functools.lru_cache(maxsize=2)
def natural_images(channels: int) -> tuple[np.ndarray, ...]:
    """The natural images as float32 (C, H, W) in [0, 1], in ``NATURAL_IMAGES`` order."""
    from skimage import data  # noqa: PLC0415 - scikit-image takes ~0.4 s to load, paid only when the bundled data is built

    out = []
    for name in NATURAL_IMAGES:
        img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
        out.append(preprocess.convert_channels(preprocess.to_chw(img), channels))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def lfw() -> np.ndarray:
    """``skimage.data.lfw_subset()`` as float32 (200, 1, 25, 25)."""
    from skimage import data  # noqa: PLC0415 - scikit-image takes ~0.4 s to load, paid only when the bundled data is built

    return data.lfw_subset().astype(np.float32)[:, None]


def face_frames(images: np.ndarray, per_image: int, seed: int = FRAME_SEED) -> np.ndarray:
    """``per_image`` jittered views of each (1, H, W) image: what a video shows of one face.

    Each view is shifted by up to ``FRAME_SHIFT`` pixels, scaled by up to about
    ``FRAME_LOG_SCALE``, rotated by up to ``FRAME_ROTATION`` degrees about the
    centre (edges repeated) and mirrored with probability 1/2. The views of
    image ``i`` are rows ``i * per_image`` to ``(i + 1) * per_image - 1``.
    """
    rng = np.random.default_rng(seed)
    n, c, h, w = images.shape
    out = np.empty((n * per_image, c, h, w), np.float32)
    for i in range(n):
        for j in range(per_image):
            # the draws' order (scale, rotation, shift, mirror) fixes the frames a seed gives
            t = preprocess.similarity(
                (h, w),
                np.exp(rng.uniform(-FRAME_LOG_SCALE, FRAME_LOG_SCALE)),
                rng.uniform(-FRAME_ROTATION, FRAME_ROTATION),
                rng.uniform(-FRAME_SHIFT, FRAME_SHIFT, 2),
            )
            mirror = rng.random() < 0.5
            for k in range(c):
                v = preprocess.warp(images[i, k], t, mode="edge")
                out[i * per_image + j, k] = v[:, ::-1] if mirror else v
    return out


def _region(img: np.ndarray, split: str, size: tuple[int, int]) -> np.ndarray:
    w = img.shape[2]
    cut = int(round(w * (1 - HELDOUT_FRACTION)))
    reg = img[:, :, :cut] if split == "train" else img[:, :, cut:]
    scale = max(size[0] / reg.shape[1], size[1] / reg.shape[2], 1.0)
    if scale > 1.0:  # too small for one patch: upscale rather than drop the image
        hw = (int(np.ceil(reg.shape[1] * scale)), int(np.ceil(reg.shape[2] * scale)))
        reg = preprocess.resize(np.ascontiguousarray(reg), hw)
    return reg


class PatchDataset(Dataset):
    """Patches cut on demand from a few large images, optionally gain/bias adjusted."""

    def __init__(
        self,
        regions: list[np.ndarray],
        positions: np.ndarray,
        size: tuple[int, int],
        spec: PreprocessSpec,
        labels: np.ndarray | None = None,
        gain: np.ndarray | None = None,
        bias: np.ndarray | None = None,
    ):
        super().__init__(spec)
        self.regions, self.positions, self.size = regions, positions, size
        self.labels = labels
        self._num_classes = 2 if labels is not None else None
        self.gain, self.bias = gain, bias

    def __len__(self) -> int:
        return len(self.positions)

    def _raw(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.size
        out = np.stack([self.regions[r][:, t : t + h, l : l + w] for r, t, l in self.positions[indices]])
        if self.gain is not None and self.bias is not None:
            out = out * self.gain[indices, None, None, None] + self.bias[indices, None, None, None]
            np.clip(out, 0.0, 1.0, out=out)  # stay a valid image, like every other split
        return out.astype(np.float32), indices

    def _source_shape(self) -> tuple[int, int]:
        return self.size


def _sample(
    regions: list[np.ndarray],
    allowed: list[int],
    n: int,
    size: tuple[int, int],
    rng: np.random.Generator,
    min_std: float = MIN_PATCH_STD,
) -> np.ndarray:
    h, w = size
    pos: dict[tuple[int, int, int], None] = {}  # ordered set: a position is never drawn twice
    while len(pos) < n:
        r = allowed[rng.integers(len(allowed))]
        reg = regions[r]
        t = int(rng.integers(reg.shape[1] - h + 1))
        l = int(rng.integers(reg.shape[2] - w + 1))
        if (r, t, l) not in pos and reg[:, t : t + h, l : l + w].std() >= min_std:
            pos[(r, t, l)] = None
    return np.array(list(pos), dtype=np.int64).reshape(-1, 3)


def _matched(
    regions: list[np.ndarray],
    allowed: list[int],
    means: np.ndarray,
    stds: np.ndarray,
    n: int,
    size: tuple[int, int],
    rng: np.random.Generator,
):
    """Positions, gains and biases of ``n`` patches whose mean/std match target ``i % len(means)``.

    A candidate is kept only if its matched, [0, 1]-clipped version is within
    ``MATCH_TOL`` of the target's mean and std: heavy-tailed patches (a star
    on black sky) would need clipping that breaks the match.
    """
    pos, gains, biases = [], [], []
    for i in range(n):
        m, sd = means[i % len(means)], stds[i % len(stds)]
        for _ in range(10_000):  # bounded: if nothing matches, the last candidate is kept
            ((r, t, l),) = _sample(regions, allowed, 1, size, rng, MIN_DISTRACTOR_STD)
            if (r, t, l) in pos:
                continue
            p = regions[r][:, t : t + size[0], l : l + size[1]]
            g = sd / p.std()
            b = m - p.mean() * g
            q = np.clip(p * g + b, 0.0, 1.0)
            if abs(q.mean() - m) <= MATCH_TOL and abs(q.std() - sd) <= MATCH_TOL:
                break
        pos.append((r, t, l))
        gains.append(g)
        biases.append(b)
    return (np.array(pos, np.int64).reshape(-1, 3), np.array(gains, np.float32), np.array(biases, np.float32))


@dataclass
class BundledSplits:
    """Every split of the default dataset (see the module docstring)."""

    train: Dataset
    heldout_faces: Dataset
    heldout_nonfaces: Dataset
    heldout_natural: Dataset
    distractors: Dataset
    heldout: Dataset

    def split(self, name: str) -> Dataset:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r} of the default dataset; allowed: {SPLITS}")
        return getattr(self, name)


def build(
    spec: PreprocessSpec | None = None,
    *,
    n_train_patches: int = N_TRAIN_PATCHES,
    n_heldout_patches: int = N_HELDOUT_PATCHES,
    n_distractors: int = N_DISTRACTORS,
    seed: int = SAMPLING_SEED,
    face_frames: int = 0,
) -> BundledSplits:
    """Build all splits; examples are ``spec.size`` (default 32x32) with ``spec.channels``.

    ``face_frames`` > 0 appends that many jittered views (``face_frames()``) of
    each of the 50 training faces to ``train``, after its 2100 examples.
    """
    spec = spec or PreprocessSpec()
    size = spec.size if spec.size is not None else DEFAULT_SIZE
    if spec.size is None:
        spec = dataclasses.replace(spec, size=size)
    c = spec.channels
    rng = np.random.default_rng(seed)
    images = natural_images(c)
    train_regions = [_region(im, "train", size) for im in images]
    held_regions = [_region(im, "heldout", size) for im in images]
    every = list(range(len(images)))
    face_free = [i for i, n in enumerate(NATURAL_IMAGES) if n not in WITH_FACES]

    faces = lfw()
    odd = np.arange(len(faces)) % 2 == 1
    is_face = np.arange(len(faces)) < N_FACES
    train_lfw = ArrayDataset(faces[~odd], None, spec, name="lfw_subset[train]")
    hf = faces[odd & is_face]
    heldout_faces = ArrayDataset(hf, np.ones(len(hf), np.int64), spec, name="lfw_subset[heldout faces]", num_classes=2)
    hn = faces[odd & ~is_face]
    heldout_nonfaces = ArrayDataset(
        hn, np.zeros(len(hn), np.int64), spec, name="lfw_subset[heldout non-faces]", num_classes=2
    )

    train_patches = PatchDataset(train_regions, _sample(train_regions, every, n_train_patches, size, rng), size, spec)
    heldout_natural = PatchDataset(held_regions, _sample(held_regions, every, n_heldout_patches, size, rng), size, spec)

    # match each distractor's mean/std to one held-out face, at the example size and channels
    face_imgs = np.stack([preprocess.resize(preprocess.convert_channels(f, c), size) for f in hf])
    f_mean = face_imgs.reshape(len(hf), -1).mean(1)
    f_std = face_imgs.reshape(len(hf), -1).std(1)
    dpos, gain, bias = _matched(held_regions, face_free, f_mean, f_std, n_distractors, size, rng)
    distractors = PatchDataset(
        held_regions, dpos, size, spec, labels=np.zeros(len(dpos), np.int64), gain=gain, bias=bias
    )

    parts = [train_patches, train_lfw]
    if face_frames > 0:
        parts.append(ArrayDataset(bundled_frames(face_frames), None, spec, name="lfw_subset[train face frames]"))
    train = ConcatDataset(parts, spec)
    heldout = ConcatDataset([heldout_faces, heldout_nonfaces, distractors], spec)
    heldout._num_classes = 2
    return BundledSplits(train, heldout_faces, heldout_nonfaces, heldout_natural, distractors, heldout)


@functools.lru_cache(maxsize=2)
def bundled_frames(per_image: int) -> np.ndarray:
    """The jittered views of the training faces (even LFW positions below ``N_FACES``)."""
    return face_frames(lfw()[0:N_FACES:2], per_image)


def open_split(split: str, spec: PreprocessSpec | None = None) -> Dataset:
    """One split of the default dataset (``open_dataset("default:<split>")``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of the default dataset; allowed: {SPLITS}")
    return build(spec).split(split)
