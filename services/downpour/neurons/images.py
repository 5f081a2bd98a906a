"""Images as users have them -> the network's input.

A photo of any size and mode (PNG, JPEG, ..., grey, RGB, RGBA, palette,
16-bit, EXIF-rotated) or an array is turned into the model's input the way the
feeder turns training images into it: channels converted (ITU-R 601 luma for
grey, replicated grey for RGB, alpha dropped), then, when the size differs,
scaled with the aspect ratio kept until it covers the input and cut out at the
centre (``preprocess.fit``). With ``resize=False`` a size that is not the
model's is refused instead.

Hostile input is refused before any work is spent on it: an encoded image
whose header claims more than ``MAX_PIXELS`` pixels is not decoded (a
decompression bomb), an array image may not have more either, and the images
of one request may not have more than ``MAX_REQUEST_PIXELS`` together (a
request of many small files that each decode to a large blank image). The
service decodes only ``SERVICE_FORMATS``, at most a few images at once
(``DecodeLimits.gate``), and an image over ``SHRINK_ABOVE`` (1 M) pixels is
reduced on its integer pixels to about 4x the model's input before any float
copy: a 10-megapixel RGBA PNG costs its 40 MB of pixels while it is decoded,
not the ~340 MB of float copies at full size.

    item = from_encoded(data, "encoded_images[0]")        # (C, H, W) float32 in [0, 1]
    items = from_batch(arr_bhwc, "images")                 # uint8 or float in [0, 1]
    x = to_input(items, (1, 16, 16), names=[...])          # (B, C, H, W) float32
    items, names = load(["photo.jpg", b"...", pil_image])  # what the Python API accepts

Nothing here does network I/O; ``load`` reads the files it is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from downpour.feeder import preprocess
from downpour.neurons.model import QueryError

# A 40-megapixel photo is accepted; more is refused before decoding. Pillow's own bomb
# check starts at ~89 M pixels (warning) and 179 M (error), both far above what any
# network input needs and what a query should be allowed to make the service allocate.
MAX_PIXELS = 40_000_000
# All the images of one request together: each is fitted (and its full-size copy dropped) before
# the next is decoded, so memory stays at one image, and this bounds the time spent resizing.
MAX_REQUEST_PIXELS = 200_000_000
# What an array image may be: its dtype and the range its values are read in.
ARRAY_DTYPES = {"uint8": "0..255", "float16": "0..1", "bfloat16": "0..1", "float32": "0..1", "float64": "0..1"}
CHANNELS = (1, 3, 4)
# What the service decodes: the formats of photos and of the web (phones' JPEGs open as MPO, a
# JPEG too). The rest (TIFF, BMP, PSD, EPS, ...) is refused before its parser reads a byte past
# the signature: each format is a parser of hostile bytes, and nobody needs them to ask a neuron.
SERVICE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP")


class PixelBudget:
    """What one request may still decode (``MAX_REQUEST_PIXELS``)."""

    def __init__(self, pixels: int = MAX_REQUEST_PIXELS) -> None:
        self.total, self.left = pixels, pixels

    def take(self, n: int, what: str) -> None:
        if n > self.left:
            raise QueryError(
                f"{what}: the request's images have more than {self.total} pixels together; "
                f"send fewer or smaller images"
            )
        self.left -= n


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
    """How encoded images are decoded: which formats, how many pixels, how many at once.

    The library (``downpour.load``) decodes any format Pillow reads, one caller at a time; the
    service lists its formats (``SERVICE_FORMATS``) and passes a semaphore, so that at most a few
    full-size images are in memory at once whatever the number of callers.
    """

    formats: tuple[str, ...] | None = None  # None: every format Pillow reads
    max_pixels: int = MAX_PIXELS
    gate: threading.Semaphore | None = None  # held while a full-size image is in memory

    def decoding(self) -> AbstractContextManager[Any]:
        return self.gate if self.gate is not None else contextlib.nullcontext()


DEFAULT_LIMITS = DecodeLimits()
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
# Images up to this many pixels are fitted exactly as the feeder fits (one bilinear resize of the
# float image: at most 16 MB as float32 RGBA); larger ones are first reduced on their integer
# pixels to no less than SHRINK_MARGIN x the input's side, which changes their activations a little.
SHRINK_ABOVE = 1 << 20
SHRINK_MARGIN = 4


def _shrink(im: Image.Image, fit: tuple[int, int]) -> Image.Image:
    """``im`` reduced by a whole factor (Pillow's box filter, on its 8- or 32-bit pixels), keeping
    ``SHRINK_MARGIN`` x what covers ``fit`` either way round (an EXIF rotation comes after), so
    that the final float resize (``preprocess.fit``) works on a small image."""
    side = max(fit)
    factor = min(im.size) // (SHRINK_MARGIN * side)
    if factor < 2:
        return im
    if im.mode in SIXTEEN_BIT:
        im = im.convert("I")  # read back / 65535 by the caller, as the 16-bit mode would be
    elif im.mode not in ("L", "RGB", "RGBA", "I", "F"):  # palette, 1-bit, CMYK, LA, ...: averaged as colours
        im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA"):
        # Pillow reduces these through a premultiplied full-size copy; band by band costs one band.
        # Not premultiplied, as the full-size path reads them: the alpha is dropped, not composited.
        return Image.merge(im.mode, [im.getchannel(i).reduce(factor) for i in range(len(im.getbands()))])
    return im.reduce(factor)


def from_encoded(
    data: bytes,
    what: str,
    budget: PixelBudget | None = None,
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    fit: tuple[int, int] | None = None,
) -> np.ndarray:
    """Encoded bytes -> (C, H, W) float32 in [0, 1]; QueryError if not decodable or not allowed.

    With ``fit`` (the model's (height, width)), an image over ``SHRINK_ABOVE`` pixels is decoded
    smaller where the format allows it (JPEG's ``draft``: 1/2, 1/4 or 1/8 scale) and reduced on
    its integer pixels before the float copy is made, so the float copy is about the size of the
    input, not of the photo.
    """
    formats = limits.formats
    try:
        with warnings.catch_warnings():
            # Pillow warns (rather than refuses) between its two bomb limits: make that a refusal too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # only the listed formats' parsers see the bytes (Image.open reads the header alone)
            im: Image.Image = Image.open(io.BytesIO(data), formats=list(formats) if formats else None)
            w, h = im.size
            if w * h > limits.max_pixels:
                raise QueryError(f"{what} is {h}x{w} = {w * h} pixels; at most {limits.max_pixels} are decoded")
            if budget is not None:
                budget.take(w * h, what)
            with limits.decoding():  # the full-size pixels exist only inside
                sixteen = im.mode in SIXTEEN_BIT
                shrink = fit is not None and w * h > SHRINK_ABOVE
                if shrink and fit is not None and im.format in ("JPEG", "MPO"):
                    side = SHRINK_MARGIN * max(fit)
                    im.draft(None, (side, side))  # the decoder scales down: never below the margin
                im.load()
                if shrink and fit is not None:
                    im = _shrink(im, fit)
                im = ImageOps.exif_transpose(im)  # phones store rotated pixels plus an orientation tag
                chw = _pixels(im, sixteen)
    except QueryError:
        raise
    # DecompressionBombError: a header claiming billions of pixels is refused, not decoded.
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
    ) as e:
        accepted = f" (accepted formats: {', '.join(formats)})" if formats else ""
        raise QueryError(f"{what}: not a decodable image{accepted} ({e})") from None
    if not np.all(np.isfinite(chw)):
        raise QueryError(f"{what} contains NaN or Inf")
    return np.ascontiguousarray(chw, np.float32)


def _pixels(im: Image.Image, sixteen: bool) -> np.ndarray:
    """A decoded image as (C, H, W) float32 in [0, 1]; ``sixteen``: it was decoded from 16 bits."""
    if sixteen:
        return (np.asarray(im, np.float32) / 65535.0)[None]
    if im.mode == "I":
        wide = np.asarray(im, np.float64)  # 32-bit integers: float32 would round them
        return (wide / max(float(wide.max()), 1.0)).astype(np.float32)[None]
    if im.mode == "F":
        return np.asarray(im, np.float32)[None]
    if im.mode not in ("L", "RGB", "RGBA"):
        im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
    a = np.asarray(im, np.float32) / 255.0
    return a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0)


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32: bfloat16 is the upper half of a float32."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def from_batch(arr: np.ndarray, what: str, dtype_name: str | None = None) -> list[np.ndarray]:
    """An array [batch, height, width, channels] -> [(C, H, W) float32 in [0, 1]].

    uint8 is read as 0..255, floats as 0..1 (see ``ARRAY_DTYPES``); ``dtype_name``
    overrides the array's own dtype name (bfloat16 arrives as its uint16 bits).
    """
    name = dtype_name or np.dtype(arr.dtype).name
    if name not in ARRAY_DTYPES:
        allowed = ", ".join(f"{k} ({v})" for k, v in ARRAY_DTYPES.items())
        raise QueryError(f"{what} of dtype {name} are not supported; send one of: {allowed}")
    if arr.ndim != 4:
        raise QueryError(f"{what} must be [batch, height, width, channels]; got shape {list(arr.shape)}")
    n, h, w, c = arr.shape
    if c not in CHANNELS:
        raise QueryError(
            f"{what} have {c} channels (shape {list(arr.shape)}); send 1 (grey), 3 (RGB) or "
            f"4 (RGBA) as the last axis of [batch, height, width, channels]"
        )
    if h < 1 or w < 1:
        raise QueryError(f"{what} are {h}x{w}: empty")
    if h * w > MAX_PIXELS:
        raise QueryError(f"{what} are {h}x{w} = {h * w} pixels each; at most {MAX_PIXELS}")
    if name == "bfloat16":
        x = bfloat16_to_float32(arr)
    elif name == "uint8":
        x = arr.astype(np.float32) / 255.0
    else:
        x = arr.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise QueryError(f"{what} contain NaN or Inf")
    return [np.ascontiguousarray(np.moveaxis(x[i], -1, 0)) for i in range(n)]


def to_input(
    items: Iterable[np.ndarray], input_chw: Sequence[int], *, resize: bool = True, names: Sequence[str] | None = None
) -> np.ndarray:
    """(C, H, W) images in [0, 1] -> the model's (B, C, H, W) float32 input (see the module docstring).

    ``items`` may be a generator: each image is fitted before the next is made, so that only
    one full-size image is held at a time.
    """
    c, h, w = (int(v) for v in input_chw)
    out = []
    for i, im in enumerate(items):
        name = names[i] if names else f"image {i}"
        x = preprocess.convert_channels(im, c)
        if x.shape[1:] != (h, w):
            if not resize:
                raise QueryError(
                    f"{name} is {x.shape[1]}x{x.shape[2]}; the model takes {h}x{w} (height x width) "
                    f"and resizing was turned off"
                )
            x = preprocess.fit(x, (h, w))
        out.append(np.asarray(x, np.float32))
    if not out:
        raise QueryError("no images: the batch is empty")
    return np.ascontiguousarray(np.stack(out), np.float32)


def _is_image_array(a: np.ndarray) -> bool:
    return a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in CHANNELS)


def load(
    images: Any, limits: DecodeLimits = DEFAULT_LIMITS, fit: tuple[int, int] | None = None
) -> tuple[Iterator[np.ndarray], list[str]]:
    """What the Python API accepts -> ((C, H, W) images in [0, 1], made one at a time; names).

    One array [batch, height, width, channels]; or a sequence (or one) of file
    paths, encoded bytes, PIL images and arrays [height, width(, channels)].
    Files and bytes are decoded within ``limits`` (see ``from_encoded`` for ``fit``).
    """
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return iter(from_batch(images, "images")), [f"images[{i}]" for i in range(len(images))]
    if isinstance(images, (str, os.PathLike, bytes, bytearray, np.ndarray)) or hasattr(images, "getdata"):
        images = [images]
    images = list(images)
    names = [os.fspath(im) if isinstance(im, (str, os.PathLike)) else f"images[{i}]" for i, im in enumerate(images)]
    return _load_each(images, names, limits, fit), names


def _load_each(
    images: list, names: list[str], limits: DecodeLimits, fit: tuple[int, int] | None
) -> Iterator[np.ndarray]:
    for i, im in enumerate(images):
        name = names[i]
        if isinstance(im, (str, os.PathLike)):
            with open(im, "rb") as f:
                yield from_encoded(f.read(), name, limits=limits, fit=fit)
        elif isinstance(im, (bytes, bytearray)):
            yield from_encoded(bytes(im), name, limits=limits, fit=fit)
        elif hasattr(im, "getdata"):  # a PIL image: encode losslessly, decode as every other image
            buf = io.BytesIO()
            im.save(buf, format="PNG" if im.mode != "F" else "TIFF")
            # the caller's own image, already in memory: any format it was re-encoded in is fine
            yield from_encoded(buf.getvalue(), name, limits=dataclasses.replace(limits, formats=None), fit=fit)
        elif isinstance(im, np.ndarray) and _is_image_array(im):
            a = im[:, :, None] if im.ndim == 2 else im
            yield from_batch(a[None], name)[0]
        else:
            raise TypeError(
                f"images[{i}]: expected a path, encoded bytes, a PIL image or an array "
                f"[height, width(, channels)], got {type(im).__name__}"
                f"{' of shape ' + str(im.shape) if isinstance(im, np.ndarray) else ''}"
            )


def png_bytes(img_chw: np.ndarray) -> bytes:
    """A (C, H, W) float image, min-max scaled, as 8-bit PNG (grey or RGB)."""
    a = np.asarray(img_chw, np.float64)
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    u8 = np.round(a * 255).astype(np.uint8)
    im = Image.fromarray(u8[0]) if u8.shape[0] == 1 else Image.fromarray(np.moveaxis(u8[:3], 0, -1))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
