"""A shard's own initial blocks: drawn from the job's seed, or read from ``init_from``.

The coordinator only tells each shard which blocks it owns (InitBlocks); the
shard makes their values itself, one block at a time, so no process ever
holds the whole model. Fresh values come from ``downpour.nn.init`` (per
parameter and location row: the same for any shard count, placement or
partition grid, and the same as ``Network.init_params``).

With ``init_from`` (a checkpoint directory of another job), a block whose
parameter the checkpoint has under the same name and shape takes its values
from there: only the checkpoint blocks that overlap this block's tile are
read, each verified against its crc32, whatever grid the other job had.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import numpy as np

from downpour import checkpoints as cks
from downpour import config as jobconfig
from downpour.nn import Network
from downpour.nn import init as nninit


class InitError(Exception):
    """A request that cannot be served: ``kind`` is "invalid" or "precondition"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class BlockSource:
    """Block ``name`` is ``tile`` (None: all) of parameter ``param``."""

    name: str
    param: str
    shape: tuple[int, ...]
    tile: tuple[int, int, int, int] | None


def job_blocks(cfg: jobconfig.JobConfig) -> tuple[Network, dict[str, BlockSource]]:
    """Every block of a job: which parameter (and which tile of it) it is."""
    net = Network(cfg.network_spec())
    rows, cols = cfg.grid()
    if rows * cols == 1:
        return net, {k: BlockSource(k, k, tuple(s), None) for k, s in net.param_shapes().items()}
    from downpour.partition import block_shapes, plan

    pl = plan(cfg.network_spec(), rows, cols)
    shapes = block_shapes(pl)
    out = {}
    for name, shape in shapes.items():
        if "[p=" in name:
            param, p = name[:name.index("[p=")], int(name[name.index("[p=") + 3:-1])
            out[name] = BlockSource(name, param, tuple(shape), pl.layers[pl._split_layer(param)].tiles[p])
        else:
            out[name] = BlockSource(name, name, tuple(shape), None)
    return net, out


class _Checkpoint:
    """The blocks of one committed checkpoint, read one block at a time on demand."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        m = cks.newest_valid(directory)
        if m is None:
            raise InitError("precondition", f"init_from={directory}: no committed checkpoint whose files verify there")
        self.manifest = m
        try:
            self.cfg = jobconfig.from_yaml(m["config"])
            self.net, self.blocks = job_blocks(self.cfg)
        except (KeyError, ValueError) as e:
            raise InitError("precondition", f"init_from={directory}: checkpoint {m['checkpoint_id']} has no usable "
                                            f"job spec: {e}") from None
        self.shapes = self.net.param_shapes()
        self._where: dict[str, tuple[str, int, int, int]] = {}  # block -> (file, offset, crc32, size)
        for part in m["shards"]:
            path = str(cks.shard_file(directory, m, part))
            try:
                hdr = cks.read_header(path)
            except (OSError, cks.CheckpointInvalid) as e:
                raise InitError("precondition", f"init_from={directory}: {e}") from None
            with open(path, "rb") as f:
                f.seek(8)
                hlen = int.from_bytes(f.read(8), "little")
            pos = 8 + 8 + hlen + 4  # magic, header length, header, its crc32
            for b in hdr["blocks"]:
                n = int(np.prod(b["shape"], dtype=np.int64)) if b["shape"] else 1
                self._where[b["name"]] = (path, pos, int(b["crc32_w"]), n)
                pos += 8 * n  # weights, then the accumulator

    def weights(self, block: str) -> np.ndarray:
        path, pos, crc, n = self._where[block]
        with open(path, "rb") as f:
            f.seek(pos)
            raw = f.read(4 * n)
        if len(raw) != 4 * n or zlib.crc32(raw) != crc:
            raise InitError("precondition", f"init_from={self.dir}: block {block!r} in {path} is truncated or "
                                            "corrupt (crc32 mismatch)")
        return np.frombuffer(raw, dtype="<f4")

    def fill(self, lay: nninit.ParamLayout, tile, out: np.ndarray) -> None:
        """``out`` = ``tile`` of parameter ``lay`` as the checkpoint has it, from the blocks overlapping it."""
        mine = [b for b in self.blocks.values() if b.param == lay.name]
        if lay.grid is None or tile is None and len(mine) == 1 and mine[0].tile is None:
            if len(mine) != 1 or mine[0].tile is not None:
                raise InitError("precondition", f"init_from={self.dir}: parameter {lay.name!r} is cut differently")
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
            dst[:, iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = src[:, iy0 - by0:iy1 - by0, ix0 - bx0:ix1 - bx0]


def check_init_from(cfg: jobconfig.JobConfig) -> tuple[list[str], dict]:
    """The parameters ``cfg`` takes from its ``init_from`` checkpoint, and its manifest.

    Reads file headers only. Raises ValueError naming the problem when the checkpoint cannot be
    used: none valid, a shared name with another shape (another model), nothing shared at all
    (a job must never silently start from scratch instead).
    """
    try:
        ck = _Checkpoint(os.fspath(cfg.init_from))
    except InitError as e:
        raise ValueError(str(e)) from None
    mine = Network(cfg.network_spec()).param_shapes()
    taken = []
    for name, shape in ck.shapes.items():
        if name not in mine:
            continue
        if int(np.prod(shape)) != int(np.prod(mine[name])) or tuple(shape) != tuple(mine[name]):
            raise ValueError(f"init_from={cfg.init_from}: block {name!r} has shape {tuple(shape)} in checkpoint "
                             f"{ck.manifest['checkpoint_id']} but {tuple(mine[name])} in this model")
        taken.append(name)
    if not taken:
        old = sorted(ck.shapes)
        raise ValueError(f"init_from={cfg.init_from}: checkpoint {ck.manifest['checkpoint_id']} shares no block with "
                         f"this model (it has {', '.join(old[:4])}{', ...' if len(old) > 4 else ''})")
    return sorted(taken), ck.manifest


def make_blocks(job_yaml: str, names: list[str]):
    """Yield (name, shape, values, from_checkpoint) for each of ``names``, one block at a time.

    Blocks are flat (shape (n,)), as ``Network.init_params`` gives them and checkpoints hold them."""
    try:
        cfg = jobconfig.from_yaml(job_yaml)
        net, blocks = job_blocks(cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise InitError("invalid", f"job spec: {e}") from None
    unknown = [n for n in names if n not in blocks]
    if unknown:
        raise InitError("invalid", f"the job has no block {unknown[0]!r} ({len(unknown)} unknown)")
    lays = nninit.layouts(net)
    ck = None
    if cfg.init_from:
        ck = _Checkpoint(cfg.init_from)
        for name, shape in ck.shapes.items():
            if name in lays and tuple(shape) != tuple(lays[name].shape):
                raise InitError("precondition", f"init_from={cfg.init_from}: block {name!r} has shape {tuple(shape)} "
                                                f"there but {lays[name].shape} in this model")
    for name in names:
        b = blocks[name]
        lay = lays[b.param]
        vals = np.empty(int(np.prod(b.shape, dtype=np.int64)), np.float32)
        if ck is not None and b.param in ck.shapes:
            ck.fill(lay, b.tile, vals)
            yield name, (vals.size,), vals, True
        else:
            yield name, (vals.size,), nninit.values(lay, cfg.seed, b.tile, out=vals), False
