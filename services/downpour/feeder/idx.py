"""Reader for the IDX format of MNIST (and its kin), plain or gzip-compressed.

Layout (all big-endian): two zero bytes, a dtype code, the number of
dimensions d, then d uint32 sizes, then the data in C order. Dtype codes:
0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64.
A file is gzip-compressed when it starts with the gzip magic (1f 8b), whatever
its name. Uncompressed files are memory-mapped, so a large file costs nothing
until read.

    from downpour.feeder.idx import read_idx
    x = read_idx("train-images-idx3-ubyte.gz")   # (60000, 28, 28) uint8
"""

from __future__ import annotations

import gzip
import os
import re
import struct
from pathlib import Path

import numpy as np

DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def _parse_header(head: bytes, path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in DTYPES:
        raise ValueError(
            f"{path}: not an IDX file (expected 00 00 <dtype code> <ndim> magic, "
            f"dtype code one of {[hex(c) for c in DTYPES]})"
        )
    ndim = head[3]
    end = 4 + 4 * ndim
    if len(head) < end:
        raise ValueError(f"{path}: IDX header truncated (needs {ndim} dimension sizes)")
    dims = struct.unpack(f">{ndim}I", head[4:end])
    return DTYPES[head[2]], tuple(dims), end


def is_idx(path: str | os.PathLike) -> bool:
    """True when the file's first bytes are a valid IDX magic number."""
    path = Path(path)
    try:
        opener = gzip.open if _is_gzip(path) else open
        with opener(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and head[0] == 0 and head[1] == 0 and head[2] in DTYPES


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in an IDX file, in native byte order for multi-byte types."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} does not exist")
    if _is_gzip(path):
        with gzip.open(path, "rb") as f:
            raw = f.read()
        dtype, dims, off = _parse_header(raw[: 4 + 4 * 255], path)
        count = int(np.prod(dims, dtype=np.int64))
        if len(raw) - off < count * dtype.itemsize:
            raise ValueError(
                f"{path}: IDX data truncated: header says {dims} of {dtype}, file holds {len(raw) - off} bytes"
            )
        arr = np.frombuffer(raw, dtype=dtype, count=count, offset=off).reshape(dims)
    else:
        with open(path, "rb") as f:
            head = f.read(4 + 4 * 255)
        dtype, dims, off = _parse_header(head, path)
        count = int(np.prod(dims, dtype=np.int64))
        if path.stat().st_size - off < count * dtype.itemsize:
            raise ValueError(
                f"{path}: IDX data truncated: header says {dims} of {dtype}, "
                f"file holds {path.stat().st_size - off} bytes"
            )
        arr = np.memmap(path, dtype=dtype, mode="r", offset=off, shape=dims) if count else np.zeros(dims, dtype)
    return arr.astype(dtype.newbyteorder("="), copy=False) if dtype.itemsize > 1 else arr


def labels_path_for(images_path: str | os.PathLike) -> Path | None:
    """The labels file that goes with an images file, if one exists next to it.

    MNIST's naming: ``train-images-idx3-ubyte[.gz]`` pairs with
    ``train-labels-idx1-ubyte[.gz]`` (either compression); ``t10k-images.idx3-ubyte``
    style dots are handled too.
    """
    p = Path(images_path)
    name = re.sub(r"\.gz$", "", p.name)
    if "images" not in name:
        return None
    base = re.sub(r"idx\d", "idx1", name.replace("images", "labels"))
    for cand in (base, base + ".gz"):
        q = p.with_name(cand)
        if q.is_file() and q != p:
            return q
    return None
