"""Parameter blocks of a partition plan: their shapes, and cutting full
parameters into blocks and joining them back.

Parameters. An untied stage's ``stageN.W1`` (L, M, K) and ``stageN.W2``
(L, K, M), with location l = i * Wo + j, are cut by the tile of the filter
output: block ``stageN.W1[p=K]`` holds the rows of partition K's locations in
row-major tile order, shape (tile_h * tile_w, M, K). A tied (convolution)
stage keeps one block ``stageN.W1``: every partition pulls it and computes its
locations' share of the gradient; the shares are summed on partition 0, which
alone pushes it. The head ``head.W`` (classes, H*W*C over the last layer in
(H, W, C) order) is cut by columns into ``head.W[p=K]`` of shape
(classes, tile_h * tile_w * C); ``head.b`` belongs to partition 0, which adds
it to its partial logits. A 1x1 plan keeps the unpartitioned names, so a job
without model parallelism has the same blocks as ``Network``.
"""

from __future__ import annotations

import numpy

from downpour.nn.backend import of as array_module

from .plan import PartitionPlan
from .regions import size


def block_shapes(pl: PartitionPlan) -> dict[str, tuple[int, ...]]:
    """Every block's (logical) shape; blocks themselves are flat like ``Network``'s."""
    full = pl.network.param_shapes()
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in full.items():
        if pl._tied(name):
            out[name] = tuple(shape)
            continue
        lay = pl.layers[pl._split_layer(name)]
        c = lay.shape[0]
        for p, t in enumerate(lay.tiles):
            h, w = size(t)
            if name == "head.W":
                out[pl.block(name, p)] = (shape[0], h * w * c)
            else:
                out[pl.block(name, p)] = (h * w, *shape[1:])
    return out


def _grid_view(pl: PartitionPlan, name: str, arr, shape):
    """A parameter viewed with its location axes as the split layer's (H, W)."""
    lay = pl.layers[pl._split_layer(name)]
    c, h, w = lay.shape
    if name == "head.W":
        return arr.reshape(shape[0], h, w, c), (1, 2)
    return arr.reshape(h, w, *shape[1:]), (0, 1)


def split_params(pl: PartitionPlan, full: dict) -> dict:
    """Full parameters (as ``Network.init_params``) -> blocks by name (flat copies)."""
    shapes = pl.network.param_shapes()
    missing = [k for k in shapes if k not in full]
    if missing:
        raise KeyError(f"missing parameter(s): {', '.join(missing)}")
    out = {}
    for name, shape in shapes.items():
        arr = full[name]
        if arr.size != int(numpy.prod(shape)):
            raise ValueError(f"parameter {name!r} has {arr.size} values; expected {int(numpy.prod(shape))}")
        if pl._tied(name):
            out[name] = arr.reshape(-1).copy()
            continue
        g, axes = _grid_view(pl, name, arr, shape)
        for p, (y0, y1, x0, x1) in enumerate(pl.layers[pl._split_layer(name)].tiles):
            if axes == (0, 1):
                part = g[y0:y1, x0:x1]
            else:
                part = g[:, y0:y1, x0:x1]
            out[pl.block(name, p)] = part.reshape(-1).copy()
    return out


def join_params(pl: PartitionPlan, blocks: dict, partial: bool = False) -> dict:
    """Blocks by name -> full parameters (flat), the inverse of ``split_params``.

    With ``partial`` a parameter none of whose blocks is given is left out
    (gradients of the TICA objective have no head), but never half of one.
    """
    shapes = pl.network.param_shapes()
    bshapes = block_shapes(pl)
    of_param = {
        name: [pl.block(name, p) for p in range(pl.partitions)] if not pl._tied(name) else [name] for name in shapes
    }
    if partial:
        shapes = {k: v for k, v in shapes.items() if any(b in blocks for b in of_param[k])}
    missing = [b for name in shapes for b in of_param[name] if b not in blocks]
    if missing:
        raise KeyError(f"missing block(s): {', '.join(missing)}")
    out = {}
    for name, shape in shapes.items():
        if pl._tied(name):
            out[name] = blocks[name].reshape(-1).copy()
            continue
        first = blocks[pl.block(name, 0)]
        xp = array_module(first)
        full = xp.empty(int(numpy.prod(shape)), dtype=first.dtype)
        g, axes = _grid_view(pl, name, full, shape)
        for p, (y0, y1, x0, x1) in enumerate(pl.layers[pl._split_layer(name)].tiles):
            b = blocks[pl.block(name, p)]
            want = bshapes[pl.block(name, p)]
            if b.size != int(numpy.prod(want)):
                raise ValueError(f"block {pl.block(name, p)!r} has {b.size} values; expected {int(numpy.prod(want))}")
            if axes == (0, 1):
                g[y0:y1, x0:x1] = b.reshape(y1 - y0, x1 - x0, *shape[1:])
            else:
                g[:, y0:y1, x0:x1] = b.reshape(shape[0], y1 - y0, x1 - x0, -1)
        out[name] = full
    return out
