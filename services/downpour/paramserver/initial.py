"""A shard's own initial blocks: drawn from the job's seed, or read from ``init_from``.

The coordinator only tells each shard which blocks it owns (InitBlocks); the
shard makes their values itself, one block at a time, so no process ever
holds the whole model. Fresh values come from ``downpour.nn.init`` (per
parameter and location row: the same for any shard count, placement or
partition grid, and the same as ``Network.init_params``).

With ``init_from`` (a checkpoint directory of another job), a block whose
parameter the checkpoint has under the same name and shape takes its values
from there (``downpour.checkpoint.initfrom``: only the checkpoint blocks that
overlap this block's tile are read, each verified against its crc32).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from downpour import config as jobconfig
from downpour.checkpoint.errors import CheckpointError
from downpour.checkpoint.initfrom import CheckpointReader
from downpour.checkpoint.layout import job_blocks
from downpour.nn import init as nninit


class InitError(Exception):
    """A request that cannot be served: ``kind`` is "invalid" or "precondition"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def make_blocks(
    job_yaml: str, names: list[str], admit: Callable[[dict[str, int]], None] | None = None
) -> Iterator[tuple[str, tuple[int], np.ndarray, bool]]:
    """Yield (name, shape, values, from_checkpoint) for each of ``names``, one block at a time.

    Blocks are flat (shape (n,)), as ``Network.init_params`` gives them and checkpoints hold them.
    ``admit`` sees every block's number of values before anything is allocated, and may refuse
    them all by raising."""
    try:
        cfg = jobconfig.from_yaml(job_yaml)
        net, blocks = job_blocks(cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise InitError("invalid", f"job spec: {e}") from None
    unknown = [n for n in names if n not in blocks]
    if unknown:
        raise InitError("invalid", f"the job has no block {unknown[0]!r} ({len(unknown)} unknown)")
    if admit is not None:
        admit({n: int(np.prod(blocks[n].shape, dtype=object)) for n in names})  # Python ints: no overflow
    lays = nninit.layouts(net)
    try:
        ck = CheckpointReader(cfg.init_from) if cfg.init_from else None
    except CheckpointError as e:  # none there, or unusable: the request cannot be served as it stands
        raise InitError("precondition", str(e)) from None
    if ck is not None:
        for name, shape in ck.shapes.items():
            if name in lays and tuple(shape) != tuple(lays[name].shape):
                raise InitError(
                    "precondition",
                    f"init_from={cfg.init_from}: block {name!r} has shape {tuple(shape)} "
                    f"there but {lays[name].shape} in this model",
                )
    for name in names:
        b = blocks[name]
        lay = lays[b.param]
        vals = np.empty(int(np.prod(b.shape, dtype=np.int64)), np.float32)
        if ck is not None and b.param in ck.shapes:
            try:
                ck.fill(lay, b.tile, vals)
            except CheckpointError as e:
                raise InitError("precondition", str(e)) from None
            yield name, (vals.size,), vals, True
        else:
            yield name, (vals.size,), nninit.values(lay, cfg.seed, b.tile, out=vals), False
