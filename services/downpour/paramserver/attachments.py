"""The shard's side of an attach: its shared regions, one per worker, and their quota.

How a region reaches a client, and why the shard makes it, is in shared.py.
Here the shard checks an AttachShared request (a ``downpour-*`` socket
directly in its shared-memory directory, a token of the right size), reserves
the region's bytes against ``--max-shared-bytes`` before anything is
allocated, proves the client shares this host (it connects to the socket, and
SO_PEERCRED says the peer runs as the shard's user), then makes the region and
sends it. A worker's new attach replaces its old region.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import struct
import threading
from dataclasses import dataclass

import numpy as np

from downpour.paramserver.shared import HELLO, SHM_DIR, TOKEN_BYTES, Region, SharedError, layout, region_bytes

MAX_ATTACHMENTS = 1024  # per shard: a client that attaches in a loop cannot exhaust memory
SOCKET_TIMEOUT = 5.0  # seconds the shard waits on a client's socket: a client that never reads holds no thread
_NAME = re.compile(r"downpour-[A-Za-z0-9_.-]{1,200}")
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


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
                        socket.send_fds(conn, [HELLO.pack(token, size)], [fd])
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
