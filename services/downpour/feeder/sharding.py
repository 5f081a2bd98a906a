"""Which examples each model replica sees: disjoint shards, shuffled epochs.

Replica r of R gets every R-th index of a seeded permutation of range(n):
shards are disjoint, cover every index, differ in size by at most one, and
do not depend on anything but (n, r, R, seed), so a restarted feeder hands
a replica the same shard. Within a shard, epoch e is a permutation drawn from
a generator seeded by (seed, r, e): any epoch can be recomputed on its own,
which lets a stream resume at (epoch, position) without replaying the past.

    shard = shard_indices(len(ds), replica=0, num_replicas=4, seed=0)
    for batch in batches(shard, batch_size=64, seed=0):
        x, y = ds.get(batch)
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def shard_indices(n: int, replica: int, num_replicas: int, seed: int | None = 0) -> np.ndarray:
    """The sorted indices of ``range(n)`` that belong to ``replica`` of ``num_replicas``.

    With ``seed=None`` the split is plain striding (``r, r + R, ...``);
    otherwise striding over a permutation seeded by ``seed``, so that data
    stored in order (e.g. by class) spreads evenly across replicas.
    """
    if n < 0:
        raise ValueError(f"dataset size must be >= 0, got {n}")
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= replica < num_replicas:
        raise ValueError(f"replica must be in [0, {num_replicas}), got {replica}")
    order = np.arange(n, dtype=np.int64) if seed is None else np.random.default_rng(seed).permutation(n)
    return np.sort(order[replica::num_replicas])


def epoch_order(shard: np.ndarray, epoch: int, seed: int = 0, replica: int = 0) -> np.ndarray:
    """The shard's indices in the shuffled order of ``epoch``."""
    rng = np.random.default_rng([seed, replica, epoch])
    return np.asarray(shard, dtype=np.int64)[rng.permutation(len(shard))]


def epochs(shard: np.ndarray, seed: int = 0, replica: int = 0, start_epoch: int = 0) -> Iterator[np.ndarray]:
    """Endless shuffled passes over ``shard``: one permutation per epoch."""
    if len(shard) == 0:
        raise ValueError("cannot iterate over an empty shard: more replicas than examples?")
    epoch = start_epoch
    while True:
        yield epoch_order(shard, epoch, seed, replica)
        epoch += 1


def batches(
    shard: np.ndarray, batch_size: int, seed: int = 0, replica: int = 0, start_epoch: int = 0, start_position: int = 0
) -> Iterator[np.ndarray]:
    """Endless minibatches of indices from shuffled epochs over ``shard``.

    Every batch is full: a batch that reaches the end of an epoch is completed
    from the next one, so each example is seen once per epoch and no batch is
    short. ``start_epoch``/``start_position`` resume a stream where it stopped.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stream = epochs(shard, seed, replica, start_epoch)
    buf = next(stream)[start_position:]
    while True:
        while len(buf) < batch_size:
            buf = np.concatenate([buf, next(stream)])
        yield buf[:batch_size]
        buf = buf[batch_size:]
