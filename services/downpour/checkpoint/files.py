"""Whole-or-nothing file writes and whole-file checksums, for checkpoints and the coordinator's state."""

from __future__ import annotations

import errno
import os
import zlib

# Write errors that mean "no room": the disk (or the quota, or the file size limit) is full.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``path`` whole or not at all (temp file, fsync, rename, fsync of the folder).

    A failed write (a full disk) leaves the old file as it was and no temp file behind.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
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
