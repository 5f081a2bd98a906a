"""downpour.partition: model parallelism within a replica, as math.

A replica's layers are cut into an R x C grid of tiles (``plan``); partition p
owns its tile of every layer and the parameter blocks of those locations
(``split_params`` / ``join_params``). ``PartitionRuntime`` computes one
partition's share of a step and says, as ``Halo`` messages, everything it
needs from or owes to the others; ``LocalReplica`` / ``run_partitioned`` run
all partitions of a replica in one process. No gRPC, no files, no threads:
the worker carries the messages.

Modules, from the bottom up: ``regions`` (rectangles of a layer's grid),
``plan`` (tiles, halos, exchange tags), ``blocks`` (parameters cut by the
tiles), ``halo`` (the messages), ``comms`` (fetch, scatter, all-reduce and
reduce as exchanges), ``tilelcn`` (contrast normalisation on a tile),
``runtime`` (one partition's step) and ``local`` (a replica in one process).
"""

from .blocks import block_shapes, join_params, split_params
from .halo import BACKWARD, FORWARD, Exchange, Halo
from .local import ExchangeStats, LocalReplica, ReplicaResult, run_partitioned
from .plan import HALO_MODES, KINDS, Layer, PartitionPlan, StageLayers, plan
from .regions import Region
from .runtime import PartitionResult, PartitionRuntime

__all__ = [
    "HALO_MODES",
    "KINDS",
    "Layer",
    "PartitionPlan",
    "Region",
    "StageLayers",
    "block_shapes",
    "join_params",
    "plan",
    "split_params",
    "BACKWARD",
    "FORWARD",
    "Exchange",
    "ExchangeStats",
    "Halo",
    "LocalReplica",
    "PartitionResult",
    "PartitionRuntime",
    "ReplicaResult",
    "run_partitioned",
]
