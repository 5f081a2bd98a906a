"""Whole-or-nothing file writes and whole-file checksums, for checkpoints and the coordinator's state."""

from __future__ import annotations

import errno
import os
import zlib

# Write errors that mean "no room": the disk (or the quota, or the file size limit) is full.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# What os.link raises where the file system has no hard links (some FUSE, SMB and NFS mounts).
NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dir(path: str | os.PathLike) -> bool:
    """Create folder ``path`` (its parents too) durably: the new entry is fsynced in its parent, so
    a crash cannot lose the folder under files already fsynced inside it. True if it was created."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        return False
    parent = os.path.dirname(path)
    make_dir(parent)
    try:
        os.mkdir(path)
    except FileExistsError:
        return False
    fsync_dir(parent)
    return True


def _write_synced(tmp: str, chunks) -> tuple[int, int]:
    """Write ``chunks`` (bytes-like) to the new file ``tmp`` and fsync it; (crc32, size) of what was written."""
    crc, size = 0, 0
    with open(tmp, "wb") as f:
        for part in chunks:
            f.write(part)
            crc, size = zlib.crc32(part, crc), size + memoryview(part).nbytes
        f.flush()
        os.fsync(f.fileno())
    return crc, size


def write_new(path: str | os.PathLike, chunks) -> tuple[int, int]:
    """Write ``chunks`` (bytes-like) to ``path`` whole or not at all, and never over an existing file:
    temp file, fsync, then a hard link to the final name (which fails with FileExistsError if the
    name is taken, atomically), fsync of the folder. Returns (crc32, size) of what was written."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        crc, size = _write_synced(tmp, chunks)
        try:
            os.link(tmp, path)
        except OSError as e:
            if e.errno not in NO_HARD_LINKS:
                raise
            # a file system without hard links: check, then rename (not atomic against a second writer)
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path) from None
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(folder or ".")
    return crc, size


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``path`` whole or not at all (temp file, fsync, rename, fsync of the folder).

    A failed write (a full disk) leaves the old file as it was and no temp file behind.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        _write_synced(tmp, (data,))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def file_crc32(path: str | os.PathLike, bufsize: int = 1 << 20) -> tuple[int, int]:
    """(crc32, size) of a whole file."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                return crc, size
            crc, size = zlib.crc32(b, crc), size + len(b)
