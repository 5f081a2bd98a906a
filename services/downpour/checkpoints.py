"""Reading committed checkpoints: one place for the coordinator, the neurons service and tools.

A checkpoint is a folder ``<checkpoint_dir>/<id>/`` with one file per shard
(``shard-<i>.ckpt``, written by the shards, see ``paramserver.checkpoint``)
and ``MANIFEST.json``, written by the coordinator last, atomically: the commit
point. The manifest names each shard's file with its size and crc32, and, per
block, the shard it lives on and the crc32 of its weights and accumulator.

    for m in reversed(list_manifests(d)): ...     # committed, newest last
    m = newest_valid(d)                           # the newest one whose files verify, or None
    blocks = load_checkpoint(d, m)                # {name: weights}, every crc32 checked
    cfg, params = load_params(d, m)               # partitioned blocks joined into whole layers
    params, taken, m = warm_start(d, fresh)       # a new job's start from another job's checkpoint

A manifest whose files are missing, truncated or corrupt is skipped by
``newest_valid`` (and logged), so a restore falls back to the previous
committed checkpoint instead of loading damaged parameters.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np

log = logging.getLogger("downpour.checkpoints")

MANIFEST = "MANIFEST.json"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class CheckpointInvalid(Exception):
    """A committed checkpoint whose files do not match its manifest."""


def valid_id(checkpoint_id: str) -> bool:
    """A checkpoint id that is safe as one path component (letters, digits, ``._-``; no leading dot)."""
    return bool(_ID.match(checkpoint_id or ""))


def list_manifests(checkpoint_dir: str | os.PathLike) -> list[dict]:
    """Committed checkpoints in ``checkpoint_dir`` (a readable manifest), oldest first."""
    found = []
    d = os.fspath(checkpoint_dir)
    if not os.path.isdir(d):
        return found
    for name in sorted(os.listdir(d)):
        try:
            with open(os.path.join(d, name, MANIFEST), encoding="utf-8") as f:
                m = json.load(f)
        except (OSError, ValueError):
            continue  # no manifest or a torn one: not committed
        if isinstance(m, dict) and "checkpoint_id" in m and isinstance(m.get("shards"), list):
            found.append(m)
    found.sort(key=lambda m: (m.get("step", 0), m.get("created", 0)))
    return found


def shard_file(checkpoint_dir: str | os.PathLike, manifest: dict, part: dict) -> Path:
    """Where one shard's file of a manifest is: as recorded, or the conventional name (a moved folder)."""
    path = Path(part.get("path", ""))
    if not path.is_file():
        path = Path(checkpoint_dir) / manifest["checkpoint_id"] / f"shard-{int(part['shard'])}.ckpt"
    return path


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a shard checkpoint file (crc-checked), without reading the arrays."""
    from downpour.paramserver.checkpoint import MAGIC

    with open(path, "rb") as f:
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
    return json.loads(hdr)


def file_crc32(path: str | os.PathLike, bufsize: int = 1 << 20) -> tuple[int, int]:
    """(crc32, size) of a whole file."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                return crc, size
            crc, size = zlib.crc32(b, crc), size + len(b)


def block_table(paths: dict[int, str | os.PathLike]) -> dict[str, dict]:
    """``{block: {shard, crc32_w, crc32_acc, shape, version}}`` from the shards' file headers (for a manifest)."""
    out = {}
    for shard, path in paths.items():
        for b in read_header(path)["blocks"]:
            out[b["name"]] = {"shard": int(shard), "crc32_w": int(b["crc32_w"]), "crc32_acc": int(b["crc32_acc"]),
                              "shape": list(b["shape"]), "version": int(b["version"])}
    return out


def verify(checkpoint_dir: str | os.PathLike, manifest: dict) -> None:
    """Check every shard file of a manifest (size, whole-file crc32, per-block crc32s); raise CheckpointInvalid."""
    ck = manifest.get("checkpoint_id", "?")
    blocks = manifest.get("blocks") or {}
    seen: set[str] = set()
    for part in manifest["shards"]:
        path = shard_file(checkpoint_dir, manifest, part)
        if not path.is_file():
            raise CheckpointInvalid(f"checkpoint {ck}: shard {part.get('shard')}'s file {path} is missing")
        crc, size = file_crc32(path)
        if "num_bytes" in part and size != int(part["num_bytes"]):
            raise CheckpointInvalid(f"checkpoint {ck}: {path} has {size} bytes, the manifest says {part['num_bytes']}")
        if "crc32" in part and crc != int(part["crc32"]):
            raise CheckpointInvalid(f"checkpoint {ck}: {path}: crc32 {crc:#010x}, the manifest says "
                                    f"{int(part['crc32']):#010x} (corrupt)")
        for b in read_header(path)["blocks"]:
            seen.add(b["name"])
            want = blocks.get(b["name"])
            if want is not None and (want["crc32_w"] != b["crc32_w"] or want["crc32_acc"] != b["crc32_acc"]
                                     or int(want["shard"]) != int(part["shard"])):
                raise CheckpointInvalid(f"checkpoint {ck}: block {b['name']!r} does not match the manifest")
    missing = set(blocks) - seen
    if missing:
        raise CheckpointInvalid(f"checkpoint {ck}: blocks missing from the shard files: {sorted(missing)[:5]}")


def valid_manifests(checkpoint_dir: str | os.PathLike) -> list[dict]:
    """Committed checkpoints whose files verify, oldest first (the others are logged and skipped)."""
    good = []
    for m in list_manifests(checkpoint_dir):
        try:
            verify(checkpoint_dir, m)
        except (CheckpointInvalid, OSError, KeyError, ValueError) as e:
            log.warning("skipping checkpoint %s: %s", m.get("checkpoint_id"), e)
            continue
        good.append(m)
    return good


def newest_valid(checkpoint_dir: str | os.PathLike, exclude: tuple[str, ...] = ()) -> dict | None:
    """The newest committed checkpoint whose files verify (falling back past corrupt ones), or None."""
    for m in reversed(list_manifests(checkpoint_dir)):
        if m.get("checkpoint_id") in exclude:
            continue
        try:
            verify(checkpoint_dir, m)
            return m
        except (CheckpointInvalid, OSError, KeyError, ValueError) as e:
            log.warning("checkpoint %s is not usable, falling back to an older one: %s", m.get("checkpoint_id"), e)
    return None


def load_blocks(checkpoint_dir: str | os.PathLike, manifest: dict) -> dict[str, np.ndarray]:
    """Every block's weights of one committed checkpoint, verified (raises CheckpointInvalid)."""
    from downpour.paramserver import checkpoint as ckpt

    table = manifest.get("blocks") or {}
    out: dict[str, np.ndarray] = {}
    for part in manifest["shards"]:
        path = shard_file(checkpoint_dir, manifest, part)
        try:
            _, _, blocks, _ = ckpt.load(path)
        except ckpt.CheckpointError as e:
            raise CheckpointInvalid(str(e)) from None
        for b in blocks:
            want = table.get(b.name)
            if want is not None and want["crc32_w"] != zlib.crc32(b.w):
                raise CheckpointInvalid(f"{path}: block {b.name!r} does not match the manifest")
            out[b.name] = b.w.reshape(b.shape)
    missing = set(table) - set(out)
    if missing:
        raise CheckpointInvalid(f"checkpoint {manifest.get('checkpoint_id')}: blocks missing: {sorted(missing)[:5]}")
    return out


def load_checkpoint(checkpoint_dir: str | os.PathLike, manifest: dict):
    """(job config, {name: weights}) of one committed checkpoint, verified."""
    from downpour import config as jobconfig

    return jobconfig.from_yaml(manifest["config"]), load_blocks(checkpoint_dir, manifest)


def block_layout(cfg):
    """(block name -> size, blocks -> full parameters) of a job: with a partition grid, every
    partition owns its own block of each layer (``stage1.W1[p=3]``), joined back here."""
    from downpour.nn import Network

    spec = cfg.network_spec()
    rows, cols = cfg.grid()
    if rows * cols == 1:
        return Network(spec).block_sizes(), dict
    from downpour.partition import block_shapes, join_params, plan

    pl = plan(spec, rows, cols)
    sizes = {k: int(np.prod(v)) for k, v in block_shapes(pl).items()}
    return sizes, lambda blocks: join_params(pl, blocks)


def load_params(checkpoint_dir: str | os.PathLike, manifest: dict):
    """(job config, the network's parameters) of one committed checkpoint, verified; the blocks of
    a model-parallel job (``stage1.W1[p=3]``) joined back into whole layers."""
    cfg, blocks = load_checkpoint(checkpoint_dir, manifest)
    _, join = block_layout(cfg)
    return cfg, join(blocks)


def warm_start(checkpoint_dir: str | os.PathLike, fresh: dict) -> tuple[dict, list[str], dict]:
    """A new job's starting parameters: ``fresh`` (its own seeded initial values) with every block
    of the newest valid checkpoint in ``checkpoint_dir`` that the new model has under the same
    name put in its place (e.g. the stages of an unsupervised job under a new supervised head).

    Returns (parameters, the names taken, the manifest). Raises ValueError, naming the problem,
    when there is no valid checkpoint, when a shared name has another shape (another model), or
    when no block is shared at all: a job must never silently start from scratch instead.
    """
    d = os.fspath(checkpoint_dir)
    m = newest_valid(d)
    if m is None:
        raise ValueError(f"init_from={d}: no committed checkpoint whose files verify there")
    try:
        _, old = load_params(d, m)
    except CheckpointInvalid as e:
        raise ValueError(f"init_from={d}: {e}") from None
    out, taken = dict(fresh), []
    for name, w in old.items():
        if name not in fresh:
            continue
        if tuple(np.shape(fresh[name])) != tuple(w.shape):
            raise ValueError(f"init_from={d}: block {name!r} has shape {tuple(w.shape)} in checkpoint "
                             f"{m['checkpoint_id']} but {tuple(np.shape(fresh[name]))} in this model")
        out[name] = np.asarray(w, dtype=np.float32)
        taken.append(name)
    if not taken:
        raise ValueError(f"init_from={d}: checkpoint {m['checkpoint_id']} shares no block with this model "
                         f"(it has {', '.join(sorted(old)[:4])}{', ...' if len(old) > 4 else ''})")
    return out, sorted(taken), m
