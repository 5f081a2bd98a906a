"""Blocks created with the values a client sends: the CreateBlocks RPC of a ParameterServer.

The stream is checked chunk by chunk as it arrives (assembly.py); nothing is
created unless it ends with commit, so a stream cut short never passes for a
complete one. The values are kept as they arrive and joined at the commit:
memory follows the data actually sent, not the shape a message claims.

Each block's declared size is reserved against the shard's quota (quota.py:
bytes and count of blocks) when its first chunk arrives, before anything of
it is kept, and checked again with the stored blocks at the commit; over the
quota, the stream is refused with RESOURCE_EXHAUSTED and nothing is created.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from downpour.paramserver import errors
from downpour.paramserver.assembly import Assembly
from downpour.paramserver.blockinfo import block_info
from downpour.paramserver.quota import BYTES_PER_VALUE, BlockQuota
from downpour.paramserver.store import ShardStore, StoreError
from downpour.v1 import paramserver_pb2 as pb


class BlockCreation:
    """The CreateBlocks RPC (mixed into ParameterServer)."""

    store: ShardStore
    max_block_bytes: int
    quota: BlockQuota

    def _gauges(self) -> None:
        raise NotImplementedError("ParameterServer updates its metrics gauges")

    def _stored(self) -> tuple[int, int]:
        """(bytes, count) of the blocks this shard holds, as the quota counts them."""
        blocks = list(self.store.blocks.values())  # a copy: other calls may add blocks meanwhile
        return sum(b.size for b in blocks) * BYTES_PER_VALUE, len(blocks)

    def CreateBlocks(
        self, requests: Iterator[tuple[pb.CreateBlocksRequest, memoryview]], context: Any
    ) -> pb.CreateBlocksResponse:
        pending: dict[str, tuple[list[np.ndarray], Assembly, bool]] = {}
        committed = False
        held = [0, 0]  # reserved against the quota by this stream: bytes, blocks
        stored: tuple[int, int] | None = None
        try:
            for req, payload in requests:
                if committed:
                    raise StoreError("invalid", "message after commit")
                committed = req.commit
                if not req.HasField("chunk"):
                    continue
                c = req.chunk
                if c.name not in pending:
                    shape = tuple(int(s) for s in c.shape)
                    if any(s < 0 for s in shape):
                        raise StoreError("invalid", f"block {c.name!r}: negative shape {list(shape)}")
                    n = 1
                    for s in shape:  # Python ints: no int64 overflow on hostile shapes
                        n *= s
                    if n * 4 > self.max_block_bytes:
                        raise StoreError(
                            "invalid",
                            f"block {c.name!r}: shape {list(shape)} is {n * 4} bytes, over "
                            f"this shard's limit of {self.max_block_bytes} per block",
                        )
                    if stored is None:
                        stored = self._stored()
                    why = self.quota.reserve(
                        f"CreateBlocks block {c.name!r} ({n} values, block {len(pending) + 1} of its stream)",
                        stored,
                        (n * BYTES_PER_VALUE, 1),
                    )
                    if why is not None:
                        raise StoreError("exhausted", why)
                    held[0] += n * BYTES_PER_VALUE
                    held[1] += 1
                    # The values are kept as they arrive and joined at the commit: memory
                    # follows the data actually sent, not the shape a message claims.
                    pending[c.name] = ([], Assembly(c.name, shape, n), req.overwrite)
                parts, asm, _ = pending[c.name]
                asm.add(c, payload, check_finite=True)
                _, g = asm.chunks.pop()
                parts.append(g.copy())  # copy now: the received buffer is not kept
            if not committed or not context.is_active():
                raise StoreError("invalid", "stream ended without commit: nothing created")
            for _parts, asm, _ in pending.values():
                asm.check_complete()
                if not asm.name:
                    raise StoreError("invalid", "block name is empty")
                if not pending[asm.name][2] and asm.name in self.store.blocks:
                    raise StoreError("exists", f"block {asm.name!r} already exists on shard {self.store.shard_index}")
            with self.quota.lock:  # blocks stored since the stream began count too
                why = self.quota.message(f"CreateBlocks of {len(pending)} blocks", self._stored(), (0, 0))
                if why is not None:
                    raise StoreError("exhausted", why)
                created = [
                    self.store.create(
                        a.name, a.shape, np.concatenate(parts) if parts else np.empty(0, np.float32), overwrite=ow
                    )
                    for parts, a, ow in pending.values()
                ]
        except StoreError as e:
            errors.abort(context, e)
        finally:
            self.quota.release((held[0], held[1]))
        self._gauges()
        return pb.CreateBlocksResponse(blocks=[block_info(b) for b in created])
