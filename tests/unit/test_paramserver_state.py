"""Shard state without gRPC: placement, dedup, atomic verified checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from downpour.checkpoint import shardfile as ckpt
from downpour.paramserver.client import balanced_placement
from downpour.paramserver.store import OptimizerConfig, ShardStore


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
