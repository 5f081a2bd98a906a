"""The ParameterServer service: one shard.

    downpour serve paramserver --port 7100 --shard-index 0 \\
        --checkpoint-dir /data/ckpt --lr 0.01 --eps 1e-6 [--restore step-000100]

Blocks are created by the CreateBlocks RPC (normally from the client or the
coordinator) or restored from a checkpoint. The hot RPCs (CreateBlocks, Pull,
Push) use downpour.rpc.codec's raw-payload (de)serialisers: the wire bytes
are ordinary protobuf, but gradients are applied straight from the received
buffer and parameters are copied once, under the block's lock, into the
outgoing message.

A push is applied block by block, each block as soon as all its chunks have
arrived and passed validation, on a small pool of apply threads so that
receiving the next block overlaps applying the last. The block is the unit of
atomicity (see store.py): a rejected block changes nothing; blocks completed
earlier in the same push stay applied, the error's PushRefusal detail says
which (errors.py), and a retry with the same (worker_id, seq) applies only the
rest. The optimizer flags default to the job's (downpour.optim); a job's
coordinator sets its own with SetOptimizer.

Status codes: INVALID_ARGUMENT for a malformed push (NaN/Inf, wrong shape or
dtype, truncated data, chunks out of order); NOT_FOUND for an unknown block;
RESOURCE_EXHAUSTED for a message over --max-message-bytes (from gRPC itself);
ALREADY_EXISTS, FAILED_PRECONDITION, DATA_LOSS for create, checkpoint and
restore problems.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc

from downpour import metrics, optim
from downpour.checkpoint import shardfile as ckpt
from downpour.paramserver import errors, initial
from downpour.paramserver.assembly import Assembly
from downpour.paramserver.attachments import Attachments
from downpour.paramserver.blockinfo import block_info
from downpour.paramserver.checkpointing import Checkpointing
from downpour.paramserver.creation import BlockCreation
from downpour.paramserver.quota import (
    BYTES_PER_VALUE,
    DEFAULT_MAX_BLOCKS,
    BlockQuota,
    default_shared_bytes,
    default_store_bytes,
)
from downpour.paramserver.shared_plane import SharedPlane
from downpour.paramserver.store import Block, OptimizerConfig, ShardStore, StoreError
from downpour.rpc import codec, logs, lowp
from downpour.rpc.server import Server, ServerConfig
from downpour.v1 import common_pb2
from downpour.v1 import paramserver_pb2 as pb

log = logging.getLogger("downpour.paramserver")

SERVICE = "downpour.v1.ParameterServer"
CREATE_PAYLOAD = (1, 15)  # CreateBlocksRequest.chunk.data
PULL_PAYLOAD = (1, 15)  # PullResponse.chunk.data
PUSH_PAYLOAD = (3, 15)  # PushRequest.chunk.data
HEADER_ROOM = 64 << 10  # bytes reserved for a chunk's non-payload fields
MAX_BLOCK_BYTES = 8 << 30  # one block's weights; a larger shape is refused before anything is allocated

# The RPCs with one request and one response, each served by the method of its name.
UNARY = ("ListBlocks", "Checkpoint", "Restore", "SetOptimizer", "InitBlocks", "AttachShared", "PushPullShared")


class ParameterServer(BlockCreation, Checkpointing, SharedPlane):
    """One shard's RPCs: Pull, Push, InitBlocks, ListBlocks and SetOptimizer here.

    The rest come mixed in: CreateBlocks from creation.py, Checkpoint and Restore
    from checkpointing.py, AttachShared and PushPullShared from shared_plane.py.
    """

    def __init__(
        self,
        store: ShardStore,
        checkpoint_dir: str = "",
        chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES,
        max_message_bytes: int = 64 << 20,
        apply_threads: int = 2,
        max_pending_blocks: int = 2,
        max_store_bytes: int = 0,
        max_blocks: int = 0,
        max_shared_bytes: int = 0,
    ) -> None:
        """The ``max_*`` quotas (quota.py) are off at 0; ``downpour serve paramserver`` sets them from its flags."""
        self.store = store
        self._appliers = ThreadPoolExecutor(apply_threads, thread_name_prefix="apply") if apply_threads > 0 else None
        self.max_pending_blocks = max_pending_blocks
        self.checkpoint_dir = checkpoint_dir
        self.chunk_bytes = max(4, min(chunk_bytes, max_message_bytes - HEADER_ROOM))
        self.shard = str(store.shard_index)
        self.max_block_bytes = MAX_BLOCK_BYTES
        self.quota = BlockQuota(max_store_bytes, max_blocks)
        # co-located clients' shared-memory regions (attachments.py)
        self.attachments = Attachments(max_bytes=max_shared_bytes)

    # -- helpers ---------------------------------------------------------------
    def _gauges(self) -> None:
        metrics.PS_BLOCKS.labels(self.shard).set(len(self.store.blocks))
        metrics.PS_PARAMETERS.labels(self.shard).set(self.store.num_parameters)

    def handlers(self) -> grpc.GenericRpcHandler:
        def raw(cls: Any, path: tuple[int, ...]) -> Any:
            return lambda data: codec.decode(cls, data, path)

        table = {
            name: grpc.unary_unary_rpc_method_handler(
                getattr(self, name),
                request_deserializer=getattr(pb, f"{name}Request").FromString,
                response_serializer=getattr(pb, f"{name}Response").SerializeToString,
            )
            for name in UNARY
        }
        table["CreateBlocks"] = grpc.stream_unary_rpc_method_handler(
            self.CreateBlocks,
            request_deserializer=raw(pb.CreateBlocksRequest, CREATE_PAYLOAD),
            response_serializer=pb.CreateBlocksResponse.SerializeToString,
        )
        table["Pull"] = grpc.unary_stream_rpc_method_handler(
            self.Pull, request_deserializer=pb.PullRequest.FromString, response_serializer=None
        )
        table["Push"] = grpc.stream_unary_rpc_method_handler(
            self.Push,
            request_deserializer=raw(pb.PushRequest, PUSH_PAYLOAD),
            response_serializer=pb.PushResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(SERVICE, table)

    # -- RPCs --------------------------------------------------------------------
    def Pull(self, request: pb.PullRequest, context: Any) -> Iterator[bytes]:
        try:
            names = list(request.names) or list(self.store.blocks)
            blocks = [self.store.get(n) for n in names]
        except StoreError as e:
            errors.abort(context, e)
        limit = self.chunk_bytes if request.max_chunk_bytes <= 0 else min(request.max_chunk_bytes, self.chunk_bytes)
        acc = request.part == pb.BLOCK_PART_ACCUMULATOR
        part = pb.BLOCK_PART_ACCUMULATOR if acc else pb.BLOCK_PART_WEIGHTS
        dt = request.dtype or common_pb2.DTYPE_FLOAT32
        if dt not in lowp.ITEMSIZE or (acc and dt != common_pb2.DTYPE_FLOAT32):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"dtype {codec.dtype_name(dt)}: weights travel as float32, "
                "bfloat16 or float16, accumulators as float32",
            )
        sent = 0
        for blk in blocks:
            # Encode a whole block under its lock (one copy, which is also the
            # snapshot), then send it without holding the lock.
            with blk.lock:
                arr = blk.acc if acc else blk.w
                msgs = [
                    codec.encode(
                        pb.PullResponse(
                            chunk=common_pb2.TensorChunk(
                                name=blk.name, dtype=dt, shape=blk.shape, offset=a, last=b >= blk.size
                            ),
                            version=blk.version,
                            part=part,
                        ),
                        PULL_PAYLOAD,
                        lowp.encode(arr[a:b], dt),
                    )
                    for a, b in codec.chunk_spans(blk.size, lowp.ITEMSIZE[dt], limit)
                ]
            yield from msgs
            sent += blk.size * lowp.ITEMSIZE[dt]
            del msgs
        metrics.PS_PULL_BYTES.labels(self.shard).inc(sent)

    def _apply_block(self, worker: str, seq: int, blk: Block, asm: Assembly, base: int) -> bool:
        t0 = time.perf_counter()
        before = self.store.apply_once(worker, seq, blk, asm.chunks)
        asm.chunks = []  # let the received buffers go
        if before is None:
            return False
        metrics.PS_APPLY_SECONDS.labels(self.shard).observe(time.perf_counter() - t0)
        metrics.PS_STALENESS.labels(self.shard).observe(max(0, before - base))
        metrics.PS_UPDATES.labels(self.shard).inc()
        metrics.PS_PUSH_BYTES.labels(self.shard).inc(asm.size * 4)
        return True

    def Push(self, requests: Iterator[tuple[pb.PushRequest, memoryview]], context: Any) -> pb.PushResponse:
        """Validate each block as its chunks arrive; apply it as soon as it is complete.

        Applying happens on the shard's apply threads, so the next block is
        being received while the previous one is applied.
        """
        store = self.store
        worker, seq = "", 0
        asms: dict[str, tuple[Block, Assembly, int]] = {}
        jobs: list[tuple[Block, Any]] = []
        committed = False
        error: StoreError | None = None
        try:
            for i, (req, payload) in enumerate(requests):
                if committed:
                    raise StoreError("invalid", "push message after commit", reason="malformed")
                committed = req.commit
                if i == 0:
                    worker, seq = req.worker_id, req.seq
                    if not worker:
                        raise StoreError(
                            "invalid",
                            "push without worker_id (needed to apply a retried push at most once)",
                            reason="bad_identity",
                        )
                elif (req.worker_id and req.worker_id != worker) or (req.seq and req.seq != seq):
                    raise StoreError(
                        "invalid",
                        f"push mixes ({req.worker_id!r}, {req.seq}) into ({worker!r}, {seq})",
                        reason="bad_identity",
                    )
                if not req.HasField("chunk"):
                    continue
                c = req.chunk
                entry = asms.get(c.name)
                if entry is None:
                    blk = store.get(c.name)
                    entry = asms[c.name] = (blk, Assembly(c.name, blk.shape, blk.size, reduced=True), req.base_version)
                blk, asm, base = entry
                asm.add(c, payload, check_finite=True)
                if asm.next == asm.size:
                    # Bound the memory held by blocks waiting to be applied.
                    while sum(not f.done() for _, f in jobs) >= self.max_pending_blocks:
                        next(f for _, f in jobs if not f.done()).result()
                    if self._appliers is None:  # --apply-threads 0: apply inline
                        fut: Any = Future()
                        fut.set_result(self._apply_block(worker, seq, blk, asm, base))
                    else:
                        fut = self._appliers.submit(self._apply_block, worker, seq, blk, asm, base)
                    jobs.append((blk, fut))
            # gRPC ends the request iterator quietly when the call fails (a
            # message over the limit, a cancel): only a commit proves the end.
            if not committed or not context.is_active():
                raise StoreError("invalid", "push ended without commit", reason="no_commit")
            for _, asm, _ in asms.values():
                asm.check_complete()
        except StoreError as e:
            error = e
        applied = [(blk, f.result()) for blk, f in jobs]  # finish what was started, then answer
        if error is not None:
            metrics.PS_PUSHES.labels(self.shard, "rejected").inc()
            # Blocks completed before the error are applied (now or by an earlier attempt).
            errors.abort(context, error, applied=[b.name for b, _ in applied])
        duplicate = bool(applied) and not any(ok for _, ok in applied)
        metrics.PS_PUSHES.labels(self.shard, "duplicate" if duplicate else "applied").inc()
        if not duplicate:
            metrics.PS_WORKER_PUSHES.labels(self.shard, metrics.worker_label(worker)).inc()
        return pb.PushResponse(blocks=[block_info(b) for b, _ in applied], duplicate=duplicate)

    def InitBlocks(self, request: pb.InitBlocksRequest, context: Any) -> pb.InitBlocksResponse:
        """This shard's blocks with their initial values, made here (see initial.py)."""
        if not request.overwrite:
            exists = [n for n in request.names if n in self.store.blocks]
            if exists:
                context.abort(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"block {exists[0]!r} already exists on shard {self.store.shard_index}",
                )
        created, taken = [], []
        held = (0, 0)

        def admit(sizes: dict[str, int]) -> None:
            # The spec's whole size against the quota, before the first block is allocated.
            nonlocal held
            want = (sum(sizes.values()) * BYTES_PER_VALUE, len(sizes))
            why = self.quota.reserve(
                f"InitBlocks of {len(sizes)} blocks ({sum(sizes.values())} values)", self._stored(), want
            )
            if why is not None:
                raise StoreError("exhausted", why)
            held = want

        try:
            for name, shape, values, from_ck in initial.make_blocks(request.job_yaml, list(request.names), admit):
                created.append(self.store.create(name, shape, values, overwrite=True))
                if from_ck:
                    taken.append(name)
        except initial.InitError as e:
            code = grpc.StatusCode.INVALID_ARGUMENT if e.kind == "invalid" else grpc.StatusCode.FAILED_PRECONDITION
            context.abort(code, str(e))
        except StoreError as e:
            errors.abort(context, e)
        finally:
            self.quota.release(held)
        self._gauges()
        log.info(
            "created %d blocks (%d parameters), %d of them from init_from",
            len(created),
            sum(b.size for b in created),
            len(taken),
        )
        return pb.InitBlocksResponse(blocks=[block_info(b) for b in created], from_checkpoint=taken)

    def ListBlocks(self, request: pb.ListBlocksRequest, context: Any) -> pb.ListBlocksResponse:
        return pb.ListBlocksResponse(
            shard_index=self.store.shard_index,
            blocks=[block_info(b) for b in list(self.store.blocks.values())],
            optimizer=optim.to_proto(self.store.optimizer),
        )

    def SetOptimizer(self, request: pb.SetOptimizerRequest, context: Any) -> pb.SetOptimizerResponse:
        try:
            self.store.optimizer = optim.from_proto(request.optimizer)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid optimizer: {e}")
        return pb.SetOptimizerResponse(optimizer=optim.to_proto(self.store.optimizer))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="downpour serve paramserver", description="one parameter-server shard")
    ServerConfig.add_arguments(ap, port=7100)
    ap.add_argument("--shard-index", type=int, default=0)
    ap.add_argument("--checkpoint-dir", default="", help="where Checkpoint writes <id>/shard-<i>.ckpt")
    ap.add_argument("--restore", default="", metavar="ID", help="load this checkpoint before serving")
    job = OptimizerConfig()  # the job's defaults: a shard alone applies what a job would
    ap.add_argument("--optimizer", choices=optim.KINDS, default=job.kind)
    ap.add_argument("--lr", type=float, default=job.lr)
    ap.add_argument("--eps", type=float, default=job.eps)
    ap.add_argument("--initial-accumulator", type=float, default=job.initial_accumulator)
    ap.add_argument("--chunk-bytes", type=int, default=codec.DEFAULT_CHUNK_BYTES, help="payload bytes per Pull message")
    ap.add_argument(
        "--apply-threads", type=int, default=2, help="threads applying pushed blocks (0: apply on the receiving thread)"
    )
    ap.add_argument(
        "--max-store-bytes",
        type=int,
        default=None,
        help="quota: bytes of blocks this shard holds, 8 per value (weights and accumulators); "
        "CreateBlocks and InitBlocks over it are refused before anything is allocated "
        "(default: three quarters of the machine's memory; 0: no quota)",
    )
    ap.add_argument(
        "--max-blocks",
        type=int,
        default=DEFAULT_MAX_BLOCKS,
        help="quota: blocks this shard holds (0: no quota)",
    )
    ap.add_argument(
        "--max-shared-bytes",
        type=int,
        default=None,
        help="quota: bytes of the shared-memory regions of co-located clients together "
        "(default: half the machine's memory; 0: no quota)",
    )
    logs.add_log_level_argument(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level)
    cfg = ServerConfig.from_args(args)
    store = ShardStore(args.shard_index, OptimizerConfig(args.optimizer, args.lr, args.eps, args.initial_accumulator))
    ps = ParameterServer(
        store,
        args.checkpoint_dir,
        args.chunk_bytes,
        cfg.max_message_bytes,
        args.apply_threads,
        max_store_bytes=default_store_bytes() if args.max_store_bytes is None else args.max_store_bytes,
        max_blocks=args.max_blocks,
        max_shared_bytes=default_shared_bytes() if args.max_shared_bytes is None else args.max_shared_bytes,
    )
    server = Server(f"paramserver-{args.shard_index}", cfg)
    server.add(lambda s: s.add_generic_rpc_handlers((ps.handlers(),)), SERVICE)
    port = server.start()
    print(f"paramserver shard {args.shard_index} listening on port {port}", file=sys.stderr, flush=True)
    if args.restore:
        try:
            ps.restore(ckpt.shard_path(args.checkpoint_dir, args.restore, args.shard_index))
        except (ckpt.CheckpointError, ValueError) as e:
            print(f"paramserver: cannot restore: {e}", file=sys.stderr)
            server.stop(0)
            return 1
    ps._gauges()
    server.set_serving()
    server.wait()
    return 0
