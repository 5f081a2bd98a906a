"""The co-located data plane: parameters and gradients through shared memory.

When a worker and a shard share a host, sending 2 x 10 MB per step through
gRPC costs both processes more CPU than the step's own compute (grpcio's
copies and protobuf framing, about 1.5 CPU-s per GB on each side). BytePS
solves the same problem for co-located servers with shared memory; so do we:
the shard makes a region holding a weight region and a gradient region for a
client's blocks (``AttachShared``) and hands it to the client, and a
``PushPullShared`` call carries only control: "apply the gradient region",
"copy the current weights into the weight region", or both in one round trip.

The shard owns the memory, so that no client can take it away from under the
shard's mapping (a mapped file that shrinks kills the process touching it with
SIGBUS). Attaching: the client listens on a Unix socket named ``downpour-*``
directly in its shared-memory directory (``/dev/shm``) and sends the socket's
path and 16 random bytes (the token) over the authenticated gRPC channel. The
shard checks the request against ``--max-shared-bytes``, connects to the
socket, checks with SO_PEERCRED that its peer runs as the shard's user, makes
an anonymous ``memfd_create`` region, allocates all of it (``posix_fallocate``:
memory the host does not have is refused now, with RESOURCE_EXHAUSTED, rather
than faulting later), seals it against shrinking and against further seals
(``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``), maps it and sends the file
descriptor with the token (SCM_RIGHTS). The region has no name anyone else can
open, its size cannot change, and the pages stay allocated; a client that
punches holes into it only gets zeros back. Across hosts or containers the
shard cannot reach the socket, answers FAILED_PRECONDITION having allocated
nothing, and the client keeps to ordinary Pull and Push.

A gradient is copied out of the region before it is validated and applied, so
a client that writes during the call cannot slip unvalidated values past the
NaN/Inf check. Pushes keep their (worker, seq) accounting, so a retried push
is applied at most once, as over gRPC.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import secrets
import socket
import stat
import struct
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
HEADER = 64  # bytes before the weight region
TOKEN_BYTES = 16
MAX_ATTACHMENTS = 1024  # per shard: a client that attaches in a loop cannot exhaust memory
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
SOCKET_TIMEOUT = 5.0  # seconds the shard waits on a client's socket: a client that never reads holds no thread
_NAME = re.compile(r"downpour-[A-Za-z0-9_.-]{1,200}")
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_HELLO = struct.Struct(f"<{TOKEN_BYTES}sQ")  # what comes with the descriptor: the token, the region's bytes


class SharedError(StoreError):
    """A shared-memory request the shard refuses (kinds also "precondition", "exhausted", "permission")."""


def usable(directory: str = SHM_DIR) -> bool:
    """True where this process can make shared-memory regions and meet a shard in ``directory``."""
    return hasattr(os, "memfd_create") and os.path.isdir(directory) and os.access(directory, os.W_OK)


def region_bytes(n: int) -> int:
    """The size of a region for ``n`` values: the header, then ``n`` weights and ``n`` gradients."""
    return HEADER + 8 * n


class Region:
    """A mapped shared-memory region: the weight and gradient regions of ``n`` float32 values."""

    def __init__(self, fd: int, n: int) -> None:
        self.n = n
        self.mm = mmap.mmap(fd, region_bytes(n))
        buf = np.frombuffer(self.mm, dtype="<f4", count=2 * n, offset=HEADER)
        self.weights, self.grads = buf[:n], buf[n:]

    @classmethod
    def allocate(cls, n: int) -> tuple[Region, int]:
        """A new sealed region for ``n`` values, all of it allocated, and its descriptor (the caller closes it)."""
        size = region_bytes(n)
        fd = os.memfd_create("downpour-shared", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                raise SharedError(
                    "exhausted",
                    f"cannot allocate {size} bytes of shared memory for {n} values: {e.strerror} (a memfd "
                    "region: it counts against the host's or container's memory, not against /dev/shm)",
                ) from None
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            return cls(fd, n), fd
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def adopt(cls, fd: int, n: int) -> Region:
        """Map a region a shard sent (and close the descriptor): it must be sealed and of the expected size."""
        try:
            size = os.fstat(fd).st_size
            if size != region_bytes(n):
                raise ValueError(f"the shard sent a region of {size} bytes, expected {region_bytes(n)}")
            if not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
                raise ValueError("the shard sent a region that is not sealed against shrinking")
            return cls(fd, n)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.weights = self.grads = None  # type: ignore[assignment]  # views must go before the map closes
        try:
            self.mm.close()
        except BufferError:
            pass  # a caller still holds a view: the map closes with it


def listen(directory: str = SHM_DIR) -> tuple[socket.socket, str]:
    """The client's side of an attach: a Unix socket for the shard to send the region to, and its path."""
    path = os.path.join(directory, f"downpour-{os.getpid()}-{secrets.token_hex(8)}.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        os.chmod(path, 0o600)
        s.listen(8)
    except BaseException:
        s.close()
        raise
    return s, path


def receive(listener: socket.socket, token: bytes, n: int) -> Region:
    """After AttachShared returned: the region the shard sent to ``listener`` with ``token``.

    The shard sent it before answering, so it is waiting in the socket's
    queue; a connection that does not carry our token is someone else's and
    is dropped, with any descriptor it passed.
    """
    listener.setblocking(False)
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            raise ValueError("the shard answered AttachShared but sent no region") from None
        with conn:
            conn.settimeout(1.0)
            try:
                msg, fds, _, _ = socket.recv_fds(conn, 64, 1)
            except OSError:
                continue
            if len(msg) == _HELLO.size and len(fds) == 1:
                got, size = _HELLO.unpack(msg)
                if secrets.compare_digest(got, token) and size == region_bytes(n):
                    return Region.adopt(fds[0], n)
            for fd in fds:
                os.close(fd)


@dataclass
class Attachment:
    region: Region
    names: list[str]
    offsets: list[tuple[int, int]]  # (start, end) of each block in either region
    lock: threading.Lock  # one call at a time per attachment
    nbytes: int = 0  # the region's size, counted against --max-shared-bytes
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
    """The shard's shared regions, one per worker id (a new attach replaces the old).

    ``max_bytes`` bounds the bytes of all regions together (--max-shared-bytes):
    an attach that would pass it is refused before anything is allocated.
    """

    def __init__(self, directory: str = SHM_DIR, max_bytes: int = 0) -> None:
        self.directory = directory
        self.max_bytes = max_bytes  # 0: no bound
        self._by_worker: dict[str, Attachment] = {}
        self._bytes = 0  # of the regions attached and being made
        self._lock = threading.Lock()

    def _check_path(self, path: str) -> None:
        d, name = os.path.split(path)
        if os.path.realpath(d or ".") != os.path.realpath(self.directory) or not _NAME.fullmatch(name):
            raise SharedError("invalid", f"path {path!r} is not a downpour-* socket directly in {self.directory}")

    def _connect(self, path: str) -> socket.socket:
        """The client's socket, if it is here: proves the client shares this host's shared-memory directory."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise SharedError("precondition", f"{path} does not exist here (client on another host?)") from None
        except OSError as e:
            raise SharedError("precondition", f"cannot look at {path}: {e.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise SharedError("precondition", f"{path} is not a Unix socket")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(SOCKET_TIMEOUT)
        try:
            s.connect(path)
            _, uid, _ = _CRED.unpack(s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
        except OSError as e:
            s.close()
            raise SharedError("precondition", f"cannot connect to {path}: {e.strerror or e}") from None
        me = os.geteuid()
        if uid != me and me != 0:
            s.close()
            raise SharedError("permission", f"{path} belongs to a process of user {uid}, this shard runs as {me}")
        return s

    def _release(self, att: Attachment) -> None:
        with self._lock:
            self._bytes -= att.nbytes
        with att.lock:
            att.region.close()

    def attach(self, worker: str, path: str, token: bytes, names: list[str], sizes: list[int]) -> Attachment:
        if not worker:
            raise SharedError("invalid", "AttachShared without worker_id")
        if len(set(names)) != len(names) or not names:
            raise SharedError("invalid", "names must be a non-empty list without repeats")
        if len(token) != TOKEN_BYTES:
            raise SharedError("invalid", f"token has {len(token)} bytes, expected {TOKEN_BYTES}")
        self._check_path(path)
        n = int(sum(sizes))
        size = region_bytes(n)
        with self._lock:  # the worker's old region goes first: a new attach replaces it
            old = self._by_worker.pop(worker, None)
        if old is not None:
            self._release(old)
        with self._lock:
            if len(self._by_worker) >= MAX_ATTACHMENTS:
                raise SharedError("exhausted", f"this shard already maps {MAX_ATTACHMENTS} shared regions")
            if self.max_bytes and self._bytes + size > self.max_bytes:
                raise SharedError(
                    "exhausted",
                    f"a shared region of {size} bytes would take this shard's shared memory to "
                    f"{self._bytes + size} bytes, over its quota --max-shared-bytes={self.max_bytes}",
                )
            self._bytes += size  # reserved before anything is allocated
        made = False
        try:
            conn = self._connect(path)  # nothing is allocated for a client that is not here
            with conn:
                region, fd = Region.allocate(n)
                try:
                    try:
                        socket.send_fds(conn, [_HELLO.pack(token, size)], [fd])
                    except OSError as e:
                        region.close()
                        raise SharedError(
                            "precondition", f"cannot send the region to {path}: {e.strerror or e}"
                        ) from None
                finally:
                    os.close(fd)  # the mapping and the client's copy keep the region
            made = True
        finally:
            if not made:
                with self._lock:
                    self._bytes -= size
        att = Attachment(region, list(names), layout(sizes), threading.Lock(), size)
        with self._lock:
            twin = self._by_worker.pop(worker, None)  # a concurrent attach of the same worker
            self._by_worker[worker] = att
        if twin is not None:
            self._release(twin)
        return att

    def get(self, worker: str) -> Attachment:
        with self._lock:
            att = self._by_worker.get(worker)
        if att is None:
            raise SharedError(
                "precondition", f"worker {worker!r} has no shared region attached on this shard", reason="not_attached"
            )
        return att

    def close(self) -> None:
        with self._lock:
            atts, self._by_worker = list(self._by_worker.values()), {}
        for a in atts:
            self._release(a)


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


def block_info(b: Block) -> pb.BlockInfo:
    return pb.BlockInfo(
        name=b.name, dtype=common_pb2.DTYPE_FLOAT32, shape=b.shape, num_elements=b.size, version=b.version
    )
