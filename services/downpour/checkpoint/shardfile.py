"""One shard's checkpoint file: written atomically, read back verified.

File layout (little-endian)::

    b"DPCKPT1\\n"  u64 header_len  header (JSON)  u32 crc32(header)
    then, per block in header order: weights (float32), accumulator (float32)

The header lists every block (name, shape, version, crc32 of its weights and
of its accumulator) plus the optimiser and the dedup window (which blocks
each recent (worker, seq) has updated), so that a restored shard still
applies a retried push at most once.

Writing is atomic: a temporary file in the same directory, fsync, rename over
the final name, fsync of the directory. Reading verifies every crc32 and
raises ``CheckpointInvalid`` naming the first block that does not match
(``CheckpointNotFound`` when there is no file).
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import numpy as np

from downpour.checkpoint.errors import CheckpointError, CheckpointExists, CheckpointInvalid, CheckpointNotFound
from downpour.checkpoint.files import make_dir, write_new
from downpour.paramserver.store import Block, OptimizerConfig, ShardStore

# The errors ``load`` raises, named here too: a shard restores with this module alone.
__all__ = [
    "MAGIC",
    "CheckpointError",
    "CheckpointInvalid",
    "CheckpointNotFound",
    "block_offsets",
    "load",
    "read_header",
    "read_weights",
    "save",
    "shard_path",
    "valid_id",
]

MAGIC = b"DPCKPT1\n"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def valid_id(checkpoint_id: str) -> bool:
    """A checkpoint id that is safe as one path component (letters, digits, ``._-``; no leading dot)."""
    return bool(_ID.match(checkpoint_id or ""))


def shard_path(directory: str | os.PathLike, checkpoint_id: str, shard_index: int) -> Path:
    """Where shard ``shard_index`` writes its part of checkpoint ``checkpoint_id``; ValueError for a bad id."""
    if not valid_id(checkpoint_id):
        raise ValueError(
            f"invalid checkpoint id {checkpoint_id!r}: letters, digits and ._- only, "
            "not starting with a dot, at most 128 characters"
        )
    return Path(directory) / checkpoint_id / f"shard-{shard_index}.ckpt"


def _size(shape: list[int]) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def save(store: ShardStore, path: Path) -> tuple[int, int, int]:
    """Write the store to ``path`` atomically; returns (num_blocks, num_bytes, crc32 of the file).

    Never over an existing file: a checkpoint id is written once (``CheckpointExists``, checked
    before the copy and again, atomically, when the file takes its name). Holds the store
    exclusively while copying the arrays, so the checkpoint is a consistent cut between pushes;
    the disk writes happen after.
    """
    if path.exists():
        raise CheckpointExists(f"checkpoint file {path} already exists: checkpoint ids are written once")
    store.rw.acquire_exclusive()
    try:
        snap = [(b.name, b.shape, b.version, b.w.copy(), b.acc.copy()) for b in store.blocks.values()]
        dedup = store.dedup_state()
        opt = asdict(store.optimizer)
    finally:
        store.rw.release_exclusive()
    header = {
        "shard_index": store.shard_index,
        "optimizer": opt,
        "dedup": dedup,
        "blocks": [
            {"name": n, "shape": list(s), "version": v, "crc32_w": zlib.crc32(w.data), "crc32_acc": zlib.crc32(a.data)}
            for n, s, v, w, a in snap
        ],
    }
    hdr = json.dumps(header, sort_keys=True).encode()
    make_dir(path.parent)

    def chunks():
        yield from (MAGIC, struct.pack("<Q", len(hdr)), hdr, struct.pack("<I", zlib.crc32(hdr)))
        for _, _, _, w, a in snap:
            yield w.data.cast("B")
            yield a.data.cast("B")

    try:
        crc, size = write_new(path, chunks())
    except FileExistsError:
        raise CheckpointExists(f"checkpoint file {path} already exists: checkpoint ids are written once") from None
    return len(snap), size, crc


def load(path: str | os.PathLike) -> tuple[int, OptimizerConfig, list[Block], dict[str, list[list]]]:
    """Read and verify a checkpoint: (shard_index, optimizer, blocks, dedup)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CheckpointNotFound(f"checkpoint {path} not found") from None
    if not data.startswith(MAGIC):
        raise CheckpointInvalid(f"{path}: not a downpour shard checkpoint")
    pos = len(MAGIC)
    if len(data) < pos + 8:
        raise CheckpointInvalid(f"{path}: truncated header")
    (hlen,) = struct.unpack_from("<Q", data, pos)
    pos += 8
    hdr = data[pos : pos + hlen]
    pos += hlen
    if len(hdr) != hlen or len(data) < pos + 4:
        raise CheckpointInvalid(f"{path}: truncated header")
    (hcrc,) = struct.unpack_from("<I", data, pos)
    pos += 4
    if zlib.crc32(hdr) != hcrc:
        raise CheckpointInvalid(f"{path}: header crc32 mismatch")
    header = json.loads(hdr)
    blocks = []
    for b in header["blocks"]:
        n = _size(b["shape"])
        arrays = []
        for key in ("crc32_w", "crc32_acc"):
            raw = data[pos : pos + 4 * n]
            pos += 4 * n
            if len(raw) != 4 * n:
                raise CheckpointInvalid(f"{path}: truncated at block {b['name']!r}")
            if zlib.crc32(raw) != b[key]:
                what = "weights" if key == "crc32_w" else "accumulator"
                raise CheckpointInvalid(f"{path}: block {b['name']!r}: {what} crc32 mismatch (corrupt checkpoint)")
            arrays.append(np.frombuffer(raw, dtype="<f4").copy())
        blocks.append(Block(b["name"], tuple(b["shape"]), arrays[0], arrays[1], int(b["version"])))
    if pos != len(data):
        raise CheckpointInvalid(f"{path}: {len(data) - pos} unexpected trailing bytes")
    return int(header["shard_index"]), OptimizerConfig(**header["optimizer"]), blocks, header["dedup"]


def _header(f: IO[bytes], path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """(header, offset of the first block) of an open shard file, the header's crc32 checked."""
    head = f.read(len(MAGIC) + 8)
    if len(head) < len(MAGIC) + 8 or not head.startswith(MAGIC):
        raise CheckpointInvalid(f"{path}: not a downpour shard checkpoint")
    (hlen,) = struct.unpack_from("<Q", head, len(MAGIC))
    if hlen > 1 << 30:
        raise CheckpointInvalid(f"{path}: implausible header length {hlen}")
    hdr = f.read(hlen)
    crc = f.read(4)
    if len(hdr) != hlen or len(crc) != 4 or zlib.crc32(hdr) != struct.unpack("<I", crc)[0]:
        raise CheckpointInvalid(f"{path}: truncated or corrupt header")
    return json.loads(hdr), len(MAGIC) + 8 + hlen + 4


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a shard checkpoint file (crc-checked), without reading the arrays."""
    with open(path, "rb") as f:
        return _header(f, path)[0]


def block_offsets(path: str | os.PathLike) -> dict[str, tuple[int, int, int]]:
    """``{block: (offset of its weights, their crc32, element count)}`` from a file's header alone,
    so that one block can be read without reading the others."""
    with open(path, "rb") as f:
        header, pos = _header(f, path)
    out = {}
    for b in header["blocks"]:
        n = _size(b["shape"])
        out[b["name"]] = (pos, int(b["crc32_w"]), n)
        pos += 8 * n  # weights, then the accumulator
    return out


def read_weights(path: str | os.PathLike, offset: int, crc32: int, n: int) -> np.ndarray | None:
    """The ``n`` float32 weights at ``offset`` of a shard file, or None when truncated or corrupt."""
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.read(4 * n)
    if len(raw) != 4 * n or zlib.crc32(raw) != crc32:
        return None
    return np.frombuffer(raw, dtype="<f4")
