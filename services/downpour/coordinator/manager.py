"""The checkpoint commit protocol: ask the shards, verify their parts, write the manifest, keep the newest.

Checkpoints are consistent by construction of the commit point: each shard
writes its part, then the manager verifies the files (size and crc32 as the
shard reported them, every placed block present on its shard) and writes the
manifest (atomically, last), which records a crc32 per block. A checkpoint
without a manifest never happened: whatever the shards wrote for a failed
attempt is removed at once, so a full disk retried for hours leaves no folders
behind. Ids are written once (the coordinator and every shard refuse a taken
one). The newest ``keep_checkpoints`` are kept, and the older ones are deleted
only after the new one reads back and verifies; uncommitted leftovers of a
coordinator that died mid-way are removed on the next commit (this project's
files only: a folder holding anything else stays).

``tick`` is one pass of the checkpoint thread: a checkpoint every
``checkpoint_every`` steps per replica (counted over all replicas together,
so a stalled replica does not hold them back), and the last one when the job
is done (its step count reached or its time budget spent, once its replicas
have stopped: ``JobState.settled``). A failed checkpoint is retried with exponential
backoff while training goes on; the final one is tried
``FINAL_CHECKPOINT_ATTEMPTS`` times, then the job is FAILED with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from downpour import metrics
from downpour.checkpoint import manifest as mf
from downpour.checkpoint.errors import CheckpointError, CheckpointExists
from downpour.checkpoint.files import file_crc32
from downpour.checkpoint.shardfile import valid_id
from downpour.coordinator.shards import ShardError, Shards, disk_full
from downpour.coordinator.state import Checkpoint, JobState

log = logging.getLogger("downpour.coordinator")

CHECKPOINT_BACKOFF = (1.0, 30.0)  # seconds before retrying a failed checkpoint: doubling, capped
FINAL_CHECKPOINT_ATTEMPTS = 4  # then the job is FAILED with the reason (1 + 2 + 4 s of backoff between)


class CheckpointFailed(Exception):
    """The shards' files did not verify: the checkpoint is not committed."""


# What a checkpoint attempt can fail with; anything else is a bug and ends the thread.
FAILURES = (ShardError, CheckpointFailed, OSError, CheckpointError)


class CheckpointManager:
    """Commits checkpoints of the shards' blocks; ``lock`` is held while one is being made."""

    def __init__(
        self,
        state: JobState,
        placement: dict[str, int],
        checkpoint_dir: str,
        connect: Callable[[], AbstractContextManager[Shards]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state = state
        self.cfg = state.cfg
        self.place = placement
        self.checkpoint_dir = checkpoint_dir
        self.connect = connect
        self.clock = clock
        self.lock = threading.Lock()  # also taken by the shard supervisor while it refills a shard
        self.succeeded = False
        self.failed = ""  # why the job failed (its final checkpoint could not be written)
        self.failures = 0  # failed attempts in a row
        self.final_failures = 0
        self.retry_at = 0.0
        self._last: int | None = None  # all replicas' steps at the last checkpoint

    # ---------------------------------------------------------------- one checkpoint
    def checkpoint(self, checkpoint_id: str = "") -> Checkpoint:
        """Each shard writes its part; verified, the manifest commits the checkpoint.

        Ids are written once: a given id that is already taken (a committed checkpoint, or any
        folder of that name) raises ``CheckpointExists`` before any shard writes a byte, and a
        generated one is made unique. The older checkpoints that fall out of retention are
        deleted only after the new one is read back and verifies."""
        if checkpoint_id and not valid_id(checkpoint_id):
            raise ValueError(
                f"invalid checkpoint id {checkpoint_id!r}: letters, digits and ._- only, "
                "not starting with a dot, at most 128 characters"
            )
        with self.lock:
            t0 = time.perf_counter()
            with self.state.lock:
                step = self.state.step
                replica_steps = [p.step for p in self.state.progress]
            if checkpoint_id:
                if self._taken(checkpoint_id):
                    raise CheckpointExists(
                        f"checkpoint {checkpoint_id!r} already exists in {self.checkpoint_dir}: "
                        "checkpoint ids are written once; choose another name"
                    )
                ck_id = checkpoint_id
            else:
                ck_id = self._new_id(step)
            manifest_path = os.path.join(self.checkpoint_dir, ck_id, mf.MANIFEST)
            try:
                with self.connect() as shards:
                    parts = shards.checkpoint(ck_id)
                blocks = self.verify_parts(ck_id, parts)
                ck = Checkpoint(ck_id, step, manifest_path, replica_steps, parts, time.time())
                body = dict(ck.__dict__, job_id=self.state.job_id, placement=self.place, config=self.cfg.to_yaml(),
                            blocks=blocks)  # fmt: skip
                mf.commit(self.checkpoint_dir, ck_id, body)  # the commit point
                if len(self.state.checkpoints) + 1 > self.cfg.keep_checkpoints:
                    # older ones are about to go: first read the new one back from the disk
                    self._verify_committed(ck_id, manifest_path)
            except BaseException as e:
                mf.discard_uncommitted(self.checkpoint_dir, ck_id)
                if isinstance(e, Exception):
                    reason = "disk_full" if disk_full(e) else "error"
                    metrics.CHECKPOINT_FAILURES.labels("coordinator", reason).inc()
                raise
            for old in self.state.add_checkpoint(ck):
                mf.remove(old.manifest_path)
            committed = {os.path.basename(os.path.dirname(c.manifest_path)) for c in self.state.checkpoints}
            mf.remove_uncommitted(self.checkpoint_dir, keep=committed | {ck_id})
            metrics.CHECKPOINT_SECONDS.labels("coordinator").observe(time.perf_counter() - t0)
            log.info("checkpoint %s committed at step %d", ck_id, step)
            return ck

    def _taken(self, ck_id: str) -> bool:
        with self.state.lock:
            known = any(c.checkpoint_id == ck_id for c in self.state.checkpoints)
        return known or os.path.lexists(os.path.join(self.checkpoint_dir, ck_id))

    def _new_id(self, step: int) -> str:
        """A generated id that no checkpoint (or folder) has: the step and the time, then a suffix if needed."""
        base = f"step-{step:08d}-{int(time.time() * 1000) % 100000:05d}"
        ck_id, n = base, 1
        while self._taken(ck_id):
            ck_id, n = f"{base}-{n}", n + 1
        return ck_id

    def _verify_committed(self, ck_id: str, manifest_path: str) -> None:
        """The committed manifest and every file it names, as read back from the disk; if they do not
        verify, the manifest is withdrawn (CheckpointFailed) and nothing older is deleted."""
        try:
            with open(manifest_path, encoding="utf-8") as f:
                mf.verify(self.checkpoint_dir, json.load(f))
        except (CheckpointError, OSError, ValueError, KeyError) as e:
            try:
                os.remove(manifest_path)
            except FileNotFoundError:
                pass
            raise CheckpointFailed(f"checkpoint {ck_id} did not verify once written, withdrawn: {e}") from e

    def verify_parts(self, ck_id: str, parts: list[dict]) -> dict[str, dict]:
        """The shards' files as written: sizes and crc32s as reported, every placed block there.

        A shard that restarted empty between its last push and this checkpoint
        would otherwise commit a checkpoint without its blocks.
        """
        paths = {}
        for p in parts:
            path = p["path"]
            if not os.path.isfile(path):  # the shard wrote to a path we do not see: the conventional one
                path = str(mf.conventional_file(self.checkpoint_dir, ck_id, p["shard"]))
            crc, size = file_crc32(path)
            if crc != p["crc32"] or size != p["num_bytes"]:
                raise CheckpointFailed(f"checkpoint {ck_id}: shard {p['shard']}'s file does not match what it reported")
            paths[p["shard"]] = path
        table = mf.block_table(paths)
        missing = [n for n in self.place if n not in table or table[n]["shard"] != self.place[n]]
        if missing:
            raise CheckpointFailed(
                f"checkpoint {ck_id}: {len(missing)} block(s) missing on their shards "
                f"(e.g. {missing[0]!r}); a shard is being refilled"
            )
        return table

    # ---------------------------------------------------------------- the checkpoint thread
    def _total(self) -> int:
        with self.state.lock:
            return sum(p.step for p in self.state.progress)

    def tick(self) -> None:
        """Commit a checkpoint if one is due (an interval passed, or the job is done) and no backoff waits."""
        if self._last is None:
            self._last = sum(self.state.checkpoints[-1].replica_steps) if self.state.checkpoints else self._total()
        if self.failed or self.clock() < self.retry_at:
            return
        try:
            if self.state.done:
                # after a time-budget end, once the replicas have stopped (``JobState.settled``)
                if not self.succeeded and self.state.settled():
                    newest = self.state.checkpoints[-1] if self.state.checkpoints else None
                    with self.state.lock:
                        replica_steps = [p.step for p in self.state.progress]
                    if newest is None or newest.replica_steps != replica_steps:
                        self.checkpoint()
                    self.succeeded = True
                    log.info("job complete at step %d (%s)", self.state.step, self.state.ending.reason)
                return
            if self._total() >= self._last + self.cfg.checkpoint_every * self.cfg.replicas:
                self._last = sum(self.checkpoint().replica_steps)
                if self.failures:
                    log.info("checkpoints commit again after %d failed attempt(s)", self.failures)
                self.failures = 0
        except FAILURES as e:
            self._failed(e)

    def _failed(self, e: Exception) -> None:
        self.failures += 1
        why = ("the disk is full: " if disk_full(e) else "") + str(e)
        if self.state.done:
            self.final_failures += 1
            if self.final_failures >= FINAL_CHECKPOINT_ATTEMPTS:
                self.failed = (
                    f"the final checkpoint could not be written ({self.final_failures} attempts); last error: {why}"
                )
                log.error("job failed at step %d: %s", self.state.step, self.failed)
                return
        n = self.final_failures if self.state.done else self.failures
        delay = min(CHECKPOINT_BACKOFF[1], CHECKPOINT_BACKOFF[0] * 2 ** (n - 1))
        self.retry_at = self.clock() + delay
        newest = self.state.checkpoints[-1].checkpoint_id if self.state.checkpoints else "none"
        log.warning(
            "checkpoint failed (%d in a row; the newest committed one stays %s), next attempt in %.0f s: %s",
            self.failures,
            newest,
            delay,
            why,
        )

    def run(self, stop: threading.Event) -> None:
        """The checkpoint thread: ``tick`` four times a second, and the job state saved every second
        (progress too, for a coordinator that restarts)."""
        saved = self.clock()
        while not stop.wait(0.25):
            if self.clock() - saved > 1.0:
                self.state.save()
                saved = self.clock()
            self.tick()
