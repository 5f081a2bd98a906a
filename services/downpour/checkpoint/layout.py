"""How a job's parameters are cut into blocks: the names checkpoints and shards hold.

Without a partition grid a block is a whole parameter (``stage1.W1``); with one,
every partition owns its own block of each split layer (``stage1.W1[p=3]``, a
tile of the parameter's location grid).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from downpour import config as jobconfig
from downpour.nn import Network
from downpour.partition import block_shapes, join_params, plan


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
    pl = plan(cfg.network_spec(), rows, cols)
    out = {}
    for name, shape in block_shapes(pl).items():
        if "[p=" in name:
            param, p = name[: name.index("[p=")], int(name[name.index("[p=") + 3 : -1])
            out[name] = BlockSource(name, param, tuple(shape), pl.layers[pl._split_layer(param)].tiles[p])
        else:
            out[name] = BlockSource(name, name, tuple(shape), None)
    return net, out


def block_layout(cfg: jobconfig.JobConfig) -> tuple[dict[str, int], Callable[[dict], dict]]:
    """(block name -> size, blocks -> full parameters) of a job: with a partition grid, every
    partition owns its own block of each layer (``stage1.W1[p=3]``), joined back here."""
    spec = cfg.network_spec()
    rows, cols = cfg.grid()
    if rows * cols == 1:
        return Network(spec).block_sizes(), dict
    pl = plan(spec, rows, cols)
    sizes = {k: int(np.prod(v)) for k, v in block_shapes(pl).items()}
    return sizes, lambda blocks: join_params(pl, blocks)
