"""The AttachShared and PushPullShared RPCs: the shard's half of the shared-memory data plane.

The region and its handoff are in shared.py, the shard's bookkeeping of
regions in attachments.py. A ``PushPullShared`` call carries only control:
the gradient is copied out of the region before it is validated and applied,
so a client that writes during the call cannot slip unvalidated values past
the NaN/Inf check, and pushes keep their (worker, seq) accounting, so a
retried push is applied at most once, as over gRPC.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from downpour import metrics, optim
from downpour.paramserver import errors
from downpour.paramserver.attachments import Attachments
from downpour.paramserver.blockinfo import block_info
from downpour.paramserver.shared import SharedError
from downpour.paramserver.store import ShardStore, StoreError
from downpour.v1 import paramserver_pb2 as pb


class SharedPlane:
    """The AttachShared and PushPullShared RPCs of a ParameterServer (mixed into it)."""

    store: ShardStore
    shard: str
    attachments: Attachments
    _appliers: ThreadPoolExecutor | None

    def AttachShared(self, request: pb.AttachSharedRequest, context: Any) -> pb.AttachSharedResponse:
        try:
            blocks = [self.store.get(n) for n in request.names]
            self.attachments.attach(
                request.worker_id, request.path, bytes(request.token), list(request.names), [b.size for b in blocks]
            )
        except StoreError as e:  # SharedError too
            errors.abort(context, e)
        return pb.AttachSharedResponse(blocks=[block_info(b) for b in blocks])

    def _apply_shared(self, worker: str, seq: int, blk, g: np.ndarray) -> int | None:
        t0 = time.perf_counter()
        before = self.store.apply_once(worker, seq, blk, [(0, g)])
        if before is not None:
            metrics.PS_APPLY_SECONDS.labels(self.shard).observe(time.perf_counter() - t0)
        return before

    def PushPullShared(self, request: pb.PushPullSharedRequest, context: Any) -> pb.PushPullSharedResponse:
        worker, seq = request.worker_id, request.seq
        try:
            att = self.attachments.get(worker)
            with att.lock:
                blocks = [self.store.get(n) for n in att.names]
                for blk, (a, b) in zip(blocks, att.offsets):
                    if blk.size != b - a:
                        raise SharedError(
                            "precondition",
                            f"block {blk.name!r} now has {blk.size} values, the shared region {b - a}: attach again",
                            block=blk.name,
                            reason="not_attached",
                        )
                duplicate = False
                if request.push:
                    if seq == 0:
                        raise SharedError(
                            "invalid",
                            "a push needs seq > 0 (to apply a retried push at most once)",
                            reason="bad_identity",
                        )
                    bases = list(request.base_versions)
                    if bases and len(bases) != len(blocks):
                        raise SharedError("invalid", f"{len(bases)} base_versions for {len(blocks)} attached blocks")
                    # Copy out first, then validate every block, then apply: a client writing
                    # into the region meanwhile cannot get unchecked values applied.
                    if att.private is None:
                        att.private = np.empty(att.region.n, np.float32)
                    np.copyto(att.private, att.region.grads)
                    grads = [att.private[a:b] for a, b in att.offsets]
                    for blk, g in zip(blocks, grads):
                        if not optim.all_finite(g):
                            raise SharedError(
                                "invalid",
                                f"block {blk.name!r}: gradient contains NaN or Inf",
                                block=blk.name,
                                reason="not_finite",
                            )
                    # The client waits for this call: spread the blocks over the apply threads.
                    pool = self._appliers
                    jobs = [
                        pool.submit(self._apply_shared, worker, seq, blk, g)
                        if pool is not None
                        else _done(self._apply_shared(worker, seq, blk, g))
                        for blk, g in zip(blocks, grads)
                    ]
                    applied = 0
                    for i, (blk, job) in enumerate(zip(blocks, jobs)):
                        before = job.result()
                        if before is None:
                            continue
                        applied += 1
                        if bases:
                            metrics.PS_STALENESS.labels(self.shard).observe(max(0, before - bases[i]))
                        metrics.PS_UPDATES.labels(self.shard).inc()
                        metrics.PS_PUSH_BYTES.labels(self.shard).inc(blk.size * 4)
                    duplicate = applied == 0
                    metrics.PS_PUSHES.labels(self.shard, "duplicate" if duplicate else "applied").inc()
                    if not duplicate:
                        metrics.PS_WORKER_PUSHES.labels(self.shard, metrics.worker_label(worker)).inc()
                versions = []
                for blk, (a, b) in zip(blocks, att.offsets):
                    if request.pull:
                        with blk.lock:  # one consistent snapshot per block, as Pull gives
                            np.copyto(att.region.weights[a:b], blk.w)
                            versions.append(blk.version)
                    else:
                        versions.append(blk.version)
                if request.pull:
                    metrics.PS_PULL_BYTES.labels(self.shard).inc(4 * sum(b.size for b in blocks))
        except StoreError as e:  # SharedError too
            # Every block of a push is validated before any is applied: a refused one applied none.
            errors.abort(context, e, applied=[] if request.push else None)
        return pb.PushPullSharedResponse(versions=versions, duplicate=duplicate)


def _done(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f
