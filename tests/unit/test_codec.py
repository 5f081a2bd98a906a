"""downpour.rpc.codec: the raw-payload fast path is plain protobuf on the wire."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from downpour.rpc import codec
from downpour.v1 import common_pb2
from downpour.v1 import paramserver_pb2 as pb

PUSH = (3, 15)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 5000), seq=st.integers(0, 2**64 - 1), name=st.text(max_size=20), base=st.integers(0, 2**40))
def test_encode_is_protobuf_and_decode_inverts(n, seq, name, base):
    g = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    hdr = common_pb2.TensorChunk(name=name, dtype=common_pb2.DTYPE_FLOAT32, shape=[n], offset=7, last=True)
    wire = codec.encode(pb.PushRequest(worker_id="w", seq=seq, chunk=hdr, base_version=base), PUSH, g)
    # any protobuf parser reads it
    full = pb.PushRequest.FromString(wire)
    assert full.seq == seq and full.chunk.name == name and full.chunk.offset == 7 and full.base_version == base
    assert full.chunk.data == g.tobytes()
    # the fast path returns the same fields and a view of the payload
    msg, view = codec.decode(pb.PushRequest, wire, PUSH)
    assert msg.chunk.data == b"" and msg.chunk.name == name and msg.seq == seq
    np.testing.assert_array_equal(np.frombuffer(view, "<f4"), g)


def test_decode_reads_protobuf_serialised_messages():
    g = np.arange(10, dtype=np.float32)
    wire = pb.PushRequest(worker_id="w", chunk=common_pb2.TensorChunk(name="b", data=g.tobytes())).SerializeToString()
    msg, view = codec.decode(pb.PushRequest, wire, PUSH)
    assert msg.chunk.name == "b"
    np.testing.assert_array_equal(np.frombuffer(view, "<f4"), g)


def test_decode_without_payload_gives_empty_view():
    msg, view = codec.decode(pb.PushRequest, pb.PushRequest(commit=True).SerializeToString(), PUSH)
    assert msg.commit and view.nbytes == 0


def test_truncated_message_is_an_error():
    wire = codec.encode(pb.PushRequest(worker_id="w"), PUSH, np.ones(100, np.float32))
    with pytest.raises(ValueError, match="truncated"):
        codec.decode(pb.PushRequest, wire[:-5], PUSH)


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int32", "int64", "uint8"])
def test_tensor_roundtrip(dtype):
    a = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    t = codec.tensor_to_proto(a)
    b = codec.tensor_from_proto(common_pb2.Tensor.FromString(t.SerializeToString()))
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(a, b)


def test_tensor_with_wrong_byte_count_is_rejected():
    t = common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[2, 2], data=b"\0" * 12)
    with pytest.raises(ValueError, match="needs 16 bytes, got 12"):
        codec.tensor_from_proto(t)


def test_chunk_spans_cover_exactly():
    spans = list(codec.chunk_spans(10, 4, 12))
    assert spans == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert list(codec.chunk_spans(0, 4, 12)) == [(0, 0)]
