"""The state of one parameter shard, independent of gRPC.

Blocks are named flat float32 arrays with their optimizer state (the Adagrad
accumulator) and a version (the number of updates applied). Each block has its
own lock. The update rule itself lives in ``downpour.optim``.

The unit of atomicity is the block: a block's gradient is validated in full
(every chunk) before any of it is applied, then applied under the block's
lock, so a block is updated completely or not at all and a pull never sees a
half-updated block. A push spanning several shards can never be atomic as a
whole, so nothing pretends it is inside one shard either.

Pushes are identified by (worker_id, seq). The shard remembers, for a window
of recent sequence numbers per worker, which blocks each push has already
updated; a retried push (same worker_id and seq) updates only the blocks the
first attempt did not reach: every block at most once. The window travels in
checkpoints, so this holds across a restore too.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from downpour import optim
from downpour.optim import OptimizerConfig

DEDUP_WINDOW = 4096  # sequence numbers remembered per worker
# Workers remembered: worker ids are the client's choice, so the least recently pushing worker is
# forgotten past this (a retry of its pushes from that far back could then apply twice).
MAX_DEDUP_WORKERS = 1024


class StoreError(Exception):
    """A request the shard refuses.

    ``kind`` maps to a gRPC status code; ``block`` and ``reason`` say, as data,
    which block of a push was refused and why (``reason`` is a RefusalReason
    of paramserver.proto in lower case, without its prefix: "not_finite"), so
    that no caller has to read the message.
    """

    def __init__(self, kind: str, message: str, *, block: str = "", reason: str = "malformed") -> None:
        super().__init__(message)
        self.kind = kind  # "invalid", "not_found", "exists"
        self.block = block
        self.reason = reason


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
    """Blocks applied per recent sequence number of one worker."""

    def __init__(self) -> None:
        self.applied: dict[int, set[str]] = {}
        self.order: deque[int] = deque()

    def add(self, seq: int, name: str) -> None:
        if seq not in self.applied:
            self.applied[seq] = set()
            self.order.append(seq)
            if len(self.order) > DEDUP_WINDOW:
                self.applied.pop(self.order.popleft(), None)
        self.applied[seq].add(name)

    def has(self, seq: int, name: str) -> bool:
        return name in self.applied.get(seq, ())


class ShardStore:
    def __init__(self, shard_index: int = 0, optimizer: OptimizerConfig | None = None) -> None:
        self.shard_index = shard_index
        self.optimizer = optimizer or OptimizerConfig()
        self.blocks: dict[str, Block] = {}
        self.rw = RWLock()
        self._meta = threading.Lock()  # guards the dicts below and `blocks` membership
        self._dedup: dict[str, _Dedup] = {}
        self._in_flight: set[tuple[str, int, str]] = set()
        self._flight_done = threading.Condition(self._meta)
        self._local = threading.local()

    # -- blocks ---------------------------------------------------------------
    def create(self, name: str, shape: tuple[int, ...], values: np.ndarray, overwrite: bool = False) -> Block:
        w = np.array(values, dtype=np.float32, copy=True).reshape(-1)
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not name:
            raise StoreError("invalid", "block name is empty")
        if w.shape[0] != n:
            raise StoreError(
                "invalid", f"block {name!r}: shape {list(shape)} needs {n} float32 values, got {w.shape[0]}"
            )
        if not optim.all_finite(w):
            raise StoreError("invalid", f"block {name!r}: initial values contain NaN or Inf")
        acc = optim.get(self.optimizer.kind).init(n, self.optimizer)
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
            raise StoreError(
                "not_found", f"unknown block {name!r} on shard {self.shard_index}", block=name, reason="unknown_block"
            ) from None

    def replace_all(self, blocks: Iterable[Block], dedup: dict[str, list[list]]) -> None:
        """Swap in restored state (callers hold ``rw`` exclusively)."""
        with self._meta:
            self.blocks = {b.name: b for b in blocks}
            self._dedup = {}
            for worker, entries in dedup.items():
                d = self._dedup[worker] = _Dedup()
                for seq, names in entries:
                    for n in names:
                        d.add(int(seq), n)

    def dedup_state(self) -> dict[str, list[list]]:
        """{worker: [[seq, [block, ...]], ...]}, oldest first (JSON-friendly)."""
        with self._meta:
            return {w: [[q, sorted(d.applied[q])] for q in d.order] for w, d in self._dedup.items()}

    @property
    def num_parameters(self) -> int:
        return sum(b.size for b in self.blocks.values())

    # -- pushes ----------------------------------------------------------------
    def claim(self, worker_id: str, seq: int, name: str) -> bool:
        """Reserve block ``name`` of push (worker_id, seq); False if already applied.

        A concurrent retry of the same push waits for the first attempt's
        apply to finish, so that it can answer truthfully.
        """
        key = (worker_id, seq, name)
        with self._meta:
            while key in self._in_flight:
                self._flight_done.wait()
            d = self._dedup.get(worker_id)
            if d is not None and d.has(seq, name):
                return False
            self._in_flight.add(key)
            return True

    def release(self, worker_id: str, seq: int, name: str, applied: bool) -> None:
        with self._meta:
            self._in_flight.discard((worker_id, seq, name))
            if applied:
                d = self._dedup.pop(worker_id, None) or _Dedup()
                self._dedup[worker_id] = d  # the most recent last
                d.add(seq, name)
                while len(self._dedup) > MAX_DEDUP_WORKERS:
                    self._dedup.pop(next(iter(self._dedup)))
            self._flight_done.notify_all()

    def apply_once(self, worker_id: str, seq: int, blk: Block, chunks: list[tuple[int, np.ndarray]]) -> int | None:
        """Apply a validated block gradient unless this push already did.

        Returns the block version before the update, or None for a repeat.
        Holds ``rw`` shared, so a checkpoint sees every block either before
        or after an update.
        """
        if not self.claim(worker_id, seq, blk.name):
            return None
        applied = False
        self.rw.acquire_shared()
        try:
            before = self.apply(blk, chunks)
            applied = True
        finally:
            self.rw.release_shared()
            self.release(worker_id, seq, blk.name, applied)
        return before

    def _scratch(self) -> optim.Scratch:
        s = getattr(self._local, "scratch", None)
        if s is None:
            s = self._local.scratch = optim.Scratch()
        return s

    def apply(self, blk: Block, chunks: list[tuple[int, np.ndarray]]) -> int:
        """Apply a block's validated gradient chunks [(offset, g)] under its lock.

        Returns the block's version before the update (for staleness).
        """
        config, scratch = self.optimizer, self._scratch()
        rule = optim.get(config.kind)
        with blk.lock:
            before = blk.version
            for off, g in chunks:
                end = off + g.shape[0]
                rule.update(blk.w[off:end], blk.acc[off:end], g, config, scratch)
            blk.version += 1
        return before
