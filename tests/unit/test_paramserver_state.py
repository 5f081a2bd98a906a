"""Shard state without gRPC: placement, dedup, atomic verified checkpoints, refusals as data."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from downpour.checkpoint import shardfile as ckpt
from downpour.paramserver import errors
from downpour.paramserver.assembly import Assembly
from downpour.paramserver.client import balanced_placement
from downpour.paramserver.store import OptimizerConfig, ShardStore, StoreError
from downpour.v1 import common_pb2
from downpour.v1 import paramserver_pb2 as pb


def test_balanced_placement_largest_first_least_loaded():
    sizes = {"a": 100, "b": 60, "c": 50, "d": 10, "e": 5}
    p = balanced_placement(sizes, 2)
    assert p == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 0}
    loads = [sum(s for n, s in sizes.items() if p[n] == k) for k in range(2)]
    assert loads == [115, 110]
    assert balanced_placement({"x": 1}, 4) == {"x": 0}


def test_dedup_is_per_block_of_a_push():
    st = ShardStore()
    assert st.claim("w", 1, "a")
    st.release("w", 1, "a", applied=True)
    assert not st.claim("w", 1, "a")  # a retry does not update "a" again
    assert st.claim("w", 1, "b")  # ...but does update what the first attempt missed
    st.release("w", 1, "b", applied=False)  # failed: a retry may apply it
    assert st.claim("w", 1, "b")
    assert st.claim("w", 2, "a")


def _store():
    st = ShardStore(3, OptimizerConfig("adagrad", 0.1, 1e-8))
    rng = np.random.default_rng(0)
    for i in range(3):
        b = st.create(f"b{i}", (5, 7), rng.standard_normal(35))
        st.apply(b, [(0, rng.standard_normal(35).astype(np.float32))])
    st.claim("w", 9, "b1")
    st.release("w", 9, "b1", applied=True)
    return st


def test_checkpoint_roundtrip(tmp_path):
    st = _store()
    path = ckpt.shard_path(tmp_path, "step-1", 3)
    n, size, crc = ckpt.save(st, path)
    assert n == 3 and path.stat().st_size == size
    assert not [p for p in path.parent.iterdir() if p.name != path.name], "temporary file left behind"
    shard, opt, blocks, dedup = ckpt.load(path)
    assert shard == 3 and opt == st.optimizer and dedup == {"w": [[9, ["b1"]]]}
    for b in blocks:
        orig = st.blocks[b.name]
        assert b.shape == orig.shape and b.version == orig.version == 1
        np.testing.assert_array_equal(b.w, orig.w)
        np.testing.assert_array_equal(b.acc, orig.acc)


def test_corrupt_checkpoint_names_the_block(tmp_path):
    path = ckpt.shard_path(tmp_path, "c", 3)
    ckpt.save(_store(), path)
    data = bytearray(path.read_bytes())
    data[-4] ^= 0x01  # last value of the last block's accumulator
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"block 'b2': accumulator crc32 mismatch"):
        ckpt.load(path)
    path.write_bytes(bytes(data[:-100]))
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.load(path)


def test_checkpoint_ids_are_checked(tmp_path):
    for bad in ("", "..", "a/b"):
        with pytest.raises(ValueError):
            ckpt.shard_path(tmp_path, bad, 0)


# -- refusals as data -------------------------------------------------------------------


def _chunk(shape=(2, 3), dtype=common_pb2.DTYPE_FLOAT32, offset=0):
    return common_pb2.TensorChunk(name="blk", dtype=dtype, shape=list(shape), offset=offset)


def _values(*v):
    return memoryview(np.asarray(v, np.float32).tobytes())


@pytest.mark.parametrize(
    "chunks, reason",
    [
        ([(_chunk(dtype=common_pb2.DTYPE_FLOAT64), memoryview(np.ones(6).tobytes()))], "wrong_dtype"),
        ([(_chunk(shape=(6,)), _values(*range(6)))], "wrong_shape"),
        ([(_chunk(), memoryview(np.ones(6, np.float32).tobytes()[:-1]))], "truncated"),
        ([(_chunk(offset=3), _values(1, 2, 3))], "out_of_order"),
        ([(_chunk(), _values(*range(7)))], "too_long"),
        ([(_chunk(), _values(1, 2, np.nan, 4, 5, 6))], "not_finite"),
        ([(_chunk(), _values(*range(6))), (_chunk(offset=6), _values(1))], "repeated"),
    ],
)
def test_a_refused_block_says_which_and_why_as_data(chunks, reason):
    asm = Assembly("blk", (2, 3), 6, reduced=True)
    with pytest.raises(StoreError) as e:
        for c, payload in chunks:
            asm.add(c, payload, check_finite=True)
    assert (e.value.kind, e.value.block, e.value.reason) == ("invalid", "blk", reason)
    assert errors.reason_name(errors.reason_value(reason)) == reason


def test_incomplete_and_unknown_blocks_are_refused_with_their_reason():
    asm = Assembly("blk", (2, 3), 6)
    asm.add(_chunk(), _values(1, 2, 3), check_finite=True)
    with pytest.raises(StoreError) as e:
        asm.check_complete()
    assert (e.value.block, e.value.reason) == ("blk", "truncated")
    with pytest.raises(StoreError) as e:
        ShardStore().get("nope")
    assert (e.value.kind, e.value.block, e.value.reason) == ("not_found", "nope", "unknown_block")


def test_every_refusal_reason_has_a_name_and_back():
    for value in pb.RefusalReason.values():
        if value:
            assert errors.reason_value(errors.reason_name(value)) == value


class _Aborted(Exception):
    pass


class _Context:
    """The two ways a servicer context ends a call, recorded."""

    def abort(self, code, message):
        self.status = (code, message, ())
        raise _Aborted

    def abort_with_status(self, status):
        self.status = (status.code, status.details, status.trailing_metadata)
        raise _Aborted


class _FailedCall(grpc.RpcError):
    """What a client sees of that call."""

    def __init__(self, status):
        self._code, self._details, self._trailing = status

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


def test_a_push_refusal_travels_in_the_status_details():
    ctx = _Context()
    error = StoreError("invalid", "block 'b': gradient contains NaN or Inf", block="b", reason="not_finite")
    with pytest.raises(_Aborted):
        errors.abort(ctx, error, applied=["a"])
    assert ctx.status[0] == grpc.StatusCode.INVALID_ARGUMENT
    got = errors.refusal(_FailedCall(ctx.status))
    assert got is not None and list(got.applied) == ["a"]
    assert [(r.block, r.reason) for r in got.refused] == [("b", pb.REFUSAL_REASON_NOT_FINITE)]


def test_other_errors_carry_no_refusal():
    ctx = _Context()
    with pytest.raises(_Aborted):
        errors.abort(ctx, StoreError("exists", "block 'a' already exists"))
    assert ctx.status[0] == grpc.StatusCode.ALREADY_EXISTS
    assert errors.refusal(_FailedCall(ctx.status)) is None
