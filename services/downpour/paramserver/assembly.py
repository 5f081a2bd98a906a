"""A block's chunks as they arrive in a push or a create: checked one by one, kept in order.

Every check names the block and the reason (see errors.py), so a refused
push says, as data, which block it refused and why.
"""

from __future__ import annotations

import numpy as np

from downpour import optim
from downpour.paramserver.store import StoreError
from downpour.rpc import codec, lowp
from downpour.v1 import common_pb2


class Assembly:
    """Validates a block's chunks as they arrive (in order, float32, right shape)."""

    def __init__(self, name: str, shape: tuple[int, ...], size: int, reduced: bool = False) -> None:
        self.name, self.shape, self.size = name, shape, size
        self.reduced = reduced  # gradients may arrive as bfloat16 or float16 (initial values may not)
        self.next = 0
        self.chunks: list[tuple[int, np.ndarray]] = []

    def _refuse(self, reason: str, message: str) -> StoreError:
        return StoreError("invalid", f"block {self.name!r}: {message}", block=self.name, reason=reason)

    def add(self, chunk: common_pb2.TensorChunk, payload: memoryview, check_finite: bool) -> None:
        dtype = codec.dtype_name(chunk.dtype)
        item = (
            lowp.ITEMSIZE.get(chunk.dtype) if self.reduced else 4 if chunk.dtype == common_pb2.DTYPE_FLOAT32 else None
        )
        if item is None:
            allowed = "float32, bfloat16 or float16" if self.reduced else "float32"
            raise self._refuse("wrong_dtype", f"dtype {dtype}, expected {allowed}")
        if tuple(chunk.shape) != self.shape:
            raise self._refuse(
                "wrong_shape", f"shape {list(chunk.shape)} does not match the block's {list(self.shape)}"
            )
        if payload.nbytes % item:
            raise self._refuse(
                "truncated",
                f"chunk at offset {chunk.offset} has {payload.nbytes} bytes, "
                f"not a whole number of {dtype} values (truncated?)",
            )
        if self.next >= self.size and self.size:
            raise StoreError(
                "invalid", f"block {self.name!r} appears twice in one request", block=self.name, reason="repeated"
            )
        if chunk.offset != self.next:
            raise self._refuse(
                "out_of_order", f"chunk at offset {chunk.offset}, expected {self.next} (chunks must arrive in order)"
            )
        g = lowp.decode(payload, chunk.dtype)  # float32: a view of what arrived, or a widened copy
        if self.next + g.shape[0] > self.size:
            raise self._refuse(
                "too_long", f"expected {self.size} float32 values, got at least {self.next + g.shape[0]}"
            )
        if check_finite and not optim.all_finite(g):
            raise self._refuse("not_finite", f"gradient contains NaN or Inf (chunk at offset {chunk.offset})")
        self.chunks.append((chunk.offset, g))
        self.next += g.shape[0]

    def check_complete(self) -> None:
        if self.next != self.size:
            raise self._refuse("truncated", f"expected {self.size} float32 values, got {self.next}")
