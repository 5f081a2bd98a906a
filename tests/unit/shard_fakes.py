"""A fake of the coordinator's ``Shards`` interface: real shard stores and real checkpoint files,
no gRPC. It records every call and fails on demand."""

from __future__ import annotations

import numpy as np

from downpour.checkpoint import shardfile
from downpour.checkpoint.errors import CheckpointInvalid
from downpour.coordinator.shards import ShardError
from downpour.paramserver.store import OptimizerConfig, ShardStore


class FakeShards:
    def __init__(self, root, sizes: dict[str, int], place: dict[str, int], n: int = 2):
        self.root = root
        self.sizes = sizes
        self.place = place
        self.addresses = [f"fake:{i}" for i in range(n)]
        self.stores = [ShardStore(i, OptimizerConfig("adagrad", 0.1, 1e-8)) for i in range(n)]
        for name, i in place.items():
            self.stores[i].create(name, (sizes[name],), np.full(sizes[name], i + 1, np.float32))
        self.calls: list[tuple] = []
        self.fail: dict[str, BaseException] = {}  # method -> raised at its next call
        self.down: set[int] = set()  # shards that do not answer
        self.unloadable: set[str] = set()  # checkpoint ids every shard finds damaged
        self.on_restore = None  # called with (i, checkpoint_id) before a restore

    def _call(self, *call) -> None:
        self.calls.append(call)
        e = self.fail.pop(call[0], None)
        if e is not None:
            raise e

    def named(self, method: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == method]

    def wait_ready(self, timeout: float) -> None:
        self._call("wait_ready")

    def set_optimizer(self, i: int) -> None:
        self._call("set_optimizer", i)

    def init_blocks(self, i: int, names: list[str], timeout: float) -> tuple[int, int]:
        self._call("init_blocks", i, sorted(names))
        for n in names:
            self.stores[i].create(n, (self.sizes[n],), np.zeros(self.sizes[n], np.float32), overwrite=True)
        return len(names), 0

    def checkpoint(self, checkpoint_id: str) -> list[dict]:
        self._call("checkpoint", checkpoint_id)
        parts = []
        for i, st in enumerate(self.stores):
            path = shardfile.shard_path(self.root, checkpoint_id, i)
            n, size, crc = shardfile.save(st, path)
            parts.append({"shard": i, "path": str(path), "num_bytes": size, "crc32": crc, "num_blocks": n})
        return parts

    def restore_all(self, checkpoint_id: str) -> None:
        self._call("restore_all", checkpoint_id)

    def restore(self, i: int, checkpoint_id: str) -> None:
        self._call("restore", i, checkpoint_id)
        if self.on_restore is not None:
            self.on_restore(i, checkpoint_id)
        if checkpoint_id in self.unloadable:
            raise CheckpointInvalid(f"shard {i}: {checkpoint_id} is corrupt")
        _, _, blocks, dedup = shardfile.load(shardfile.shard_path(self.root, checkpoint_id, i))
        self.stores[i].replace_all(blocks, dedup)

    def blocks(self, i: int) -> set[str]:
        self._call("blocks", i)
        if i in self.down:
            raise ShardError("UNAVAILABLE", f"shard {i} is down")
        return set(self.stores[i].blocks)

    def restart(self, i: int) -> None:
        """Shard i comes back empty."""
        self.stores[i] = ShardStore(i, OptimizerConfig("adagrad", 0.1, 1e-8))
