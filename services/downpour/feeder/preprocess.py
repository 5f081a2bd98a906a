"""Preprocessing of raw images into float32 NCHW batches, driven by a spec.

A ``PreprocessSpec`` says what every example should look like:

- ``channels``: 1 (grey, ITU-R 601 luma of RGB) or 3 (RGB; grey is replicated).
- ``size``: (H, W) every image is resized to, or None to keep the source size.
  Resizing uses Pillow's bilinear filter on float ("F" mode) images, one
  channel at a time. Pillow widens the filter when shrinking, so downscaling
  is anti-aliased; no 8-bit rounding happens.
- ``crop``: (H, W) of a crop taken after resizing, or None. Crops are random
  (a seeded ``numpy.random.Generator``) when a generator is given, central
  otherwise, so evaluation can reuse a training spec deterministically.
- ``normalize``: per example, "none", "standardize" (zero mean, unit standard
  deviation over all its pixels and channels) or "minmax" (to [0, 1]).
- ``seed``: seeds the generator that readers use for random crops.

Integer images are scaled to [0, 1] on the way in; float images are kept.

``similarity`` and ``warp`` move an image (scale and rotation about its centre,
then a shift): the jittered views of the bundled face frames and the faces
eval, and the faces eval's invariance curves.

Pure NumPy + Pillow (scikit-image's warp, loaded when first used, for
``warp``); nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from skimage.transform import AffineTransform

NORMALIZE_MODES = ("none", "standardize", "minmax")
CHANNEL_CHOICES = (1, 3)
# Below this a per-example std or range is treated as zero: the example is
# flat and normalising it would only amplify rounding noise.
EPS = 1e-6
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _pair(name: str, value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value), int(value))
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"preprocess.{name} must be an int or a pair (H, W), got {value!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"preprocess.{name} must be positive, got {value!r}")
    return (h, w)


@dataclass(frozen=True)
class PreprocessSpec:
    """What every example looks like after preprocessing (see module docstring)."""

    channels: int = 1
    size: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    normalize: str = "none"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.channels not in CHANNEL_CHOICES:
            raise ValueError(f"preprocess.channels must be one of {CHANNEL_CHOICES}, got {self.channels!r}")
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(f"preprocess.normalize must be one of {NORMALIZE_MODES}, got {self.normalize!r}")
        # frozen dataclass: normalise the fields through object.__setattr__
        object.__setattr__(self, "size", _pair("size", self.size))
        object.__setattr__(self, "crop", _pair("crop", self.crop))
        if self.size and self.crop and (self.crop[0] > self.size[0] or self.crop[1] > self.size[1]):
            raise ValueError(f"preprocess.crop {self.crop} is larger than preprocess.size {self.size}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> PreprocessSpec:
        """Build from a config mapping; unknown keys are rejected by name."""
        d = dict(d or {})
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"unknown preprocess setting(s) {unknown}; allowed: {allowed}")
        return cls(**d)

    @classmethod
    def for_input(cls, input_chw: tuple[int, ...], normalize: str = "standardize") -> PreprocessSpec:
        """What the feeder gives a model whose input is (C, H, W): its channels and size, normalised per example."""
        c, h, w = input_chw
        return cls(channels=c, size=(h, w), normalize=normalize)

    def output_hw(self, source_hw: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of an example whose source (or resized) size is ``source_hw``."""
        hw = self.size or tuple(source_hw)
        if self.crop:
            if self.crop[0] > hw[0] or self.crop[1] > hw[1]:
                raise ValueError(f"preprocess.crop {self.crop} is larger than the images ({hw[0]}, {hw[1]})")
            return self.crop
        return (int(hw[0]), int(hw[1]))


def to_chw(img: np.ndarray) -> np.ndarray:
    """One image (H, W), (H, W, C) or (C, H, W) -> float32 (C, H, W).

    Integer images are scaled to [0, 1]; booleans become 0/1. A 3-d array is
    taken as channels-last (as Pillow and scikit-image give them) when its
    last axis has 1, 3 or 4 entries, else as channels-first.
    """
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3:
        if a.shape[-1] in (1, 3, 4):
            a = np.moveaxis(a, -1, 0)
    else:
        raise ValueError(f"an image must have 2 or 3 dimensions, got shape {a.shape}")
    return _to_float(a)


def _to_float(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if np.issubdtype(a.dtype, np.integer):
        return (a.astype(np.float32) / float(np.iinfo(a.dtype).max)).astype(np.float32)
    return a.astype(np.float32, copy=False)


def convert_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """(C, H, W) or (N, C, H, W) with C in 1, 3, 4 -> the requested channel count."""
    c_axis = x.ndim - 3
    c = x.shape[c_axis]
    if c == 4:  # RGBA: the alpha channel carries no image content
        x = np.take(x, [0, 1, 2], axis=c_axis)
        c = 3
    if c == channels:
        return x
    if c == 3 and channels == 1:
        return np.expand_dims(np.einsum("...chw,c->...hw", x, _LUMA), -3).astype(np.float32)
    if c == 1 and channels == 3:
        return np.repeat(x, 3, axis=c_axis)
    raise ValueError(f"cannot convert {c} channel(s) to {channels}; images must have 1, 3 or 4 channels")


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize one (C, H, W) float32 image to ``size`` (bilinear, anti-aliased)."""
    h, w = size
    if x.shape[1:] == (h, w):
        return x
    out = np.empty((x.shape[0], h, w), dtype=np.float32)
    for c in range(x.shape[0]):
        im = Image.fromarray(np.ascontiguousarray(x[c], dtype=np.float32), mode="F")
        out[c] = np.asarray(im.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    return out


def fit(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One (C, H, W) image of any size -> ``size``, aspect kept: scaled (``resize``) until it
    covers ``size``, then the centre cut out (``crop`` without a generator)."""
    h, w = size
    sh, sw = x.shape[1:]
    if (sh, sw) == (h, w):
        return x
    scale = max(h / sh, w / sw)
    # at least the target on both sides, whatever the rounding
    rh, rw = max(h, int(round(sh * scale))), max(w, int(round(sw * scale)))
    return crop(resize(x, (rh, rw))[None], (h, w))[0]


def crop(batch: np.ndarray, size: tuple[int, int], rng: np.random.Generator | None = None) -> np.ndarray:
    """Crop (N, C, H, W) to ``size``: random offsets per example, or central without ``rng``."""
    n, _, h, w = batch.shape
    ch, cw = size
    if ch > h or cw > w:
        raise ValueError(f"crop {size} is larger than the images ({h}, {w})")
    if (ch, cw) == (h, w):
        return batch
    if rng is None:
        top, left = (h - ch) // 2, (w - cw) // 2
        return batch[:, :, top : top + ch, left : left + cw]
    tops = rng.integers(0, h - ch + 1, size=n)
    lefts = rng.integers(0, w - cw + 1, size=n)
    return np.stack([batch[i, :, t : t + ch, l : l + cw] for i, (t, l) in enumerate(zip(tops, lefts))])


def normalize(batch: np.ndarray, mode: str) -> np.ndarray:
    """Per-example normalisation of (N, ...) (see ``NORMALIZE_MODES``)."""
    if mode == "none":
        return batch
    flat = batch.reshape(batch.shape[0], -1).astype(np.float64)
    if mode == "standardize":
        mean = flat.mean(axis=1, keepdims=True)
        std = flat.std(axis=1, keepdims=True)
        out = (flat - mean) / np.where(std > EPS, std, 1.0)
        out[std[:, 0] <= EPS] = 0.0  # a flat example has no contrast to keep
    elif mode == "minmax":
        lo = flat.min(axis=1, keepdims=True)
        rng = flat.max(axis=1, keepdims=True) - lo
        out = (flat - lo) / np.where(rng > EPS, rng, 1.0)
        out[rng[:, 0] <= EPS] = 0.0
    else:
        raise ValueError(f"preprocess.normalize must be one of {NORMALIZE_MODES}, got {mode!r}")
    return out.astype(np.float32).reshape(batch.shape)


def apply(
    images: np.ndarray | Sequence[np.ndarray],
    spec: PreprocessSpec,
    rng: np.random.Generator | None = None,
    default_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Raw images -> float32 (N, C, H, W) batch as ``spec`` says.

    ``images`` is an (N, C, H, W) array or a sequence of (C, H, W) arrays
    (C in 1, 3, 4; integer types are scaled to [0, 1]). Without
    ``spec.size``, images are brought to ``default_size`` (or to the first
    image's size), so a batch always stacks.
    """
    size = spec.size or default_size
    if isinstance(images, np.ndarray) and images.ndim == 4:
        batch = convert_channels(_to_float(images), spec.channels)
        if size and batch.shape[2:] != tuple(size):
            batch = np.stack([resize(x, size) for x in batch])
    else:
        items = [convert_channels(_to_float(np.asarray(im)), spec.channels) for im in images]
        if not items:
            raise ValueError("cannot preprocess an empty list of images")
        size = size or items[0].shape[1:]
        batch = np.stack([resize(x, size) for x in items])
    if spec.crop:
        batch = crop(batch, spec.crop, rng)
    return np.ascontiguousarray(normalize(batch, spec.normalize), dtype=np.float32)


def similarity(
    size: tuple[int, int], scale: float, degrees: float, shift: Sequence[float] | np.ndarray
) -> AffineTransform:
    """Scale by ``scale`` and rotate by ``degrees`` about the centre of an (H, W) image of
    ``size``, then shift by ``shift`` (x, y) pixels: the transform ``warp`` applies."""
    # scikit-image takes ~0.4 s to load: only the code that moves images pays for it
    from skimage.transform import AffineTransform  # noqa: PLC0415 - heavy (~0.4 s), loaded only when images are moved

    h, w = size
    centre = np.array([(w - 1) / 2, (h - 1) / 2])
    return (
        AffineTransform(translation=-centre)
        + AffineTransform(scale=scale, rotation=np.deg2rad(degrees))
        + AffineTransform(translation=centre + np.asarray(shift))
    )


def warp(x: np.ndarray, t: AffineTransform, mode: str = "edge", cval: float = 0.0) -> np.ndarray:
    """One (H, W) channel moved by ``t`` (bilinear); where it no longer covers the frame,
    ``mode`` fills in (scikit-image's modes: "edge" repeats the border, "constant" puts
    ``cval``)."""
    from skimage.transform import warp as sk_warp  # noqa: PLC0415 - heavy (~0.4 s), loaded only when images are moved

    return sk_warp(x, t.inverse, mode=mode, cval=cval, preserve_range=True)
