"""Datasets behind one small interface, and ``open_dataset`` to pick one.

Every dataset has ``len(ds)``, ``ds.get(indices) -> (x, y)`` with x a float32
(N, C, H, W) array preprocessed as its ``PreprocessSpec`` says and y an int64
(N,) array or None when unlabeled, ``ds.shape`` (C, H, W of one example),
``ds.num_classes`` (0 when unlabeled) and ``ds.skipped`` (unreadable files met).

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
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from . import idx, preprocess
from .preprocess import PreprocessSpec

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
KINDS = ("default", "default:<split>", "directory of images", ".npy", ".npz", "IDX file")
# grey modes kept as they are: uint8, uint16 (16-bit PNG; scaled by 65535) and float
GREY_MODES = ("L", "I;16", "F")
SkipCallback = Callable[[str, str], None]


class Dataset:
    """Base class: subclasses give ``__len__``, ``_raw`` and ``_source_shape``."""

    labels: np.ndarray | None = None
    _num_classes: int | None = None  # set when the labels present do not show every class

    def __init__(self, spec: PreprocessSpec | None = None, on_skip: SkipCallback | None = None):
        self.spec = spec or PreprocessSpec()
        self.on_skip = on_skip
        self.skipped = 0
        # one generator per dataset: random crops are reproducible from spec.seed
        self.rng = np.random.default_rng(self.spec.seed)

    def __len__(self) -> int:
        raise NotImplementedError

    def _raw(self, indices: np.ndarray) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
        """Unprocessed images for ``indices`` (an NCHW array or a list of CHW
        arrays) and the indices actually read (unreadable files are replaced)."""
        raise NotImplementedError

    def _source_shape(self) -> tuple[int, int]:
        """(H, W) of the images as stored, before resizing."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.spec.channels,) + self.spec.output_hw(self._source_shape())

    @property
    def num_classes(self) -> int:
        if self.labels is None:
            return 0
        return self._num_classes or int(self.labels.max(initial=-1)) + 1

    def _indices(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx_arr = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx_arr.size and (idx_arr.min() < -n or idx_arr.max() >= n):
            raise IndexError(f"index out of range for a dataset of {n} examples")
        return idx_arr % max(n, 1)

    def get(self, indices: Sequence[int] | np.ndarray,
            rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(x float32 (N, C, H, W), y int64 (N,) or None) for ``indices``.

        Random crops draw from ``rng`` if given, else from the dataset's own
        generator (seeded by ``spec.seed``). NumPy generators are not
        thread-safe: callers on several threads pass one ``rng`` each.
        """
        idx_arr = self._indices(indices)
        if idx_arr.size == 0:
            return np.zeros((0,) + self.shape, np.float32), (None if self.labels is None else
                                                              np.zeros(0, np.int64))
        raw, idx_arr = self._raw(idx_arr)
        x = preprocess.apply(raw, self.spec, rng if rng is not None else self.rng,
                             default_size=self._source_shape())
        y = None if self.labels is None else np.asarray(self.labels[idx_arr], dtype=np.int64)
        return x, y

    def _skip(self, path: str, reason: str) -> None:
        self.skipped += 1
        log.warning("skipping unreadable file %s: %s", path, reason)
        if self.on_skip is not None:
            self.on_skip(path, reason)


def _nchw(x: np.ndarray, what: str) -> np.ndarray:
    """Arrays of images in any common layout -> (N, C, H, W) without copying data."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        first, last = x.shape[1] in (1, 3, 4), x.shape[-1] in (1, 3, 4)
        if last and not first:
            return np.moveaxis(x, -1, 1)
        if first:
            return x
    raise ValueError(f"{what}: expected images shaped (N, H, W), (N, H, W, C) or (N, C, H, W) "
                     f"with C in 1, 3, 4; got {x.shape}")


class ArrayDataset(Dataset):
    """Images held in an array (in memory or memory-mapped), optional labels."""

    def __init__(self, x: np.ndarray, y: np.ndarray | None = None, spec: PreprocessSpec | None = None,
                 name: str = "array", on_skip: SkipCallback | None = None,
                 num_classes: int | None = None):
        super().__init__(spec, on_skip)
        self._num_classes = num_classes
        self.name = name
        self.x = _nchw(np.asarray(x) if not isinstance(x, np.memmap) else x, name)
        if len(self.x) == 0:
            raise ValueError(f"{name}: holds no examples; expected at least one image")
        if y is not None:
            y = np.asarray(y).reshape(-1)
            if len(y) != len(self.x):
                raise ValueError(f"{name}: {len(self.x)} images but {len(y)} labels")
            if not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
                raise ValueError(f"{name}: labels must be non-negative integers, got dtype {y.dtype}")
            y = y.astype(np.int64)
        self.labels = y

    def __len__(self) -> int:
        return len(self.x)

    def _raw(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.x[indices]), indices

    def _source_shape(self) -> tuple[int, int]:
        return tuple(self.x.shape[2:])


class FolderDataset(Dataset):
    """Image files under a directory, decoded on demand (see module docstring)."""

    def __init__(self, root: str | os.PathLike, spec: PreprocessSpec | None = None,
                 on_skip: SkipCallback | None = None):
        super().__init__(spec, on_skip)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset directory {self.root} does not exist")
        files = sorted(p for p in self.root.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"dataset directory {self.root} holds no images; expected files "
                             f"ending in {', '.join(IMAGE_EXTENSIONS)} (class sub-folders optional)")
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
            with Image.open(self.files[i]) as im:
                if im.mode not in GREY_MODES:
                    im = im.convert("RGB")  # palette, RGBA, CMYK, bilevel... -> one common form
                a = np.asarray(im)
                return a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0)
        except Exception as e:  # Pillow raises many types for bad files
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


class ConcatDataset(Dataset):
    """Several datasets end to end; they must agree on the example shape."""

    def __init__(self, parts: Sequence[Dataset], spec: PreprocessSpec | None = None):
        if not parts:
            raise ValueError("ConcatDataset needs at least one dataset")
        super().__init__(spec or parts[0].spec)
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        if all(p.labels is not None for p in parts):
            self.labels = np.concatenate([p.labels for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _raw(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        which = np.searchsorted(self.offsets, indices, side="right") - 1
        images: list[np.ndarray] = [None] * len(indices)  # type: ignore[list-item]
        used = np.array(indices, dtype=np.int64)
        for w in np.unique(which):
            sel = np.flatnonzero(which == w)
            raw, got = self.parts[w]._raw(indices[sel] - self.offsets[w])
            for k, j in enumerate(sel):
                images[j] = raw[k]
            used[sel] = got + self.offsets[w]
        return images, used

    def _source_shape(self) -> tuple[int, int]:
        return self.parts[0]._source_shape()


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
        raise ValueError(f"{path}: an .npz dataset needs an array named 'x' (and optionally 'y'); "
                         f"it holds {names}")
    return ArrayDataset(arrays["x"], arrays.get("y"), spec, name=str(path), on_skip=on_skip)


def _open_idx(path: Path, spec: PreprocessSpec, on_skip: SkipCallback | None) -> ArrayDataset:
    x = idx.read_idx(path)
    labels = idx.labels_path_for(path)
    y = idx.read_idx(labels) if labels is not None else None
    if y is not None:
        log.info("using labels from %s for %s", labels, path)
    return ArrayDataset(x, y, spec, name=str(path), on_skip=on_skip)


def open_dataset(uri_or_path: str | os.PathLike, preprocess_spec: PreprocessSpec | dict | None = None,
                 *, on_skip: SkipCallback | None = None) -> Dataset:
    """Open a dataset by URI or path (see the module docstring for what is understood)."""
    spec = preprocess_spec if isinstance(preprocess_spec, PreprocessSpec) else \
        PreprocessSpec.from_dict(preprocess_spec)
    uri = os.fspath(uri_or_path)
    if uri == "default" or uri.startswith("default:"):
        from . import bundled  # scikit-image is only needed for the bundled data

        split = uri.partition(":")[2] or "train"
        return bundled.open_split(split, spec)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    path = Path(uri).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset {uri!r} not found: expected 'default', a directory of images, "
                                f"a .npy/.npz file or an IDX file")
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
