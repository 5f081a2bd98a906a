"""Initial parameter values, drawn per location row from (seed, parameter name, row).

Every process that needs initial values draws them here: ``Network.init_params``
for in-process use, and each parameter shard for the blocks it owns. A
parameter whose values are laid out over a layer's output locations (an
untied filter's encoder and decoder, the head over the last stage) is drawn
one row of locations at a time, each row from its own stream::

    numpy.random.Generator(PCG64(SeedSequence([seed, crc32(name), row])))

so any tile of it (a model-parallel partition's block) is drawn from the rows
it covers alone, in bounded memory, and has the same values whatever the
partition grid, the number of shards or the placement. Tied filters (one
weight set) are one stream; biases start at zero. Values are drawn in float32
directly: nothing of a parameter's size is ever held in float64.

Scales: encoders 1/sqrt(K) for unit-variance responses at the start; decoders
start small, 1/sqrt(M * overlap * K), scaled by how many locations overlap on
each input pixel; the head 1/sqrt(features).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy

Tile = tuple[int, int, int, int]  # (y0, y1, x0, x1) over the parameter's location grid


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter's values are laid out and scaled.

    ``grid`` (H, W) of locations when the values follow a layer's locations,
    else None; ``lead`` the axes before the location axes (the head's classes),
    ``cell`` the shape of one location's values; ``std`` 0 means zeros.
    """

    name: str
    shape: tuple[int, ...]
    grid: tuple[int, int] | None
    lead: tuple[int, ...]
    cell: tuple[int, ...]
    std: float


def layouts(net) -> dict[str, ParamLayout]:
    """Every parameter of a ``Network``: its layout and initial scale."""
    out: dict[str, ParamLayout] = {}
    shapes = net.param_shapes()
    for st in net.stages:
        f = st.filter
        if f is None:
            continue
        overlap = max(1, -(-f.k // f.s)) ** 2
        grid = None if f.tied else (f.Ho, f.Wo)
        for key, shape, std in (
            (f"{st.name}.W1", f.weight_shape, 1 / numpy.sqrt(f.K)),
            (f"{st.name}.W2", f.decoder_shape, 1 / numpy.sqrt(f.M * overlap * f.K)),
        ):
            if key in shapes:  # a tied decoder (W2 = W1^T) has no block of its own
                out[key] = ParamLayout(key, tuple(shape), grid, (), tuple(shape[1:]), float(std))
    if net.spec.classes:
        c, h, w = net.out_shape
        n = net.spec.classes
        out["head.W"] = ParamLayout(
            "head.W", (n, net.features), (h, w), (n,), (c,), float(1 / numpy.sqrt(net.features))
        )
        out["head.b"] = ParamLayout("head.b", (n,), None, (), (n,), 0.0)
    return out


def _stream(seed: int, name: str, row: int) -> numpy.random.Generator:
    return numpy.random.Generator(
        numpy.random.PCG64(numpy.random.SeedSequence([int(seed), zlib.crc32(name.encode()), row]))
    )


def values(lay: ParamLayout, seed: int, tile: Tile | None = None, out: numpy.ndarray | None = None) -> numpy.ndarray:
    """The initial values of parameter ``lay`` (flat float32), or of one ``tile`` of its location grid.

    A tile's values are laid out as the partition blocks are (``partition.split_params``):
    (y, x, cell) for a filter's weights, (lead, y, x, cell) for the head.
    """
    lead, cell = int(numpy.prod(lay.lead, dtype=numpy.int64)), int(numpy.prod(lay.cell, dtype=numpy.int64))
    if lay.grid is None:
        if tile is not None:
            raise ValueError(f"parameter {lay.name!r} is not laid out over locations: it has no tiles")
        n = int(numpy.prod(lay.shape, dtype=numpy.int64))
        res = out if out is not None else numpy.empty(n, numpy.float32)
        if lay.std == 0:
            res[:] = 0
        else:
            _stream(seed, lay.name, 0).standard_normal(n, dtype=numpy.float32, out=res)
            res *= numpy.float32(lay.std)
        return res
    H, W = lay.grid
    y0, y1, x0, x1 = tile if tile is not None else (0, H, 0, W)
    if not (0 <= y0 < y1 <= H and 0 <= x0 < x1 <= W):
        raise ValueError(f"tile {(y0, y1, x0, x1)} is outside parameter {lay.name!r}'s {H}x{W} locations")
    n = lead * (y1 - y0) * (x1 - x0) * cell
    res = out if out is not None else numpy.empty(n, numpy.float32)
    view = res.reshape(lead, y1 - y0, x1 - x0, cell)
    row = numpy.empty(lead * W * cell, numpy.float32)  # one row of locations at a time: bounded memory
    for y in range(y0, y1):
        _stream(seed, lay.name, y + 1).standard_normal(row.size, dtype=numpy.float32, out=row)
        view[:, y - y0] = row.reshape(lead, W, cell)[:, x0:x1]
    res *= numpy.float32(lay.std)
    return res
