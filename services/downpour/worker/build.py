"""Building one training run of a worker from its assignment: the step function and what it talks to.

``build`` turns an assignment (replica, partition, shards, feeder, peers,
start step) and the job's config into a ``Training``: a ``DownpourLoop``
whose step function computes this worker's gradients and the objective's
named scalars (``info``: per-stage terms and weight norms, reported to the
coordinator), the parameter-server client, the batch stream and, for a
partition of a model-parallel replica, the halo links to its peers. Running the loop is
``worker.life``'s business; this module decides what one step computes:

* one partition (a 1x1 grid): the whole network, on the CPU or the GPU;
  each pull's parameters are copied to the device once;
* a partition of a larger grid: ``downpour.partition``'s generator for this
  worker's tile, its messages carried by ``worker.exchange``. Such grids
  compute on the CPU only.

Supervised jobs train the softmax head alone for their first
``head_only_steps`` steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from downpour import config as jobconfig
from downpour import device as devices
from downpour.feeder.client import batch_stream
from downpour.nn import Network, to_internal
from downpour.paramserver.client import ParamClient
from downpour.partition import PartitionRuntime, plan
from downpour.rpc.channel import ChannelConfig
from downpour.v1 import common_pb2
from downpour.worker.exchange import Mailbox, PeerLinks, drive
from downpour.worker.loop import Compute, DownpourLoop

PARAM_TIMEOUT_SECONDS = 30.0  # one pull or push attempt
PARAM_RETRY_SECONDS = 120.0  # retrying a shard that is down, before giving the slot back


def head_only(grads: dict) -> dict:
    """The gradients with every block but the softmax head's zeroed: a step that trains the head alone
    (Adagrad and SGD leave a block with a zero gradient exactly where it is)."""
    return {k: v if k.startswith("head.") else v * 0 for k, v in grads.items()}


@dataclass
class Cursor:
    """The step the loop is computing: the step function needs it (head-only warm-up, halo tags)."""

    step: int


@dataclass
class Training:
    """One run of the Downpour loop on one assignment, and everything it holds open."""

    cfg: jobconfig.JobConfig
    loop: DownpourLoop
    cursor: Cursor
    client: ParamClient
    batches: Iterator
    links: PeerLinks | None = None

    def close(self) -> None:
        """Close the halo links (peers see the stream end at once), flush the loop's last push, then
        close the client and the batch stream."""
        try:
            if self.links is not None:
                self.links.close()
            self.loop.close()
        finally:
            self.client.close()
            close = getattr(self.batches, "close", None)
            if close is not None:
                close()


def check_device(xp: ModuleType, a: common_pb2.Assignment, cfg: jobconfig.JobConfig) -> None:
    """Model-parallel partitions compute on the CPU only: refuse a GPU worker such a slot."""
    if xp is not np and a.num_partitions > 1:
        raise devices.DeviceError(
            f"--device gpu: this job's replicas are split into {cfg.partitions} partitions, "
            "and model-parallel partitions compute on the CPU only; run this worker "
            "with --device cpu or the job with partitions 1x1"
        )


def missing_peers(a: common_pb2.Assignment) -> int:
    """How many other partitions of our replica have not joined yet (0 for an unpartitioned replica)."""
    peers = {q.partition for q in a.peers if q.partition != a.partition}
    return max(0, a.num_partitions - 1 - len(peers))


def whole_network(cfg: jobconfig.JobConfig, xp: ModuleType, cursor: Cursor) -> Compute:
    """The step function of a replica in one piece: the whole network on ``xp``'s device."""
    net = Network(cfg.network_spec(), xp=xp)
    on_device: dict[str, Any] = {"host": None, "params": None}

    def compute(params: dict, x: Any, y: Any) -> tuple[float, dict, dict]:
        # The loop hands us the same host dict until its next pull: copy it to the device once.
        if params is not on_device["host"]:
            on_device["host"], on_device["params"] = params, devices.to_device(xp, params)
        if cfg.supervised:
            loss, grads, info = net.supervised(on_device["params"], x, y)
            if cursor.step < cfg.head_only_steps:
                grads = head_only(grads)
        else:
            loss, grads, info = net.tica(on_device["params"], x)
        return loss, grads, info

    return compute


def one_tile(
    cfg: jobconfig.JobConfig,
    a: common_pb2.Assignment,
    links: PeerLinks,
    mailbox: Mailbox,
    halo_timeout: float,
    cancelled: Callable[[], bool],
    cursor: Cursor,
) -> Compute:
    """The step function of one partition: its tile of every layer, trading halos with its peers."""
    rows, cols = cfg.grid()
    pl = plan(cfg.network_spec(), rows, cols)
    runtime = PartitionRuntime(pl, a.partition, replica=a.replica, generation=a.generation)
    y0, y1, x0, x1 = pl.tile(0, a.partition)

    def compute(params: dict, x: Any, y: Any) -> tuple[float, dict, dict]:
        tile = to_internal(np, x)[y0:y1, x0:x1]
        gen = (
            runtime.supervised(params, tile, y, cursor.step)
            if cfg.supervised
            else runtime.tica(params, tile, cursor.step)
        )
        res = drive(gen, links, mailbox, a.generation, cursor.step, halo_timeout, cancelled=cancelled)
        grads = head_only(res.grads) if cursor.step < cfg.head_only_steps else res.grads
        return res.loss, grads, res.info  # the tile's scalars: its shares of the terms

    return compute


def build(
    a: common_pb2.Assignment,
    cfg: jobconfig.JobConfig,
    *,
    worker_id: str,
    chcfg: ChannelConfig,
    xp: ModuleType,
    mailbox: Mailbox,
    halo_timeout: float,
    cancelled: Callable[[], bool],
) -> Training:
    """The training run of assignment ``a``: connects to the shards, the feeder and the peers.

    ``cancelled`` ends a halo exchange early (a control event arrived). The caller checks
    ``missing_peers`` first: a partition starts only with every peer of its replica known.
    """
    check_device(xp, a, cfg)
    cursor = Cursor(int(a.start_step))
    links = None
    if a.num_partitions > 1:
        mailbox.reset(a.generation, a.replica, a.partition)
        links = PeerLinks({q.partition: q.address for q in a.peers if q.partition != a.partition}, chcfg)
    client = None
    try:
        client = ParamClient(
            list(a.shard_addresses),
            placement={b.name: b.shard for b in a.blocks},
            channel_config=chcfg,
            worker_id=worker_id,
            timeout=PARAM_TIMEOUT_SECONDS,
            retry_deadline=PARAM_RETRY_SECONDS,
            shared=cfg.shared_memory,
            wire_dtype=cfg.wire_dtype,
        )
        compute = (
            whole_network(cfg, xp, cursor)
            if links is None
            else one_tile(cfg, a, links, mailbox, halo_timeout, cancelled, cursor)
        )
        batches: Iterator = batch_stream(
            a.feeder_address,
            a.replica,
            a.num_replicas,
            cfg.batch_size,
            start_batch=int(a.start_step),
            with_labels=cfg.supervised,
            seed=cfg.seed,
            channel_config=chcfg,
        )
        loop = DownpourLoop(
            compute,
            client,
            [b.name for b in a.blocks],
            batches,
            cfg.n_fetch,
            cfg.n_push,
            schedule=cfg.schedule,
            to_host=None if xp is np else devices.to_host,
        )
    except BaseException:
        if links is not None:
            links.close()
        if client is not None:
            client.close()
        raise
    return Training(cfg, loop, cursor, client, batches, links)
