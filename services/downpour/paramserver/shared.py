"""The co-located data plane: parameters and gradients through shared memory.

When a worker and a shard share a host, sending 2 x 10 MB per step through
gRPC costs both processes more CPU than the step's own compute (grpcio's
copies and protobuf framing, about 1.5 CPU-s per GB on each side). BytePS
solves the same problem for co-located servers with shared memory; so do we:
the client creates a file under ``/dev/shm`` holding a weight region and a
gradient region for its blocks, the shard maps it (``AttachShared``), and a
``PushPullShared`` call carries only control: "apply the gradient region",
"copy the current weights into the weight region", or both in one round trip.
Across hosts or containers the shard cannot open the file, answers
FAILED_PRECONDITION, and the client keeps to ordinary Pull and Push.

Safety: the shard opens only regular files named ``downpour-*`` directly in
its shared-memory directory, without following links, whose size matches the
request and whose first 16 bytes are the token the client sent over the
authenticated channel. A gradient is copied out of the region before it is
validated and applied, so a client that writes during the call cannot slip
unvalidated values past the NaN/Inf check. Pushes keep their (worker, seq)
accounting, so a retried push is applied at most once, as over gRPC.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from downpour import metrics, optim
from downpour.paramserver import errors
from downpour.paramserver.store import Block, ShardStore, StoreError
from downpour.v1 import common_pb2
from downpour.v1 import paramserver_pb2 as pb

SHM_DIR = "/dev/shm"
HEADER = 64  # bytes before the weight region; the first 16 are the token
TOKEN_BYTES = 16
MAX_ATTACHMENTS = 1024  # per shard: a client that attaches in a loop cannot exhaust memory
_NAME = re.compile(r"downpour-[A-Za-z0-9_.-]{1,200}")


class SharedError(StoreError):
    """A shared-memory request the shard refuses (kinds also "precondition", "exhausted")."""


def usable(directory: str = SHM_DIR) -> bool:
    """True where this process can create shared-memory files."""
    return os.path.isdir(directory) and os.access(directory, os.W_OK)


class Region:
    """A mapped shared file: the weight and gradient regions of ``n`` float32 values."""

    def __init__(self, path: str, n: int, fd: int, create: bool, token: bytes = b"") -> None:
        self.path, self.n = path, n
        size = HEADER + 8 * n
        try:
            if create:
                os.ftruncate(fd, size)
            self.mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        if create:
            self.mm[:TOKEN_BYTES] = token
        buf = np.frombuffer(self.mm, dtype="<f4", count=2 * n, offset=HEADER)
        self.weights, self.grads = buf[:n], buf[n:]

    @classmethod
    def create(cls, n: int, directory: str = SHM_DIR) -> tuple[Region, bytes]:
        """A new file for ``n`` values, readable and writable by this user only."""
        token = secrets.token_bytes(TOKEN_BYTES)
        path = os.path.join(directory, f"downpour-{os.getpid()}-{secrets.token_hex(8)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        return cls(path, n, fd, True, token), token

    @classmethod
    def open(cls, path: str, n: int, token: bytes, directory: str = SHM_DIR) -> Region:
        """Map a client's file after checking that it is what the client says it is."""
        d, name = os.path.split(path)
        if os.path.realpath(d or ".") != os.path.realpath(directory) or not _NAME.fullmatch(name):
            raise SharedError("invalid", f"path {path!r} is not a downpour-* file directly in {directory}")
        if len(token) != TOKEN_BYTES:
            raise SharedError("invalid", f"token has {len(token)} bytes, expected {TOKEN_BYTES}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise SharedError("precondition", f"{path} does not exist here (client on another host?)") from None
        except OSError as e:
            raise SharedError("precondition", f"cannot open {path}: {e.strerror}") from None
        st = os.fstat(fd)
        want = HEADER + 8 * n
        if not stat.S_ISREG(st.st_mode) or st.st_size != want:
            os.close(fd)
            raise SharedError("invalid", f"{path}: not a regular file of {want} bytes for {n} values")
        r = cls(path, n, fd, False)
        if not secrets.compare_digest(bytes(r.mm[:TOKEN_BYTES]), token):
            r.close()
            raise SharedError("precondition", f"{path}: token does not match (a namesake, not the client's file)")
        return r

    def close(self, unlink: bool = False) -> None:
        self.weights = self.grads = None  # type: ignore[assignment]  # views must go before the map closes
        try:
            self.mm.close()
        except BufferError:
            pass  # a caller still holds a view: the map closes with it
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


@dataclass
class Attachment:
    region: Region
    names: list[str]
    offsets: list[tuple[int, int]]  # (start, end) of each block in either region
    lock: threading.Lock  # one call at a time per attachment
    # The shard's private copy of the gradient region, reused: a fresh 10 MB array per push
    # would cost its page faults every time.
    private: np.ndarray | None = None


def layout(sizes: list[int]) -> list[tuple[int, int]]:
    out, at = [], 0
    for s in sizes:
        out.append((at, at + s))
        at += s
    return out


class Attachments:
    """The shard's mapped files, one per worker id (a new attach replaces the old)."""

    def __init__(self, directory: str = SHM_DIR) -> None:
        self.directory = directory
        self._by_worker: dict[str, Attachment] = {}
        self._lock = threading.Lock()

    def attach(self, worker: str, path: str, token: bytes, names: list[str], sizes: list[int]) -> Attachment:
        if not worker:
            raise SharedError("invalid", "AttachShared without worker_id")
        if len(set(names)) != len(names) or not names:
            raise SharedError("invalid", "names must be a non-empty list without repeats")
        region = Region.open(path, int(sum(sizes)), token, self.directory)
        att = Attachment(region, list(names), layout(sizes), threading.Lock())
        with self._lock:
            old = self._by_worker.pop(worker, None)
            if old is None and len(self._by_worker) >= MAX_ATTACHMENTS:
                region.close()
                raise SharedError("exhausted", f"this shard already maps {MAX_ATTACHMENTS} shared files")
            self._by_worker[worker] = att
        if old is not None:
            with old.lock:
                old.region.close()
        return att

    def get(self, worker: str) -> Attachment:
        with self._lock:
            att = self._by_worker.get(worker)
        if att is None:
            raise SharedError(
                "precondition", f"worker {worker!r} has no shared file attached on this shard", reason="not_attached"
            )
        return att

    def close(self) -> None:
        with self._lock:
            atts, self._by_worker = list(self._by_worker.values()), {}
        for a in atts:
            a.region.close()


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
                            f"block {blk.name!r} now has {blk.size} values, the shared file {b - a}: attach again",
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
                        metrics.PS_WORKER_PUSHES.labels(self.shard, worker).inc()
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


def block_info(b: Block) -> pb.BlockInfo:
    return pb.BlockInfo(
        name=b.name, dtype=common_pb2.DTYPE_FLOAT32, shape=b.shape, num_elements=b.size, version=b.version
    )
