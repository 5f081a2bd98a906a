"""The state of one parameter shard, independent of gRPC.

Blocks are named flat float32 arrays with an Adagrad accumulator and a version
(the number of updates applied). Each block has its own lock; a push is
validated completely before anything is applied, then applied block by block
under each block's lock, so a push is all-or-nothing and a pull never sees a
half-updated block. Pushes are identified by (worker_id, seq): the shard
remembers recent sequence numbers per worker and acknowledges a repeat without
applying it again (at most once, also across a checkpoint/restore).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from downpour import optim

DEDUP_WINDOW = 4096  # sequence numbers remembered per worker


class StoreError(Exception):
    """A request the shard refuses; ``kind`` maps to a gRPC status code."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "invalid", "not_found", "exists"


@dataclass
class OptimizerConfig:
    kind: str = "adagrad"  # or "sgd"
    lr: float = 0.01
    eps: float = 1e-8
    initial_accumulator: float = 0.0


@dataclass
class Block:
    name: str
    shape: tuple[int, ...]
    w: np.ndarray
    acc: np.ndarray
    version: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def size(self) -> int:
        return int(self.w.shape[0])


class RWLock:
    """Many pushes may apply at once; a checkpoint or restore excludes them all."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    def acquire_shared(self) -> None:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1

    def release_shared(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_exclusive(self) -> None:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._writer = True
            while self._readers:
                self._cond.wait()

    def release_exclusive(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class _Dedup:
    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.order: deque[int] = deque()

    def add(self, seq: int) -> None:
        self.seen.add(seq)
        self.order.append(seq)
        if len(self.order) > DEDUP_WINDOW:
            self.seen.discard(self.order.popleft())


class ShardStore:
    def __init__(self, shard_index: int = 0, optimizer: OptimizerConfig | None = None) -> None:
        self.shard_index = shard_index
        self.optimizer = optimizer or OptimizerConfig()
        self.blocks: dict[str, Block] = {}
        self.rw = RWLock()
        self._meta = threading.Lock()  # guards the dicts below and `blocks` membership
        self._dedup: dict[str, _Dedup] = {}
        self._in_flight: set[tuple[str, int]] = set()
        self._flight_done = threading.Condition(self._meta)
        self._local = threading.local()

    # -- blocks ---------------------------------------------------------------
    def create(self, name: str, shape: tuple[int, ...], values: np.ndarray, overwrite: bool = False) -> Block:
        w = np.array(values, dtype=np.float32, copy=True).reshape(-1)
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not name:
            raise StoreError("invalid", "block name is empty")
        if w.shape[0] != n:
            raise StoreError("invalid", f"block {name!r}: shape {list(shape)} needs {n} float32 values, got {w.shape[0]}")
        if not optim.all_finite(w):
            raise StoreError("invalid", f"block {name!r}: initial values contain NaN or Inf")
        acc = np.full(n, self.optimizer.initial_accumulator, dtype=np.float32)
        blk = Block(name, tuple(int(s) for s in shape), w, acc)
        with self._meta:
            if name in self.blocks and not overwrite:
                raise StoreError("exists", f"block {name!r} already exists on shard {self.shard_index}")
            self.blocks[name] = blk
        return blk

    def get(self, name: str) -> Block:
        try:
            return self.blocks[name]
        except KeyError:
            raise StoreError("not_found", f"unknown block {name!r} on shard {self.shard_index}") from None

    def replace_all(self, blocks: Iterable[Block], dedup: dict[str, list[int]]) -> None:
        """Swap in restored state (callers hold ``rw`` exclusively)."""
        with self._meta:
            self.blocks = {b.name: b for b in blocks}
            self._dedup = {}
            for worker, seqs in dedup.items():
                d = self._dedup[worker] = _Dedup()
                for s in seqs:
                    d.add(int(s))

    def dedup_state(self) -> dict[str, list[int]]:
        with self._meta:
            return {w: list(d.order) for w, d in self._dedup.items()}

    @property
    def num_parameters(self) -> int:
        return sum(b.size for b in self.blocks.values())

    # -- pushes ----------------------------------------------------------------
    def claim(self, worker_id: str, seq: int) -> bool:
        """Reserve (worker_id, seq) for applying; False if it was already applied.

        A concurrent retry of the same push waits for the first to finish, so
        that it can answer truthfully whether the push took effect.
        """
        key = (worker_id, seq)
        with self._meta:
            while key in self._in_flight:
                self._flight_done.wait()
            d = self._dedup.get(worker_id)
            if d is not None and seq in d.seen:
                return False
            self._in_flight.add(key)
            return True

    def release(self, worker_id: str, seq: int, applied: bool) -> None:
        with self._meta:
            self._in_flight.discard((worker_id, seq))
            if applied:
                self._dedup.setdefault(worker_id, _Dedup()).add(seq)
            self._flight_done.notify_all()

    def _scratch(self) -> optim.Scratch:
        s = getattr(self._local, "scratch", None)
        if s is None:
            s = self._local.scratch = optim.Scratch()
        return s

    def apply(self, blk: Block, chunks: list[tuple[int, np.ndarray]]) -> int:
        """Apply a block's validated gradient chunks [(offset, g)] under its lock.

        Returns the block's version before the update (for staleness).
        """
        opt, scratch = self.optimizer, self._scratch()
        with blk.lock:
            before = blk.version
            for off, g in chunks:
                end = off + g.shape[0]
                if opt.kind == "sgd":
                    optim.sgd_(blk.w[off:end], g, opt.lr, scratch)
                else:
                    optim.adagrad_(blk.w[off:end], blk.acc[off:end], g, opt.lr, opt.eps, scratch)
            blk.version += 1
        return before
