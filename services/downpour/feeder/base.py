"""The dataset interface and the datasets made of arrays: ``Dataset``, ``ArrayDataset``, ``ConcatDataset``.

Every dataset has ``len(ds)``, ``ds.get(indices) -> (x, y)`` with x a float32
(N, C, H, W) array preprocessed as its ``PreprocessSpec`` says and y an int64
(N,) array or None when unlabeled, ``ds.shape`` (C, H, W of one example),
``ds.num_classes`` (0 when unlabeled) and ``ds.skipped`` (unreadable files met).

These live apart from ``datasets`` (which opens a dataset by URI) so that
``bundled`` can build on them while ``datasets`` opens ``bundled``'s splits:
both depend on this module, neither on the other's callers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import cast

import numpy as np

from . import preprocess
from .preprocess import PreprocessSpec

# Skips are logged under the name users filter on since datasets were opened from one module.
log = logging.getLogger("downpour.feeder.datasets")

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

    def get(
        self, indices: Sequence[int] | np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(x float32 (N, C, H, W), y int64 (N,) or None) for ``indices``.

        Random crops draw from ``rng`` if given, else from the dataset's own
        generator (seeded by ``spec.seed``). NumPy generators are not
        thread-safe: callers on several threads pass one ``rng`` each.
        """
        idx_arr = self._indices(indices)
        if idx_arr.size == 0:
            return np.zeros((0,) + self.shape, np.float32), (None if self.labels is None else np.zeros(0, np.int64))
        raw, idx_arr = self._raw(idx_arr)
        x = preprocess.apply(raw, self.spec, rng if rng is not None else self.rng, default_size=self._source_shape())
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
    raise ValueError(
        f"{what}: expected images shaped (N, H, W), (N, H, W, C) or (N, C, H, W) with C in 1, 3, 4; got {x.shape}"
    )


class ArrayDataset(Dataset):
    """Images held in an array (in memory or memory-mapped), optional labels."""

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray | None = None,
        spec: PreprocessSpec | None = None,
        name: str = "array",
        on_skip: SkipCallback | None = None,
        num_classes: int | None = None,
    ):
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
        slots: list[np.ndarray | None] = [None] * len(indices)  # every slot is filled below
        used = np.array(indices, dtype=np.int64)
        for w in np.unique(which):
            sel = np.flatnonzero(which == w)
            raw, got = self.parts[w]._raw(indices[sel] - self.offsets[w])
            for k, j in enumerate(sel):
                slots[j] = raw[k]
            used[sel] = got + self.offsets[w]
        return cast(list[np.ndarray], slots), used

    def _source_shape(self) -> tuple[int, int]:
        return self.parts[0]._source_shape()
