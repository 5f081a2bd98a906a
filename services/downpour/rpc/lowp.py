"""Reduced-precision tensors on the wire: bfloat16 and float16 from and to float32.

Parameters and gradients are float32 everywhere they are held (the shard keeps
float32 master weights and accumulators); a job may send them through gRPC in
16 bits to halve the bytes (``wire_dtype``). bfloat16 keeps float32's exponent
range (no overflow, 8 bits of mantissa); float16 keeps 11 bits of mantissa
but overflows above 65504, which the shard then refuses as Inf.

bfloat16 has no NumPy dtype: it is held as its uint16 bit pattern, the upper
half of the float32, rounded to nearest even (NaN stays NaN).
"""

from __future__ import annotations

import numpy as np

from downpour.v1 import common_pb2

WIRE_DTYPES = {
    "float32": common_pb2.DTYPE_FLOAT32,
    "bfloat16": common_pb2.DTYPE_BFLOAT16,
    "float16": common_pb2.DTYPE_FLOAT16,
}
ITEMSIZE = {common_pb2.DTYPE_FLOAT32: 4, common_pb2.DTYPE_BFLOAT16: 2, common_pb2.DTYPE_FLOAT16: 2}


def to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest, ties to even."""
    u = np.ascontiguousarray(x, dtype="<f4").view("<u4")
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    out = ((u + rounding) >> 16).astype("<u2")
    nan = np.isnan(x)
    if nan.any():  # rounding could carry a NaN's payload into Inf's pattern
        out[nan] = 0x7FC0
    return out


def from_bfloat16(u16: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 bit patterns -> float32 (exact)."""
    u = np.asarray(u16, dtype="<u2")
    if out is None:
        out = np.empty(u.shape, np.float32)
    out.view("<u4")[...] = u.astype("<u4") << 16
    return out


def encode(x: np.ndarray, dtype: int) -> np.ndarray:
    """float32 values as the wire ``dtype`` (a buffer to send)."""
    if dtype == common_pb2.DTYPE_FLOAT32:
        return np.ascontiguousarray(x, dtype="<f4")
    if dtype == common_pb2.DTYPE_BFLOAT16:
        return to_bfloat16(x)
    if dtype == common_pb2.DTYPE_FLOAT16:
        with np.errstate(over="ignore"):
            return np.ascontiguousarray(x, dtype="<f4").astype("<f2")
    raise ValueError(f"cannot send parameters as dtype {dtype}")


def decode(payload, dtype: int, out: np.ndarray | None = None) -> np.ndarray:
    """Received bytes of the wire ``dtype`` as float32 (into ``out`` when given)."""
    if dtype == common_pb2.DTYPE_FLOAT32:
        a = np.frombuffer(payload, dtype="<f4")
        if out is None:
            return a
        out[...] = a
        return out
    if dtype == common_pb2.DTYPE_BFLOAT16:
        return from_bfloat16(np.frombuffer(payload, dtype="<u2"), out)
    if dtype == common_pb2.DTYPE_FLOAT16:
        a = np.frombuffer(payload, dtype="<f2")
        if out is None:
            return a.astype(np.float32)
        out[...] = a
        return out
    raise ValueError(f"cannot read parameters of dtype {dtype}")
