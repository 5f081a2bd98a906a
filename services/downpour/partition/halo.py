"""The messages partitions exchange: ``Halo`` (one tensor for one partition)
and ``Exchange`` (a synchronisation point: what a partition sends and whom it
waits for).

A ``Halo`` is field for field the ``Halo`` proto, its tensor a numpy array:
``layer`` is the plan's tag (layer index * len(KINDS) + kind, see
``PartitionPlan.untag``); halo tensors are (batch, y1 - y0, x1 - x0, maps)
over the region in the layer's global coordinates; reductions use region
(0, 1, 0, 1) and (batch or 1, 1, 1, n).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy

from .regions import Region

FORWARD, BACKWARD = 1, 2  # HaloDirection values
HALO_KINDS = ("act", "v", "recon", "drecon")  # spatial halos; the rest are reductions


@dataclass
class Halo:
    """One message: the ``Halo`` proto's fields, the tensor as a numpy array."""

    generation: int
    replica: int
    from_partition: int
    to_partition: int
    step: int
    layer: int  # PartitionPlan.tag(layer, kind)
    direction: int  # FORWARD or BACKWARD
    y0: int
    x0: int
    y1: int
    x1: int
    tensor: numpy.ndarray

    @property
    def region(self) -> Region:
        return (self.y0, self.y1, self.x0, self.x1)


@dataclass
class Exchange:
    """A synchronisation point: send ``send``, then receive one message from each of ``expect``."""

    tag: int
    direction: int
    send: list[Halo]
    expect: list[int]
