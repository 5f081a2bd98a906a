"""Atomic, verified checkpoints of one shard.

File layout (little-endian)::

    b"DPCKPT1\\n"  u64 header_len  header (JSON)  u32 crc32(header)
    then, per block in header order: weights (float32), accumulator (float32)

The header lists every block (name, shape, version, crc32 of its weights and
of its accumulator) plus the optimiser and the dedup window (which blocks
each recent (worker, seq) has updated), so that a restored shard still
applies a retried push at most once.

Writing is atomic: a temporary file in the same directory, fsync, rename over
the final name, fsync of the directory. Reading verifies every crc32 and
raises CheckpointError naming the first block that does not match.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np

from downpour.paramserver.store import Block, OptimizerConfig, ShardStore

MAGIC = b"DPCKPT1\n"


class CheckpointError(Exception):
    pass


def shard_path(directory: str | Path, checkpoint_id: str, shard_index: int) -> Path:
    from downpour.checkpoints import valid_id

    # One safe path component: letters, digits and ._-, no leading dot, no NUL.
    if not valid_id(checkpoint_id):
        raise ValueError(f"invalid checkpoint id {checkpoint_id!r}: letters, digits and ._- only, "
                         "not starting with a dot, at most 128 characters")
    return Path(directory) / checkpoint_id / f"shard-{shard_index}.ckpt"


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(store: ShardStore, path: Path) -> tuple[int, int, int]:
    """Write the store to ``path`` atomically; returns (num_blocks, num_bytes, crc32 of the file).

    Holds the store exclusively while copying the arrays, so the checkpoint
    is a consistent cut between pushes; the disk writes happen after.
    """
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
            {"name": n, "shape": list(s), "version": v, "crc32_w": zlib.crc32(w), "crc32_acc": zlib.crc32(a)}
            for n, s, v, w, a in snap
        ],
    }
    hdr = json.dumps(header, sort_keys=True).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    crc = 0
    size = 0
    try:
        with open(tmp, "wb") as f:
            for part in (MAGIC, struct.pack("<Q", len(hdr)), hdr, struct.pack("<I", zlib.crc32(hdr))):
                f.write(part)
                crc, size = zlib.crc32(part, crc), size + len(part)
            for _, _, _, w, a in snap:
                for arr in (w, a):
                    mv = memoryview(arr).cast("B")
                    f.write(mv)
                    crc, size = zlib.crc32(mv, crc), size + mv.nbytes
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return len(snap), size, crc


def load(path: Path) -> tuple[int, OptimizerConfig, list[Block], dict[str, list[list]]]:
    """Read and verify a checkpoint: (shard_index, optimizer, blocks, dedup)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} not found") from None
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{path}: not a downpour shard checkpoint")
    pos = len(MAGIC)
    if len(data) < pos + 8:
        raise CheckpointError(f"{path}: truncated header")
    (hlen,) = struct.unpack_from("<Q", data, pos)
    pos += 8
    hdr = data[pos:pos + hlen]
    pos += hlen
    if len(hdr) != hlen or len(data) < pos + 4:
        raise CheckpointError(f"{path}: truncated header")
    (hcrc,) = struct.unpack_from("<I", data, pos)
    pos += 4
    if zlib.crc32(hdr) != hcrc:
        raise CheckpointError(f"{path}: header crc32 mismatch")
    header = json.loads(hdr)
    blocks = []
    for b in header["blocks"]:
        n = int(np.prod(b["shape"], dtype=np.int64)) if b["shape"] else 1
        arrays = []
        for key in ("crc32_w", "crc32_acc"):
            raw = data[pos:pos + 4 * n]
            pos += 4 * n
            if len(raw) != 4 * n:
                raise CheckpointError(f"{path}: truncated at block {b['name']!r}")
            if zlib.crc32(raw) != b[key]:
                what = "weights" if key == "crc32_w" else "accumulator"
                raise CheckpointError(f"{path}: block {b['name']!r}: {what} crc32 mismatch (corrupt checkpoint)")
            arrays.append(np.frombuffer(raw, dtype="<f4").copy())
        blocks.append(Block(b["name"], tuple(b["shape"]), arrays[0], arrays[1], int(b["version"])))
    if pos != len(data):
        raise CheckpointError(f"{path}: {len(data) - pos} unexpected trailing bytes")
    return int(header["shard_index"]), OptimizerConfig(**header["optimizer"]), blocks, header["dedup"]
