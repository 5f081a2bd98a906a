"""A shard's checkpoints: the Checkpoint and Restore RPCs of a ParameterServer.

A checkpoint is one file per shard, ``<checkpoint-dir>/<id>/shard-<i>.ckpt``
(downpour.checkpoint.shardfile), written once: a taken id is ALREADY_EXISTS,
never overwritten. A write that fails (a full disk is RESOURCE_EXHAUSTED,
anything else UNAVAILABLE) leaves no file and the shard's state untouched. A
restore replaces every block, the optimizer and the (worker, seq) window at
once, under the store's exclusive lock; a missing checkpoint is NOT_FOUND, a
damaged one or another shard's DATA_LOSS.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc

from downpour import metrics
from downpour.checkpoint import shardfile as ckpt
from downpour.checkpoint.errors import CheckpointExists
from downpour.checkpoint.files import DISK_FULL
from downpour.paramserver.blockinfo import block_info
from downpour.paramserver.store import Block, ShardStore
from downpour.v1 import paramserver_pb2 as pb

log = logging.getLogger("downpour.paramserver")


class Checkpointing:
    """The Checkpoint and Restore RPCs, and the restore ``--restore`` does at start (mixed into ParameterServer)."""

    store: ShardStore
    checkpoint_dir: str

    def _gauges(self) -> None:
        raise NotImplementedError("ParameterServer updates its metrics gauges")

    def _path(self, checkpoint_id: str, context: Any):
        if not self.checkpoint_dir:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this shard has no --checkpoint-dir")
        try:
            return ckpt.shard_path(self.checkpoint_dir, checkpoint_id, self.store.shard_index)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def Checkpoint(self, request: pb.CheckpointRequest, context: Any) -> pb.CheckpointResponse:
        path = self._path(request.checkpoint_id, context)
        t0 = time.perf_counter()
        try:
            n, size, crc = ckpt.save(self.store, path)
        except CheckpointExists as e:
            # written once: a second checkpoint under a taken id would overwrite a committed one
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"shard {self.store.shard_index}: {e}")
        except OSError as e:
            # A full disk (or any other write error) fails this checkpoint cleanly: save() removed its
            # temp file, the folder goes if nothing else is in it, the shard's state is untouched.
            try:
                path.parent.rmdir()
            except OSError:
                pass
            full = e.errno in DISK_FULL
            metrics.CHECKPOINT_FAILURES.labels("paramserver", "disk_full" if full else "error").inc()
            log.error("checkpoint %s not written: %s", path, e)
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED if full else grpc.StatusCode.UNAVAILABLE,
                f"shard {self.store.shard_index} could not write checkpoint {request.checkpoint_id}: "
                f"{e.strerror or e}" + (" (the disk is full)" if full else ""),
            )
        metrics.CHECKPOINT_SECONDS.labels("paramserver").observe(time.perf_counter() - t0)
        metrics.CHECKPOINT_BYTES.labels("paramserver").set(size)
        log.info("checkpoint %s: %d blocks, %d bytes", path, n, size)
        return pb.CheckpointResponse(path=str(path), num_blocks=n, num_bytes=size, crc32=crc)

    def restore(self, path) -> list[Block]:
        shard, opt, blocks, dedup = ckpt.load(path)
        if shard != self.store.shard_index:
            raise ckpt.CheckpointError(f"{path} belongs to shard {shard}, this is shard {self.store.shard_index}")
        self.store.rw.acquire_exclusive()
        try:
            self.store.optimizer = opt
            self.store.replace_all(blocks, dedup)
        finally:
            self.store.rw.release_exclusive()
        self._gauges()
        log.info("restored %s: %d blocks", path, len(blocks))
        return blocks

    def Restore(self, request: pb.RestoreRequest, context: Any) -> pb.RestoreResponse:
        path = self._path(request.checkpoint_id, context)
        try:
            blocks = self.restore(path)
        except ckpt.CheckpointNotFound as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except ckpt.CheckpointError as e:  # damaged, or another shard's file
            context.abort(grpc.StatusCode.DATA_LOSS, str(e))
        return pb.RestoreResponse(path=str(path), blocks=[block_info(b) for b in blocks])
