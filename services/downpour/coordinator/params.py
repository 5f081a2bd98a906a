"""The job's parameter blocks as the coordinator sees them: their shapes, their shards, their creation.

The coordinator never holds a parameter. On a fresh start it places the
blocks on the shards (size-balanced) and tells each shard the names of its
blocks (InitBlocks); the shard makes their values itself, drawn from the
job's seed or read from ``init_from`` (see ``paramserver.initial``).
"""

from __future__ import annotations

import logging
import threading

from downpour import config as jobconfig
from downpour.checkpoint.initfrom import check_init_from
from downpour.coordinator.shards import Shards
from downpour.nn import Network
from downpour.paramserver.client import balanced_placement
from downpour.partition import PartitionPlan, block_shapes, plan

log = logging.getLogger("downpour.coordinator")


def _prod(shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class Parameters:
    """The blocks of a job (``shapes``), the shard each lives on (``place``), and their creation."""

    def __init__(self, cfg: jobconfig.JobConfig, num_shards: int) -> None:
        self.cfg = cfg
        self.net = Network(cfg.network_spec())
        rows, cols = cfg.grid()
        self.plan: PartitionPlan | None = None
        if rows * cols > 1:
            # Model parallelism: every partition owns its own blocks of each layer.
            self.plan = plan(cfg.network_spec(), rows, cols)
            self.shapes = block_shapes(self.plan)
        else:
            self.shapes = self.net.param_shapes()
        self.sizes = {k: _prod(s) for k, s in self.shapes.items()}
        self.place = balanced_placement(self.sizes, num_shards)
        self.num_shards = num_shards

    def names_on(self, i: int) -> list[str]:
        return [n for n, s in self.place.items() if s == i]

    def check_init_from(self) -> None:
        """Whether ``init_from`` can be used (from its files' headers; no values are read here).
        Raises ValueError naming the problem."""
        if not self.cfg.init_from:
            return
        taken, m = check_init_from(self.cfg)
        shapes = self.net.param_shapes()
        fresh = sorted(set(shapes) - set(taken))
        log.info(
            "initial values of %d of %d blocks from checkpoint %s (step %d) in %s; fresh: %s",
            len(taken),
            len(shapes),
            m["checkpoint_id"],
            m["step"],
            self.cfg.init_from,
            ", ".join(fresh) or "none",
        )

    def init_shard(self, shards: Shards, i: int) -> None:
        """Shard i creates its own blocks (drawn from the seed, or read from init_from): the coordinator
        sends their names only and never holds a parameter."""
        names = self.names_on(i)
        # Reading init_from can take a while for a big model: a minute plus 5 M elements a second.
        timeout = max(600.0, 60.0 + sum(self.sizes[n] for n in names) / 5e6)
        made, taken = shards.init_blocks(i, names, timeout)
        log.info("shard %d created its %d blocks (%d from init_from)", i, made, taken)

    def init_all(self, shards: Shards) -> None:
        """Every shard creates its blocks with their initial values, under the job's optimizer (in parallel)."""
        shards.wait_ready(60)
        for i in range(self.num_shards):
            shards.set_optimizer(i)
        errors: list[BaseException] = []

        def one(i: int) -> None:
            try:
                self.init_shard(shards, i)
            except BaseException as e:  # noqa: BLE001 - re-raised below, in the calling thread
                errors.append(e)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(self.num_shards)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
