"""The four ways a partition trades tensors with the others, as generators.

Every method yields one ``Exchange`` (the messages this partition sends and
whom it expects one message from), is resumed with the messages addressed to
it, checks them, and returns the assembled result:

* ``_fetch``: a layer over this partition's need region (its tile plus the
  halo its neighbours own);
* ``_scatter``: the reverse, partial values over the need region summed into
  their owners' tiles (gradients, partial reconstructions);
* ``_allreduce``: a per-example sum over all partitions, in partition order, so
  that every partition holds the same bits;
* ``_reduce0``: a flat sum on partition 0 alone (tied stages' weight gradients).

A plan where no partition needs more than its own tile exchanges nothing.
"""

from __future__ import annotations

from types import ModuleType

import numpy

from downpour.nn.backend import to_numpy

from .halo import BACKWARD, Exchange, Halo
from .plan import PartitionPlan
from .regions import Region, crop, intersect, size

_ONE: Region = (0, 1, 0, 1)  # the region of a reduction's message


class PartitionComms:
    """Partition ``partition`` of one replica: its identity and its message exchanges."""

    def __init__(
        self,
        plan: PartitionPlan,
        partition: int,
        xp: ModuleType = numpy,
        dtype=numpy.float32,
        replica: int = 0,
        generation: int = 0,
    ):
        if not 0 <= partition < plan.partitions:
            raise ValueError(f"partition={partition} is out of range; allowed: 0..{plan.partitions - 1}")
        self.plan, self.p, self.xp, self.dtype = plan, partition, xp, numpy.dtype(dtype)
        self.replica, self.generation = replica, generation
        self.step = 0  # the step the messages belong to; set by every objective
        self._setup()

    def _setup(self) -> None:
        """What a subclass builds once the partition's identity is set (the runtime: its layers)."""

    def _halo(self, to: int, tag: int, direction: int, r: Region, tensor) -> Halo:
        return Halo(
            self.generation, self.replica, self.p, to, self.step, tag, direction, r[0], r[2], r[1], r[3], tensor
        )

    @staticmethod
    def _wire(a):
        """(h, w, C, B) -> numpy (B, h, w, C)."""
        return to_numpy(a.transpose(3, 0, 1, 2).copy())

    def _unwire(self, t):
        return self.xp.asarray(t).transpose(1, 2, 3, 0)

    def _receive(self, inbox, tag: int, direction: int, expect: list[int]) -> list[Halo]:
        inbox = sorted(inbox or [], key=lambda m: m.from_partition)
        got = [m.from_partition for m in inbox]
        if got != sorted(expect):
            raise ValueError(
                f"partition {self.p}: exchange {self.plan.untag(tag)} expected messages from "
                f"{sorted(expect)}, got {got}"
            )
        for m in inbox:
            if (m.layer, m.direction, m.to_partition, m.step) != (tag, direction, self.p, self.step):
                raise ValueError(
                    f"partition {self.p}: message from {m.from_partition} is for layer tag "
                    f"{m.layer} direction {m.direction} partition {m.to_partition} step {m.step}; "
                    f"expected {tag}, {direction}, {self.p}, {self.step}"
                )
        return inbox

    def _trade(
        self, tag: int, direction: int, arr, at: Region, to: list[tuple[int, Region]], senders: list[tuple[int, Region]]
    ):
        """One halo exchange: send each partition ``q`` of ``to`` (``(q, region)`` pairs) ``arr``
        (held over ``at``) cropped to its region, expect one message from each partition of
        ``senders``, and return those messages, checked. ``_fetch`` and ``_scatter`` trade the
        same way with the two directions of the plan's sinks and sources swapped."""
        p = self.p
        send = [self._halo(q, tag, direction, ov, self._wire(crop(arr, at, ov))) for q, ov in to if q != p]
        expect = [q for q, _ in senders if q != p]
        inbox = yield Exchange(tag, direction, send, expect)
        return self._receive(inbox, tag, direction, expect)

    def _fetch(self, layer: int, kind: str, own, direction: int, need_kind: str = "act"):
        """``layer`` over this partition's need region: its own tile plus halos."""
        pl, p, xp = self.plan, self.p, self.xp
        T, R = pl.tile(layer, p), pl.need(layer, need_kind, p)
        if not pl.exchanged(layer, need_kind):
            return crop(own, T, R)
        got = yield from self._trade(
            pl.tag(layer, kind), direction, own, T, pl.sinks(layer, need_kind, p), pl.sources(layer, need_kind, p)
        )
        out = xp.empty((*size(R), *own.shape[2:]), dtype=own.dtype)
        ov = intersect(R, T)
        if ov is not None:
            crop(out, R, ov)[...] = crop(own, T, ov)
        for m in got:
            if m.region != intersect(R, pl.tile(layer, m.from_partition)):
                raise ValueError(f"partition {self.p}: halo from {m.from_partition} covers {m.region}")
            crop(out, R, m.region)[...] = self._unwire(m.tensor)
        return out

    def _scatter(self, layer: int, kind: str, arr, direction: int, need_kind: str = "act"):
        """Sum partial values over the need region into their owners' tiles; returns this tile's sum."""
        pl, p, xp = self.plan, self.p, self.xp
        T, R = pl.tile(layer, p), pl.need(layer, need_kind, p)
        out = xp.zeros((*size(T), *arr.shape[2:]), dtype=arr.dtype)
        ov = intersect(R, T)
        if ov is not None:
            crop(out, T, ov)[...] += crop(arr, R, ov)
        if not pl.exchanged(layer, need_kind):
            return out
        got = yield from self._trade(
            pl.tag(layer, kind), direction, arr, R, pl.sources(layer, need_kind, p), pl.sinks(layer, need_kind, p)
        )
        for m in got:
            if m.region != intersect(T, pl.need(layer, need_kind, m.from_partition)):
                raise ValueError(f"partition {self.p}: partial sum from {m.from_partition} covers {m.region}")
            crop(out, T, m.region)[...] += self._unwire(m.tensor)
        return out

    def _allreduce(self, layer: int, kind: str, part, direction: int):
        """Sum of ``part`` (B,) or (B, n) over all partitions, in partition order (the same bits everywhere)."""
        n = self.plan.partitions
        if n == 1:
            return part
        tag = self.plan.tag(layer, kind)
        wire = to_numpy(part).reshape(part.shape[0], 1, 1, -1)
        others = [q for q in range(n) if q != self.p]
        inbox = yield Exchange(tag, direction, [self._halo(q, tag, direction, _ONE, wire) for q in others], others)
        parts = {self.p: part}
        for m in self._receive(inbox, tag, direction, others):
            parts[m.from_partition] = self.xp.asarray(m.tensor).reshape(part.shape)
        total = parts[0].copy()
        for q in range(1, n):
            total += parts[q]
        return total

    def _reduce0(self, layer: int, kind: str, part):
        """Sum of the flat ``part`` over partitions, on partition 0 (None elsewhere)."""
        n = self.plan.partitions
        if n == 1:
            return part
        tag = self.plan.tag(layer, kind)
        if self.p != 0:
            yield Exchange(tag, BACKWARD, [self._halo(0, tag, BACKWARD, _ONE, to_numpy(part).reshape(1, 1, 1, -1))], [])
            return None
        others = list(range(1, n))
        inbox = yield Exchange(tag, BACKWARD, [], others)
        total = part.copy()
        for m in self._receive(inbox, tag, BACKWARD, others):
            total += self.xp.asarray(m.tensor).reshape(part.shape)
        return total
