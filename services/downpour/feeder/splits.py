"""The feeder's splits: TRAIN and TEST of a dataset, and the files it skipped.

For ``default`` the bundled ``train`` and ``heldout`` splits; for any other
dataset a deterministic 10% of its indices is held out as TEST (the first
``n // 10`` of a permutation drawn from ``HOLDOUT_SEED``, never the job's
seed, so a restarted feeder holds out the same examples).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from downpour import metrics
from downpour.feeder import bundled
from downpour.feeder.datasets import Dataset, open_dataset
from downpour.feeder.preprocess import PreprocessSpec
from downpour.v1 import feeder_pb2 as pb

HOLDOUT_FRACTION = 0.1
HOLDOUT_SEED = 2012
BUNDLED_CLASS_NAMES = ["not a face", "face"]


class StartupError(Exception):
    """A dataset the feeder cannot serve; reported without a traceback."""


@dataclass
class Split:
    """A split: the dataset it reads from and which of its indices belong to it."""

    name: str
    dataset: Dataset
    indices: np.ndarray  # dataset indices, sorted
    class_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labelled(self) -> bool:
        return self.dataset.labels is not None


class SkipCounter:
    """``on_skip`` for datasets: counts every unreadable file once."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, path: str, reason: str) -> None:
        with self._lock:
            if path in self._seen:
                return
            self._seen.add(path)
        metrics.FEEDER_SKIPPED_FILES.inc()


def holdout_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) dataset indices of a dataset without its own test split."""
    n_test = int(n * HOLDOUT_FRACTION)
    perm = np.random.default_rng(HOLDOUT_SEED).permutation(n)
    return np.sort(perm[n_test:]).astype(np.int64), np.sort(perm[:n_test]).astype(np.int64)


def load_splits(data: str, spec: PreprocessSpec, on_skip: SkipCounter | None = None) -> dict[int, Split]:
    """The TRAIN and (if there is one) TEST split of ``data``; StartupError if unusable."""
    out: dict[int, Split]
    try:
        if data == "default":
            splits = bundled.build(spec)
            train, test = splits.train, splits.heldout
            out = {
                pb.SPLIT_TRAIN: Split("default:train", train, np.arange(len(train), dtype=np.int64)),
                pb.SPLIT_TEST: Split(
                    "default:heldout", test, np.arange(len(test), dtype=np.int64), list(BUNDLED_CLASS_NAMES)
                ),
            }
        else:
            ds = open_dataset(data, spec, on_skip=on_skip)
            names = list(getattr(ds, "classes", []) or [])
            tr, te = holdout_indices(len(ds))
            out = {pb.SPLIT_TRAIN: Split(f"{data}:train", ds, tr, names)}
            if len(te):
                out[pb.SPLIT_TEST] = Split(f"{data}:test", ds, te, names)
        # Read one example now: a dataset of unreadable files fails here, not in a worker.
        probe = out[pb.SPLIT_TRAIN]
        x, _ = probe.dataset.get(probe.indices[:1])
        if x.shape[1:] != tuple(probe.dataset.shape):
            raise ValueError(f"examples come out shaped {x.shape[1:]}, expected {probe.dataset.shape}")
    except (OSError, ValueError, IndexError) as e:
        raise StartupError(f"cannot serve dataset {data!r}: {e}") from None
    return out
