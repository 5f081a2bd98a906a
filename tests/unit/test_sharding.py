"""Replica shards: disjoint, covering, deterministic; endless seeded epochs."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from downpour.feeder.sharding import batches, epoch_order, epochs, shard_indices


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 500), r=st.integers(1, 40), seed=st.one_of(st.none(), st.integers(0, 2**32 - 1)))
def test_shards_are_disjoint_cover_and_balanced(n, r, seed):
    shards = [shard_indices(n, i, r, seed) for i in range(r)]
    allidx = np.concatenate(shards)
    assert len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert all(np.array_equal(s, shard_indices(n, i, r, seed)) for i, s in enumerate(shards))


def test_plain_striding_without_seed():
    assert shard_indices(10, 1, 3, seed=None).tolist() == [1, 4, 7]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="replica"):
        shard_indices(10, 3, 3)
    with pytest.raises(ValueError, match="num_replicas"):
        shard_indices(10, 0, 0)
    with pytest.raises(ValueError, match="empty shard"):
        next(epochs(np.array([], np.int64)))
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(np.arange(3), 0))


def test_epochs_are_permutations_reproducible_and_differ():
    shard = shard_indices(100, 2, 4)
    it = epochs(shard, seed=5, replica=2)
    e0, e1 = next(it), next(it)
    assert np.array_equal(np.sort(e0), shard) and np.array_equal(np.sort(e1), shard)
    assert not np.array_equal(e0, e1)
    assert np.array_equal(e1, epoch_order(shard, 1, seed=5, replica=2))
    assert np.array_equal(next(epochs(shard, seed=5, replica=2, start_epoch=1)), e1)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 60), bs=st.integers(1, 25))
def test_batches_are_full_and_visit_each_example_once_per_epoch(n, bs):
    shard = np.arange(100, 100 + n)
    it = batches(shard, bs, seed=1)
    stream = np.concatenate([next(it) for _ in range((3 * n) // bs + 2)])
    assert all(len(b) == bs for b in [next(it) for _ in range(3)])
    for e in range(len(stream) // n):
        assert np.array_equal(np.sort(stream[e * n : (e + 1) * n]), shard)
    # resuming at (epoch, position) continues the same stream
    k = min(n - 1, 3)
    resumed = batches(shard, bs, seed=1, start_epoch=0, start_position=k)
    assert np.array_equal(next(resumed), stream[k : k + bs])
