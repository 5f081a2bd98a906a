"""How much of its host a shard lets clients take: the block and shared-memory quotas.

A shard holds whatever its clients ask it to: blocks (CreateBlocks,
InitBlocks) and shared regions (AttachShared). Every such request is checked
against the shard's quotas before anything is allocated, and one over them is
refused with RESOURCE_EXHAUSTED naming the quota; what the shard already
holds is not touched. The defaults follow the machine's memory (the smaller
of MemTotal and a cgroup memory limit): blocks may take three quarters of it,
shared regions half (they are there for co-located workers, whose own
memory comes out of the same host).
"""

from __future__ import annotations

import threading

from downpour import hostmem

BYTES_PER_VALUE = 8  # a block's float32 weight and its float32 optimizer accumulator
DEFAULT_MAX_BLOCKS = 1 << 20  # blocks per shard; each costs a few hundred bytes of bookkeeping besides its values
_FALLBACK = 16 << 30  # where the machine's memory cannot be read


def machine_bytes() -> int:
    """This machine's memory: MemTotal, or the cgroup memory limit where that is smaller."""
    best = hostmem.meminfo("MemTotal") or _FALLBACK
    cg = hostmem.cgroup_memory()
    return min(best, cg[0]) if cg is not None else best


def default_store_bytes() -> int:
    return machine_bytes() * 3 // 4


def default_shared_bytes() -> int:
    return machine_bytes() // 2


class BlockQuota:
    """The bytes and count of blocks a shard holds, and of those being received, against their limits.

    A request reserves what it declares before it allocates (``reserve``) and
    hands the reservation back when it ends (``release``); ``check`` counts the
    stored blocks as well, so concurrent requests cannot pass the limit together.
    """

    def __init__(self, max_bytes: int = 0, max_blocks: int = 0) -> None:
        self.max_bytes, self.max_blocks = max_bytes, max_blocks  # 0: no limit
        self.lock = threading.Lock()  # also held by a commit between its final check and its create
        self._bytes = 0  # reserved by requests in flight
        self._blocks = 0

    def message(self, what: str, stored: tuple[int, int], add: tuple[int, int]) -> str | None:
        """Why ``add`` (bytes, blocks) more would be over quota with ``stored`` held; None if it fits."""
        nbytes, nblocks = stored[0] + self._bytes + add[0], stored[1] + self._blocks + add[1]
        if self.max_bytes and nbytes > self.max_bytes:
            return (
                f"{what} would take this shard's blocks to {nbytes} bytes "
                f"({BYTES_PER_VALUE} per value: weights and accumulators), over its quota "
                f"--max-store-bytes={self.max_bytes}"
            )
        if self.max_blocks and nblocks > self.max_blocks:
            return f"{what} would take this shard to {nblocks} blocks, over its quota --max-blocks={self.max_blocks}"
        return None

    def reserve(self, what: str, stored: tuple[int, int], add: tuple[int, int]) -> str | None:
        """Reserve ``add`` if it fits (None), else say why not (and reserve nothing)."""
        with self.lock:
            why = self.message(what, stored, add)
            if why is None:
                self._bytes += add[0]
                self._blocks += add[1]
            return why

    def release(self, add: tuple[int, int]) -> None:
        with self.lock:
            self._bytes -= add[0]
            self._blocks -= add[1]
