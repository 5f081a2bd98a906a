"""The shard watchdog: ask every shard for its blocks, refill one that restarted empty.

A shard that answers without its blocks has restarted: it is told to restore
its part of the newest valid checkpoint (an older one when the shard finds
that one missing or damaged), or, before the first checkpoint, to recreate its
blocks with their initial values, while the other shards keep their state.
Progress lost on that shard is at most one checkpoint interval. No checkpoint
is committed while a shard is being refilled (the manager's lock).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager

from downpour import metrics
from downpour.checkpoint.errors import CheckpointError
from downpour.checkpoint.manifest import newest_valid
from downpour.coordinator.params import Parameters
from downpour.coordinator.shards import ShardError, Shards
from downpour.coordinator.state import JobState

log = logging.getLogger("downpour.coordinator")


class ShardSupervisor:
    """Keeps every shard holding its blocks; ``down[i]`` says shard i did not answer last time."""

    def __init__(self, state: JobState, params: Parameters, checkpoint_dir: str, commit_lock: threading.Lock) -> None:
        self.state = state
        self.params = params
        self.checkpoint_dir = checkpoint_dir
        self.commit_lock = commit_lock
        self.down = [False] * params.num_shards

    def check(self, shards: Shards) -> list[int]:
        """Refill every shard that answers without its blocks; returns the shards refilled."""
        if not self.state.initialized:
            return []
        refilled = []
        for i, address in enumerate(shards.addresses):
            try:
                have = shards.blocks(i)
            except ShardError:
                if not self.down[i]:
                    log.warning("shard %d at %s is not answering; waiting for it", i, address)
                self.down[i] = True
                continue
            if self.down[i]:
                log.info("shard %d at %s answers again", i, address)
            self.down[i] = False
            want = set(self.params.names_on(i))
            if want <= have:
                continue
            log.warning(
                "shard %d at %s lacks %d of its %d blocks (restarted?): refilling it",
                i,
                address,
                len(want - have),
                len(want),
            )
            with self.commit_lock:  # no checkpoint while a shard is being refilled
                self.refill(shards, i)
            refilled.append(i)
        return refilled

    def refill(self, shards: Shards, i: int) -> None:
        """Shard i gets its part of the newest checkpoint it can load, or else its initial values."""
        bad: tuple[str, ...] = ()
        while True:
            m = newest_valid(self.checkpoint_dir, exclude=bad)
            if m is None or m.get("placement", self.params.place) != self.params.place:
                break
            try:
                shards.restore(i, m["checkpoint_id"])
            except CheckpointError as e:
                log.warning("shard %d cannot restore %s (%s); trying an older checkpoint", i, m["checkpoint_id"], e)
                bad += (m["checkpoint_id"],)
                continue
            shards.set_optimizer(i)
            metrics.COORDINATOR_SHARD_RECOVERIES.labels(str(i), "checkpoint").inc()
            log.info("shard %d restored from checkpoint %s (step %d)", i, m["checkpoint_id"], m["step"])
            return
        # No usable checkpoint yet: the shard's blocks start again from their initial values.
        shards.set_optimizer(i)
        self.params.init_shard(shards, i)
        metrics.COORDINATOR_SHARD_RECOVERIES.labels(str(i), "initial").inc()
        log.info("shard %d refilled with initial values (no checkpoint yet)", i)

    def run(self, stop: threading.Event, connect: Callable[[], AbstractContextManager[Shards]], every: float) -> None:
        """The watchdog thread: ``check`` every ``every`` seconds over one connection."""
        with connect() as shards:
            while not stop.wait(every):
                try:
                    self.check(shards)
                except (ShardError, OSError, CheckpointError) as e:
                    log.warning(
                        "refilling a shard failed, will retry: %s", e.details if isinstance(e, ShardError) else e
                    )
