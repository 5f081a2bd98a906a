"""Datasets behind one small interface, and ``open_dataset`` to pick one.

Every dataset has ``len(ds)``, ``ds.get(indices) -> (x, y)`` with x a float32
(N, C, H, W) array preprocessed as its ``PreprocessSpec`` says and y an int64
(N,) array or None when unlabeled, ``ds.shape`` (C, H, W of one example),
``ds.num_classes`` (0 when unlabeled) and ``ds.skipped`` (unreadable files met).
The interface and the array-backed datasets are in ``downpour.feeder.base``;
they are importable from here as well.

``open_dataset(uri_or_path, preprocess)`` understands:

- ``"default"`` or ``"default:<split>"``: the bundled dataset (see
  ``downpour.feeder.bundled``; splits train, heldout_faces, heldout_nonfaces,
  heldout_natural, distractors). Needs no download.
- a directory: images (PNG, JPEG, BMP, GIF, TIFF, WebP via Pillow), found
  recursively and read on demand. Images under immediate sub-folders are
  labelled by sub-folder, sorted class names -> 0, 1, ...; images lying
  directly in the root make the whole folder unlabeled. Without
  ``preprocess.size`` every image is resized to the first one's size.
- ``.npy`` (images only) or ``.npz`` (``x`` and optional ``y``), memory-mapped
  where NumPy allows. Arrays are (N, H, W), (N, H, W, C) or (N, C, H, W).
- an IDX file such as ``train-images-idx3-ubyte[.gz]``; the matching
  ``train-labels-idx1-ubyte[.gz]`` is used as labels when it is present.

A file that cannot be decoded is skipped: logged once, counted in ``skipped``,
reported to ``on_skip(path, reason)`` if given, and its slot in a batch is
filled by the next readable example so a batch keeps its size.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from . import bundled, idx
from .base import ArrayDataset, ConcatDataset, Dataset, SkipCallback
from .preprocess import PreprocessSpec

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
KINDS = ("default", "default:<split>", "directory of images", ".npy", ".npz", "IDX file")
# grey modes kept as they are: uint8, uint16 (16-bit PNG; scaled by 65535) and float
GREY_MODES = ("L", "I;16", "F")


class FolderDataset(Dataset):
    """Image files under a directory, decoded on demand (see module docstring)."""

    def __init__(
        self, root: str | os.PathLike, spec: PreprocessSpec | None = None, on_skip: SkipCallback | None = None
    ):
        super().__init__(spec, on_skip)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset directory {self.root} does not exist")
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(
                f"dataset directory {self.root} holds no images; expected files "
                f"ending in {', '.join(IMAGE_EXTENSIONS)} (class sub-folders optional)"
            )
        self.files = files
        rel = [p.relative_to(self.root).parts for p in files]
        if all(len(r) > 1 for r in rel):
            self.classes = sorted({r[0] for r in rel})
            lookup = {c: i for i, c in enumerate(self.classes)}
            self.labels = np.array([lookup[r[0]] for r in rel], dtype=np.int64)
        else:
            self.classes = []
            self.labels = None
        self.bad: set[int] = set()
        self._hw: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, i: int) -> np.ndarray | None:
        try:
            with Image.open(self.files[i]) as f:
                # palette, RGBA, CMYK, bilevel... -> one common form
                im = f if f.mode in GREY_MODES else f.convert("RGB")
                a = np.asarray(im)
                return a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0)
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
            self.bad.add(i)
            self._skip(str(self.files[i]), f"{type(e).__name__}: {e}")
            return None

    def _raw(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        out, used = [], []
        n = len(self.files)
        for i in indices:
            i = int(i)
            # a bad file's slot goes to the next readable one, so batches keep their size
            for _ in range(n):
                img = None if i in self.bad else self._load(i)
                if img is not None:
                    break
                i = (i + 1) % n
            else:
                raise ValueError(f"dataset directory {self.root}: none of its {n} image files is readable")
            out.append(img)
            used.append(i)
        return out, np.array(used, dtype=np.int64)

    def _source_shape(self) -> tuple[int, int]:
        if self._hw is None:
            # the first readable image fixes the size when the spec does not
            img = self._raw(np.array([0]))[0][0]
            self._hw = tuple(img.shape[1:])
        return self._hw


def _open_npy(path: Path, spec: PreprocessSpec, on_skip: SkipCallback | None) -> ArrayDataset:
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{path}: not a readable .npy array of images ({e})") from None
    return ArrayDataset(x, None, spec, name=str(path), on_skip=on_skip)


def _open_npz(path: Path, spec: PreprocessSpec, on_skip: SkipCallback | None) -> ArrayDataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k in ("x", "y")}
            names = sorted(z.files)
    except (OSError, EOFError, ValueError, AttributeError, TypeError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz archive ({e})") from None
    if "x" not in arrays:
        raise ValueError(f"{path}: an .npz dataset needs an array named 'x' (and optionally 'y'); it holds {names}")
    return ArrayDataset(arrays["x"], arrays.get("y"), spec, name=str(path), on_skip=on_skip)


def _open_idx(path: Path, spec: PreprocessSpec, on_skip: SkipCallback | None) -> ArrayDataset:
    x = idx.read_idx(path)
    labels = idx.labels_path_for(path)
    y = idx.read_idx(labels) if labels is not None else None
    if y is not None:
        log.info("using labels from %s for %s", labels, path)
    return ArrayDataset(x, y, spec, name=str(path), on_skip=on_skip)


def open_dataset(
    uri_or_path: str | os.PathLike,
    preprocess_spec: PreprocessSpec | dict | None = None,
    *,
    on_skip: SkipCallback | None = None,
) -> Dataset:
    """Open a dataset by URI or path (see the module docstring for what is understood)."""
    spec = preprocess_spec if isinstance(preprocess_spec, PreprocessSpec) else PreprocessSpec.from_dict(preprocess_spec)
    uri = os.fspath(uri_or_path)
    if uri == "default" or uri.startswith("default:"):
        split = uri.partition(":")[2] or "train"
        return bundled.open_split(split, spec)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    path = Path(uri).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"dataset {uri!r} not found: expected 'default', a directory of images, a .npy/.npz file or an IDX file"
        )
    if path.is_dir():
        return FolderDataset(path, spec, on_skip)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _open_npy(path, spec, on_skip)
    if suffix == ".npz":
        return _open_npz(path, spec, on_skip)
    if idx.is_idx(path):
        return _open_idx(path, spec, on_skip)
    raise ValueError(f"dataset {uri!r}: unknown kind; allowed kinds: {', '.join(KINDS)}")


__all__ = [
    "ArrayDataset",
    "ConcatDataset",
    "Dataset",
    "FolderDataset",
    "SkipCallback",
    "open_dataset",
    "IMAGE_EXTENSIONS",
    "KINDS",
    "GREY_MODES",
]
