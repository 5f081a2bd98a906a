"""Tensors <-> protobuf wire bytes, with as few copies as the transport allows.

Tensors travel as ``TensorChunk`` (common.proto): dtype, shape, offset and a
``bytes data`` field of raw little-endian elements. Protobuf's Python runtime
copies a ``bytes`` field on parse and cannot take a memoryview on serialize, so
for the big payloads this module reads and writes that one field of the wire
format directly and leaves every other field to protobuf:

* ``encode(msg, path, payload)`` serialises ``msg`` (payload field left empty)
  and appends the payload as a second occurrence of the enclosing embedded
  message. Protobuf parsers merge repeated occurrences of a singular message
  field, so the result is ordinary, valid protobuf for any client.
* ``decode(cls, buf, path)`` returns ``(msg_without_payload, memoryview)``; the
  view points into the received buffer (no copy) and ``np.frombuffer`` on it
  gives the elements without another copy.

``path`` is the chain of field numbers from the top message to the bytes
field, e.g. ``PUSH_PAYLOAD = (3, 15)`` for ``PushRequest.chunk.data``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from downpour.v1 import common_pb2

M = TypeVar("M")

_WT_VARINT, _WT_I64, _WT_LEN, _WT_I32 = 0, 1, 2, 5

# bfloat16 has no NumPy dtype: it travels and is held as its uint16 bit pattern.
_NP_OF: dict[int, np.dtype] = {
    common_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    common_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    common_pb2.DTYPE_BFLOAT16: np.dtype("<u2"),
    common_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    common_pb2.DTYPE_INT32: np.dtype("<i4"),
    common_pb2.DTYPE_INT64: np.dtype("<i8"),
    common_pb2.DTYPE_UINT8: np.dtype("u1"),
}
_DT_OF: dict[str, common_pb2.Dtype.ValueType] = {
    v.str.lstrip("<|"): common_pb2.Dtype.ValueType(k) for k, v in _NP_OF.items() if k != common_pb2.DTYPE_BFLOAT16
}

DEFAULT_CHUNK_BYTES = 1 << 20  # cheapest per byte here: copies of a 1 MiB message stay in L2 (benchmarks/transport.py)


def np_dtype(dtype: int) -> np.dtype:
    """NumPy dtype (little-endian) of a wire Dtype; ValueError if unknown."""
    try:
        return _NP_OF[dtype]
    except KeyError:
        raise ValueError(
            f"unsupported dtype {common_pb2.Dtype.Name(common_pb2.Dtype.ValueType(dtype)) if dtype in common_pb2.Dtype.values() else dtype}"
        ) from None


def wire_dtype(dtype: Any) -> common_pb2.Dtype.ValueType:
    """Wire Dtype of a NumPy dtype."""
    key = np.dtype(dtype).str.lstrip("<>|=")
    try:
        return _DT_OF[key]
    except KeyError:
        raise ValueError(f"dtype {np.dtype(dtype)} has no wire representation") from None


def dtype_name(dtype: int) -> str:
    return (
        common_pb2.Dtype.Name(common_pb2.Dtype.ValueType(dtype)).removeprefix("DTYPE_").lower()
        if dtype in common_pb2.Dtype.values()
        else str(dtype)
    )


# -- wire format primitives ---------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated message: varint runs past the end")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed message: varint too long")


def _len_prefix(field: int, n: int) -> bytes:
    return varint((field << 3) | _WT_LEN) + varint(n)


def _strip(buf: memoryview, start: int, end: int, path: Sequence[int]) -> tuple[bytes, memoryview | None]:
    """Copy of buf[start:end] without the bytes field at ``path``, and that field."""
    parts: list[bytes] = []
    payload: memoryview | None = None
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _read_varint(buf, pos)
        field, wt = key >> 3, key & 7
        if wt == _WT_VARINT:
            _, pos = _read_varint(buf, pos)
        elif wt == _WT_I64:
            pos += 8
        elif wt == _WT_I32:
            pos += 4
        elif wt == _WT_LEN:
            n, pos = _read_varint(buf, pos)
            if pos + n > end:
                raise ValueError("truncated message: field runs past the end")
            if field == path[0]:
                if len(path) == 1:
                    payload = buf[pos : pos + n]  # last occurrence wins, as in protobuf
                    pos += n
                    continue
                inner, sub = _strip(buf, pos, pos + n, path[1:])
                if sub is not None:
                    payload = sub
                parts.append(_len_prefix(field, len(inner)) + inner)
                pos += n
                continue
            pos += n
        else:
            raise ValueError(f"malformed message: wire type {wt}")
        if pos > end:
            raise ValueError("truncated message: field runs past the end")
        parts.append(bytes(buf[field_start:pos]))
    return b"".join(parts), payload


def decode(cls: type[M], data: bytes, path: Sequence[int]) -> tuple[M, memoryview]:
    """Parse ``data`` as ``cls``; the bytes field at ``path`` comes back as a view."""
    view = memoryview(data)
    rest, payload = _strip(view, 0, len(view), path)
    msg = cls.FromString(rest)  # type: ignore[attr-defined]  # M is any generated message class; each has FromString
    return msg, payload if payload is not None else view[:0]


def encode(msg: Any, path: Sequence[int], payload: Any) -> bytes:
    """Serialise ``msg`` with ``payload`` (any buffer) as the bytes field at ``path``.

    The payload is copied exactly once, into the returned bytes.
    """
    mv = memoryview(payload).cast("B")
    n = mv.nbytes
    prefix = _len_prefix(path[-1], n)
    for field in reversed(path[:-1]):
        prefix = _len_prefix(field, len(prefix) + n) + prefix
    return b"".join((msg.SerializeToString(), prefix, mv))


# -- tensors --------------------------------------------------------------------


def tensor_to_proto(arr: np.ndarray) -> common_pb2.Tensor:
    """A whole (small) tensor as one Tensor message."""
    a = np.ascontiguousarray(arr, dtype=np.asarray(arr).dtype.newbyteorder("<"))
    return common_pb2.Tensor(dtype=wire_dtype(a.dtype), shape=a.shape, data=a.tobytes())


def tensor_from_proto(t: common_pb2.Tensor) -> np.ndarray:
    dt = np_dtype(t.dtype)
    shape = tuple(t.shape)
    n = int(np.prod(shape, dtype=np.int64))
    if len(t.data) != n * dt.itemsize:
        raise ValueError(
            f"tensor of shape {shape} and dtype {dtype_name(t.dtype)} needs {n * dt.itemsize} bytes, got {len(t.data)}"
        )
    return np.frombuffer(t.data, dtype=dt).reshape(shape)


def chunk_spans(num_elements: int, itemsize: int, max_chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """Element ranges [start, stop) of the chunks of a flat tensor (at least one)."""
    step = max(1, max_chunk_bytes // itemsize)
    if num_elements == 0:
        yield 0, 0
        return
    for start in range(0, num_elements, step):
        yield start, min(num_elements, start + step)
