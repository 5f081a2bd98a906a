"""All partitions of one replica in one process, run in lockstep.

``LocalReplica`` drives one ``PartitionRuntime`` generator per partition,
routing every ``Exchange``'s messages to their addressees, and joins the
tiles back into whole layers; ``ExchangeStats`` counts what crossed
partitions. Tests and benchmarks use it; the worker carries the same
messages over the network instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import numpy

from downpour.nn.network import is_term, to_external, to_internal

from .halo import HALO_KINDS, Halo
from .plan import PartitionPlan
from .runtime import PartitionResult, PartitionRuntime


@dataclass
class ExchangeStats:
    """What one step sent between the partitions of a replica."""

    rounds: int = 0  # exchanges (synchronisation points)
    messages: int = 0
    bytes: dict = field(default_factory=dict)  # (direction, kind) -> bytes
    activation_bytes: int = 0  # every layer's activations of the batch, whole replica

    @property
    def halo_bytes(self) -> int:
        """Spatial halos and their gradients, both directions."""
        return sum(v for (_, k), v in self.bytes.items() if k in HALO_KINDS)

    @property
    def reduce_bytes(self) -> int:
        return sum(v for (_, k), v in self.bytes.items() if k not in HALO_KINDS)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def halo_fraction(self) -> float:
        """Halo bytes / activation bytes: how much of the activations crossed partitions."""
        return self.halo_bytes / self.activation_bytes if self.activation_bytes else 0.0


@dataclass
class ReplicaResult:
    loss: float
    grads: dict  # by block
    info: dict
    acts: dict  # layer name (and stageN.output) -> whole layer (B, C, H, W)
    dx: object  # (B, C, H, W) or None
    stats: ExchangeStats
    partitions: list  # the PartitionResults


class LocalReplica:
    """All partitions of one replica in one process, run in lockstep."""

    def __init__(
        self, plan: PartitionPlan, xp: ModuleType = numpy, dtype=numpy.float32, replica: int = 0, generation: int = 0
    ):
        self.plan, self.xp, self.dtype = plan, xp, numpy.dtype(dtype)
        self.runtimes = [PartitionRuntime(plan, p, xp, dtype, replica, generation) for p in range(plan.partitions)]

    def _blocks(self, blocks: dict, p: int) -> dict:
        names = self.plan.blocks_pulled(p)
        missing = [k for k in names if k not in blocks]
        if missing:
            raise KeyError(f"missing block(s) for partition {p}: {', '.join(missing)}")
        return {k: self.xp.asarray(blocks[k]) for k in names}

    def _tiles(self, x):
        c, h, w = self.plan.spec.input
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
            raise ValueError(f"input batch must have shape (B, {c}, {h}, {w}), got {tuple(x.shape)}")
        full = to_internal(self.xp, self.xp.asarray(x, dtype=self.dtype))
        return [full[t[0] : t[1], t[2] : t[3]].copy() for t in self.plan.layers[0].tiles]

    def run(self, gens) -> tuple[list[PartitionResult], ExchangeStats]:
        """Drive generators (one per partition) to the end, routing their messages."""
        n = len(gens)
        stats = ExchangeStats()
        pending: list = [None] * n
        results: list = [None] * n
        done = [False] * n

        def advance(i, inbox):
            try:
                pending[i] = gens[i].send(inbox)
            except StopIteration as stop:
                results[i], done[i], pending[i] = stop.value, True, None

        for i in range(n):
            advance(i, None)
        while not all(done):
            if any(done):
                raise RuntimeError("partitions disagree on the exchanges: some finished, some wait")
            keys = {(e.tag, e.direction) for e in pending}
            if len(keys) != 1:
                raise RuntimeError(f"partitions are at different exchanges: {sorted(keys)}")
            stats.rounds += 1
            boxes: list[list[Halo]] = [[] for _ in range(n)]
            for e in pending:
                for m in e.send:
                    boxes[m.to_partition].append(m)
                    stats.messages += 1
                    k = (m.direction, self.plan.untag(m.layer)[1])
                    stats.bytes[k] = stats.bytes.get(k, 0) + m.tensor.nbytes
            for i in range(n):
                advance(i, boxes[i])
        return results, stats

    def _join(self, results: list[PartitionResult], stats: ExchangeStats, B: int) -> ReplicaResult:
        xp, pl = self.xp, self.plan
        grads: dict = {}
        info: dict = {}
        for r in results:
            overlap = set(grads) & set(r.grads)
            assert not overlap, overlap
            grads.update(r.grads)
            for k, v in r.info.items():
                if is_term(k):  # each partition's share of a loss term: they add up
                    info[k] = info.get(k, 0.0) + v
                elif r is results[0]:  # the watched weights and units: partition 0's tile, as a worker reports
                    info[k] = v
        acts = {}
        for lay in pl.layers:
            if lay.name not in results[0].acts:
                continue
            c, h, w = lay.shape
            full = xp.empty((h, w, c, B), dtype=results[0].acts[lay.name].dtype)
            for r, t in zip(results, lay.tiles):
                full[t[0] : t[1], t[2] : t[3]] = r.acts[lay.name]
            acts[lay.name] = to_external(xp, full)
        for st, sl in zip(pl.network.stages, pl.stages):
            acts[f"{st.name}.output"] = acts[pl.layers[sl.output].name]
        if "head.logits" in results[0].acts:
            acts["head.logits"] = results[0].acts["head.logits"].T.copy()
        dx = None
        if results[0].dx is not None:
            c, h, w = pl.spec.input
            full = xp.empty((h, w, c, B), dtype=results[0].dx.dtype)
            for r, t in zip(results, pl.layers[0].tiles):
                full[t[0] : t[1], t[2] : t[3]] = r.dx
            dx = to_external(xp, full)
        stats.activation_bytes = pl.activation_bytes(B, self.dtype.itemsize)
        return ReplicaResult(sum(r.loss for r in results), grads, info, acts, dx, stats, results)

    def tica(self, blocks: dict, x, step: int = 0, need_dx: bool = False) -> ReplicaResult:
        """Partitioned ``Network.tica`` of a (B, C, H, W) batch; grads by block."""
        tiles = self._tiles(x)
        gens = [rt.tica(self._blocks(blocks, p), tiles[p], step, need_dx) for p, rt in enumerate(self.runtimes)]
        results, stats = self.run(gens)
        return self._join(results, stats, x.shape[0])

    def supervised(self, blocks: dict, x, y, step: int = 0, need_dx: bool = False) -> ReplicaResult:
        """Partitioned ``Network.supervised``; info holds the accuracy."""
        tiles = self._tiles(x)
        gens = [
            rt.supervised(self._blocks(blocks, p), tiles[p], y, step, need_dx) for p, rt in enumerate(self.runtimes)
        ]
        results, stats = self.run(gens)
        return self._join(results, stats, x.shape[0])


def run_partitioned(
    plan: PartitionPlan,
    blocks: dict,
    x,
    y=None,
    objective: str = "tica",
    need_dx: bool = False,
    xp: ModuleType = numpy,
    dtype=numpy.float32,
) -> ReplicaResult:
    """One step of every partition of a replica in lockstep (see ``LocalReplica``)."""
    rep = LocalReplica(plan, xp, dtype)
    if objective == "tica":
        return rep.tica(blocks, x, need_dx=need_dx)
    if objective == "supervised":
        return rep.supervised(blocks, x, y, need_dx=need_dx)
    raise ValueError(f"objective={objective!r} is unknown; allowed: tica, supervised")
