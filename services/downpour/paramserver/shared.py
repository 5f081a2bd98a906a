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

This module holds what both sides use: the region (its layout, making,
sealing and mapping it) and its handoff over the Unix socket. The shard's
regions and their quota are in attachments.py, its RPCs in shared_plane.py,
the client's side in shared_client.py.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import socket
import struct

import numpy as np

from downpour.paramserver.store import StoreError

SHM_DIR = "/dev/shm"
HEADER = 64  # bytes before the weight region
TOKEN_BYTES = 16
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
HELLO = struct.Struct(f"<{TOKEN_BYTES}sQ")  # what comes with the descriptor: the token, the region's bytes


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
            if len(msg) == HELLO.size and len(fds) == 1:
                got, size = HELLO.unpack(msg)
                if secrets.compare_digest(got, token) and size == region_bytes(n):
                    return Region.adopt(fds[0], n)
            for fd in fds:
                os.close(fd)


def layout(sizes: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each block in either region: the blocks one after another, in the attach's order."""
    out, at = [], 0
    for s in sizes:
        out.append((at, at + s))
        at += s
    return out
