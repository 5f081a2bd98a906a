"""The partition plan: which tile of every layer each partition owns, what
halo of the layer below it needs, and how parameters are cut into blocks.

Layers are numbered in forward order: 0 is the input image, then each stage's
filter output, pool output and LCN output, as present (``stageN.filter``,
``stageN.pool``, ``stageN.lcn``). Every layer is cut into the same R x C grid
of tiles, each dimension as evenly as possible (sizes differ by at most one);
partition p = r * C + c owns tile (r, c) of every layer.

Regions are half-open (y0, y1, x0, x1) in a layer's global coordinates.

Halos. A partition computes the outputs of its own tile only, from a region
of the layer below (its *need*), read from the owners of that region:

* filter (field k, stride s) and pool (size p, stride s): the window of the
  tile, rows y0*s .. (y1-1)*s + k.
* LCN (radius r = size // 2): the tile grown by r, clipped to the map; its
  second Gaussian (of v^2) needs v grown by r again.

``halo="layer"`` exchanges before every sub-layer: the stage input before the
filter, the filter output before the pool, the pool output before the LCN
and the LCN's v before its variance. ``halo="stage"`` exchanges the filter
output once, wide enough to compute pool and LCN without further halos
(the pool is then computed on the tile grown by 2r, the LCN mean and v on the
tile grown by r: redundant work instead of two more rounds). The filter
always exchanges its own input: its untied weights belong to the locations'
owner, so a partition cannot compute its neighbours' filter outputs.

"layer" is the default. Measured on ``small`` (batch 16, float32): "layer"
sends 9-20% fewer halo bytes (2x2: 2.03 MB vs 2.41 MB a step) and computes
nothing twice; "stage" needs 22 synchronisation rounds a step instead of 32.
In one process the two take the same time within noise; over a network the
choice is latency per round against bandwidth, so both stay selectable.

Parameters are cut into blocks by the same tiles: see ``blocks``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy

from downpour.nn.network import Network
from downpour.nn.spec import NetworkSpec

from .regions import Region, bounds, contains, grow, intersect, window

HALO_MODES = ("layer", "stage")

# What an exchange carries; with the layer it forms the message's ``layer`` tag.
KINDS = (
    "act",  # activations of a layer (forward) or their gradients (backward)
    "v",  # the LCN's centred input v (forward) or its gradient (backward)
    "recon",  # partial TICA reconstructions, summed by the pixel's owner
    "drecon",  # reconstruction-error gradient, sent to the decoders that read it
    "sum",  # per-example partial sums: the LCN's mean sigma (c) and its gradient
    "param1",  # a tied stage's W1 gradient share, summed on partition 0
    "param2",  # a tied stage's W2 gradient share, summed on partition 0
    "logits",  # partial logits of the head, all-reduced
)


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Layer:
    index: int
    name: str  # "input", "stageN.filter", "stageN.pool", "stageN.lcn"
    shape: tuple[int, int, int]  # (C, H, W)
    tiles: tuple[Region, ...]  # by partition


@dataclass(frozen=True)
class StageLayers:
    """Layer indices of one stage; None where the stage lacks that part."""

    index: int  # 1-based, as in the block names
    input: int
    filter: int | None
    pool: int | None
    lcn: int | None

    @property
    def below_pool(self) -> int:
        """The layer that pooling (or the LCN, without pooling) reads."""
        return self.filter if self.filter is not None else self.input

    @property
    def below_lcn(self) -> int:
        return self.pool if self.pool is not None else self.below_pool

    @property
    def output(self) -> int:
        for v in (self.lcn, self.pool, self.filter):
            if v is not None:
                return v
        return self.input


class PartitionPlan:
    """Tiles, halos, exchange tags and parameter blocks of a rows x cols grid.

    ``needs[(layer, kind)][p]`` is the region of ``layer`` that partition p
    reads for that exchange; ``sources(layer, kind, p)`` says which partitions
    own which parts of it; ``sinks`` the reverse (where p's tile goes).
    """

    def __init__(self, spec: NetworkSpec, rows: int, cols: int, halo: str = "layer"):
        for what, v in (("rows", rows), ("cols", cols)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"partition grid {what}={v!r} must be an integer >= 1")
        if halo not in HALO_MODES:
            raise ValueError(f"halo={halo!r} is unknown; allowed: {', '.join(HALO_MODES)}")
        self.spec, self.rows, self.cols, self.halo = spec, rows, cols, halo
        self.partitions = rows * cols
        self.network = Network(spec)  # shapes only; allocates no parameters
        self.layers: list[Layer] = []
        self.stages: list[StageLayers] = []
        shapes = [spec.input] + [
            part.out_shape for st in self.network.stages for part in (st.filter, st.pool, st.lcn) if part is not None
        ]
        self.max_grid = (min(s[1] for s in shapes), min(s[2] for s in shapes))
        self._add_layer("input", spec.input)
        for st in self.network.stages:
            below = len(self.layers) - 1
            filt = pool = lcn = None
            if st.filter is not None:
                filt = self._add_layer(f"{st.name}.filter", st.filter.out_shape)
            if st.pool is not None:
                pool = self._add_layer(f"{st.name}.pool", st.pool.out_shape)
            if st.lcn is not None:
                lcn = self._add_layer(f"{st.name}.lcn", st.lcn.out_shape)
            self.stages.append(StageLayers(st.index, input=below, filter=filt, pool=pool, lcn=lcn))
        self.needs: dict[tuple[int, str], tuple[Region, ...]] = {}
        # Per stage: whether pool/LCN read a halo of the layer below them; a
        # filter alone does not (the next stage's filter may read that layer).
        self.reads_below: list[bool] = []
        for st, sl in zip(self.network.stages, self.stages):
            self._stage_needs(st, sl)
            self.reads_below.append(st.pool is not None or st.lcn is not None)

    # construction -------------------------------------------------------------
    def _add_layer(self, name: str, shape: tuple[int, int, int]) -> int:
        c, h, w = shape
        if self.rows > h or self.cols > w:
            raise ValueError(
                f"partitions {self.rows}x{self.cols} do not fit layer {name!r} of {h}x{w} locations: "
                f"every partition needs at least one row and one column of every layer; "
                f"allowed: at most {self.max_grid[0]}x{self.max_grid[1]} for this network"
            )
        rb, cb = bounds(h, self.rows), bounds(w, self.cols)
        tiles = tuple((rb[i], rb[i + 1], cb[j], cb[j + 1]) for i in range(self.rows) for j in range(self.cols))
        self.layers.append(Layer(len(self.layers), name, (c, h, w), tiles))
        return len(self.layers) - 1

    def _set(self, layer: int, kind: str, regions) -> None:
        key = (layer, kind)
        assert key not in self.needs, key
        self.needs[key] = tuple(regions)

    def _stage_needs(self, st, sl: StageLayers) -> None:
        def tiles(i):  # the stage's layers are set where its needs are read (None only for absent ones)
            return self.layers[i].tiles

        if sl.filter is not None:
            f = st.filter
            self._set(sl.input, "act", (window(t, f.k, f.s) for t in tiles(sl.filter)))
        below = sl.below_pool
        _, hb, wb = self.layers[below].shape
        r = st.lcn.size // 2 if st.lcn is not None else 0
        lcn = sl.lcn  # a layer index exactly when the stage has an LCN
        if lcn is not None:
            _, h, w = self.layers[lcn].shape
            lcn_tiles = tiles(lcn)
        if self.halo == "stage":
            # One exchange of the layer below the pool, wide enough for pool and LCN.
            if lcn is not None:
                out = [grow(t, 2 * r, h, w) for t in lcn_tiles]
            elif st.pool is not None:
                out = list(tiles(sl.pool))
            else:
                return  # a filter alone: its sparsity reads its own tile, no exchange
            if st.pool is not None:
                out = [window(o, st.pool.p, st.pool.s) for o in out]
            self._set(below, "act", out)
            return
        if st.pool is not None:
            self._set(below, "act", (window(t, st.pool.p, st.pool.s) for t in tiles(sl.pool)))
        if lcn is not None:
            self._set(sl.below_lcn, "act", (grow(t, r, h, w) for t in lcn_tiles))
            self._set(lcn, "v", (grow(t, r, h, w) for t in lcn_tiles))

    # queries ------------------------------------------------------------------
    def layer(self, key: int | str) -> Layer:
        if isinstance(key, str):
            for lay in self.layers:
                if lay.name == key:
                    return lay
            raise KeyError(f"no layer {key!r}; layers: {', '.join(x.name for x in self.layers)}")
        return self.layers[key]

    def tile(self, layer: int, p: int) -> Region:
        return self.layers[layer].tiles[p]

    def need(self, layer: int, kind: str, p: int) -> Region:
        return self.needs[(layer, kind)][p]

    def owners(self, layer: int, region: Region) -> list[tuple[int, Region]]:
        """(partition, part of ``region`` it owns), in partition order."""
        out = []
        for q, t in enumerate(self.layers[layer].tiles):
            ov = intersect(region, t)
            if ov is not None:
                out.append((q, ov))
        return out

    def sources(self, layer: int, kind: str, p: int) -> list[tuple[int, Region]]:
        """Who owns which part of p's need region (p itself included)."""
        return self.owners(layer, self.need(layer, kind, p))

    def sinks(self, layer: int, kind: str, p: int) -> list[tuple[int, Region]]:
        """Which partitions need which part of p's tile (p itself included)."""
        t = self.tile(layer, p)
        out = []
        for q, r in enumerate(self.needs[(layer, kind)]):
            ov = intersect(r, t)
            if ov is not None:
                out.append((q, ov))
        return out

    def exchanged(self, layer: int, kind: str) -> bool:
        """Whether some partition needs more of ``layer`` than its own tile."""
        return any(not contains(t, r) for t, r in zip(self.layers[layer].tiles, self.needs[(layer, kind)]))

    def tag(self, layer: int, kind: str) -> int:
        """The message ``layer`` field of an exchange: layer * len(KINDS) + kind."""
        return layer * len(KINDS) + KINDS.index(kind)

    def untag(self, tag: int) -> tuple[str, str]:
        """(layer name, kind) of a message's ``layer`` field."""
        return self.layers[tag // len(KINDS)].name, KINDS[tag % len(KINDS)]

    def activation_bytes(self, batch: int, itemsize: int) -> int:
        """Bytes of every layer's activations of a batch (the whole replica)."""
        return sum(int(numpy.prod(lay.shape)) for lay in self.layers) * batch * itemsize

    # parameter blocks ---------------------------------------------------------
    def block(self, name: str, p: int) -> str:
        """The block of parameter ``name`` that partition p owns."""
        return name if self.partitions == 1 else f"{name}[p={p}]"

    def _tied(self, name: str) -> bool:
        if name == "head.b":
            return True
        if name.startswith("stage") and not name.startswith("head"):
            st = self.network.stages[int(name[5 : name.index(".")]) - 1]
            return st.filter is not None and st.filter.tied
        return False

    def _split_layer(self, name: str) -> int:
        """The layer whose tiles cut parameter ``name``."""
        if name == "head.W":
            return self.stages[-1].output
        layer = self.stages[int(name[5 : name.index(".")]) - 1].filter
        if layer is None:  # a stage without a filter has no parameters
            raise KeyError(f"parameter {name!r} belongs to no filter layer")
        return layer

    def blocks_pushed(self, p: int) -> list[str]:
        """The blocks partition p owns: it pushes their gradients."""
        out = []
        for name in self.network.param_shapes():
            if self._tied(name):
                if p == 0:
                    out.append(name)
            else:
                out.append(self.block(name, p))
        return out

    def blocks_pulled(self, p: int) -> list[str]:
        """The blocks partition p reads: its own plus the tied stages' shared ones."""
        out = []
        for name in self.network.param_shapes():
            if self._tied(name):
                if name != "head.b" or p == 0:
                    out.append(name)
            else:
                out.append(self.block(name, p))
        return out


def plan(spec: NetworkSpec, rows: int, cols: int, halo: str = "layer") -> PartitionPlan:
    """Cut every layer of ``spec`` into a rows x cols grid (see the module doc)."""
    return PartitionPlan(spec, rows, cols, halo)
