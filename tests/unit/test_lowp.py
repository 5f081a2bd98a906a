"""bfloat16 / float16 wire conversion against a per-element reference written from the definition."""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from downpour.rpc import lowp
from downpour.v1 import common_pb2


def bf16_naive(x: float) -> int:
    """Round a float32 to bfloat16 by hand: keep 16 bits, nearest, ties to even."""
    (u,) = struct.unpack("<I", struct.pack("<f", x))
    if x != x:
        return 0x7FC0
    upper, lower = u >> 16, u & 0xFFFF
    if lower > 0x8000 or (lower == 0x8000 and upper & 1):
        upper += 1
    return upper & 0xFFFF


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=64))
def test_bfloat16_rounding_matches_the_definition(values):
    x = np.array(values, np.float32)
    got = lowp.to_bfloat16(x)
    assert got.dtype == np.dtype("<u2")
    assert got.tolist() == [bf16_naive(float(v)) for v in x]


def test_bfloat16_round_trip_is_exact_for_representable_values_and_bounded_otherwise():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(10_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10_000)
    back = lowp.from_bfloat16(lowp.to_bfloat16(x))
    rel = np.abs(back - x) / np.abs(x)
    assert rel.max() <= 2.0**-8  # half an ulp of an 8-bit mantissa
    again = lowp.from_bfloat16(lowp.to_bfloat16(back))
    np.testing.assert_array_equal(again, back)  # bfloat16 values survive unchanged
    special = np.array([np.inf, -np.inf, 0.0, -0.0, np.nan], np.float32)
    out = lowp.from_bfloat16(lowp.to_bfloat16(special))
    assert out[0] == np.inf and out[1] == -np.inf and out[2] == 0 and np.signbit(out[3]) and np.isnan(out[4])


def test_encode_decode_by_wire_dtype():
    x = np.array([1.0, -2.5, 3.0e-3, 70000.0], np.float32)
    f32 = lowp.decode(lowp.encode(x, common_pb2.DTYPE_FLOAT32).tobytes(), common_pb2.DTYPE_FLOAT32)
    np.testing.assert_array_equal(f32, x)
    f16 = lowp.decode(lowp.encode(x, common_pb2.DTYPE_FLOAT16).tobytes(), common_pb2.DTYPE_FLOAT16)
    np.testing.assert_array_equal(f16[:3], x[:3].astype(np.float16).astype(np.float32))
    assert f16[3] == np.inf  # float16 overflows above 65504: the shard refuses such a gradient
    out = np.zeros(4, np.float32)
    lowp.decode(lowp.encode(x, common_pb2.DTYPE_BFLOAT16).tobytes(), common_pb2.DTYPE_BFLOAT16, out=out)
    np.testing.assert_array_equal(out, lowp.from_bfloat16(lowp.to_bfloat16(x)))
