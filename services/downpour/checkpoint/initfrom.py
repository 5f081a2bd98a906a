"""``init_from``: another job's committed checkpoint read one block at a time, whatever its grid.

A new job's shards each make their own blocks (``paramserver.initial``); a block
whose parameter the checkpoint has under the same name and shape takes its
values from there. Only the checkpoint blocks that overlap the block's tile are
read, each verified against its crc32, so no process ever holds the whole model.
The coordinator calls ``check_init_from`` first, on the files' headers only, to
refuse a checkpoint that cannot be used before anything starts.
"""

from __future__ import annotations

import os

import numpy as np

from downpour import config as jobconfig
from downpour.checkpoint import shardfile
from downpour.checkpoint.errors import CheckpointInvalid, CheckpointNotFound
from downpour.checkpoint.layout import BlockSource, job_blocks
from downpour.checkpoint.manifest import newest_valid, shard_file
from downpour.nn import Network
from downpour.nn import init as nninit


class CheckpointReader:
    """The blocks of the newest valid checkpoint in a folder, read one block at a time on demand.

    Raises ``CheckpointNotFound`` when there is none, ``CheckpointInvalid`` when its job spec or
    a file cannot be used; every message starts with ``init_from=<folder>``.
    """

    def __init__(self, directory: str) -> None:
        self.dir = directory
        m = newest_valid(directory)
        if m is None:
            raise CheckpointNotFound(f"init_from={directory}: no committed checkpoint whose files verify there")
        self.manifest = m
        try:
            self.cfg = jobconfig.from_yaml(m["config"])
            self.net, self.blocks = job_blocks(self.cfg)
        except (KeyError, ValueError) as e:
            raise CheckpointInvalid(
                f"init_from={directory}: checkpoint {m['checkpoint_id']} has no usable job spec: {e}"
            ) from None
        self.shapes = self.net.param_shapes()
        self._where: dict[str, tuple[str, int, int, int]] = {}  # block -> (file, offset, crc32, size)
        for part in m["shards"]:
            path = str(shard_file(directory, m, part))
            try:
                offsets = shardfile.block_offsets(path)
            except (OSError, CheckpointInvalid) as e:
                raise CheckpointInvalid(f"init_from={directory}: {e}") from None
            for name, (pos, crc, n) in offsets.items():
                self._where[name] = (path, pos, crc, n)

    def weights(self, block: str) -> np.ndarray:
        path, pos, crc, n = self._where[block]
        w = shardfile.read_weights(path, pos, crc, n)
        if w is None:
            raise CheckpointInvalid(
                f"init_from={self.dir}: block {block!r} in {path} is truncated or corrupt (crc32 mismatch)"
            )
        return w

    def fill(self, lay: nninit.ParamLayout, tile: tuple[int, int, int, int] | None, out: np.ndarray) -> None:
        """``out`` = ``tile`` of parameter ``lay`` as the checkpoint has it, from the blocks overlapping it."""
        mine: list[BlockSource] = [b for b in self.blocks.values() if b.param == lay.name]
        if lay.grid is None or tile is None and len(mine) == 1 and mine[0].tile is None:
            if len(mine) != 1 or mine[0].tile is not None:
                raise CheckpointInvalid(f"init_from={self.dir}: parameter {lay.name!r} is cut differently")
            out[:] = self.weights(mine[0].name)
            return
        H, W = lay.grid
        y0, y1, x0, x1 = tile if tile is not None else (0, H, 0, W)
        lead, cell = int(np.prod(lay.lead, dtype=np.int64)), int(np.prod(lay.cell, dtype=np.int64))
        dst = out.reshape(lead, y1 - y0, x1 - x0, cell)
        for b in mine:
            by0, by1, bx0, bx1 = b.tile if b.tile is not None else (0, H, 0, W)
            iy0, iy1, ix0, ix1 = max(y0, by0), min(y1, by1), max(x0, bx0), min(x1, bx1)
            if iy0 >= iy1 or ix0 >= ix1:
                continue
            src = self.weights(b.name).reshape(lead, by1 - by0, bx1 - bx0, cell)
            dst[:, iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = src[:, iy0 - by0 : iy1 - by0, ix0 - bx0 : ix1 - bx0]


def check_init_from(cfg: jobconfig.JobConfig) -> tuple[list[str], dict]:
    """The parameters ``cfg`` takes from its ``init_from`` checkpoint, and its manifest.

    Reads file headers only. Raises ValueError naming the problem when the checkpoint cannot be
    used: none valid, a shared name with another shape (another model), nothing shared at all
    (a job must never silently start from scratch instead).
    """
    try:
        ck = CheckpointReader(os.fspath(cfg.init_from))
    except (CheckpointNotFound, CheckpointInvalid) as e:
        raise ValueError(str(e)) from None
    mine = Network(cfg.network_spec()).param_shapes()
    taken = []
    for name, shape in ck.shapes.items():
        if name not in mine:
            continue
        if int(np.prod(shape)) != int(np.prod(mine[name])) or tuple(shape) != tuple(mine[name]):
            raise ValueError(
                f"init_from={cfg.init_from}: block {name!r} has shape {tuple(shape)} in checkpoint "
                f"{ck.manifest['checkpoint_id']} but {tuple(mine[name])} in this model"
            )
        taken.append(name)
    if not taken:
        old = sorted(ck.shapes)
        raise ValueError(
            f"init_from={cfg.init_from}: checkpoint {ck.manifest['checkpoint_id']} shares no block with "
            f"this model (it has {', '.join(old[:4])}{', ...' if len(old) > 4 else ''})"
        )
    return sorted(taken), ck.manifest
