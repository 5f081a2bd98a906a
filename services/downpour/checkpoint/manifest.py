"""The commit point: ``<checkpoint_dir>/<id>/MANIFEST.json``, listing, verification and retention.

A checkpoint is a folder ``<checkpoint_dir>/<id>/`` with one file per shard
(``shard-<i>.ckpt``, see ``shardfile``) and ``MANIFEST.json``, written last,
atomically, by the coordinator. The manifest names each shard's file with its
size and crc32 and, per block, the shard it lives on and the crc32 of its
weights and accumulator. A folder without a manifest was never committed.

A manifest whose files are missing, truncated or corrupt is skipped by
``newest_valid`` (and logged), so a restore falls back to the previous
committed checkpoint instead of loading damaged parameters.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from downpour.checkpoint.errors import CheckpointInvalid
from downpour.checkpoint.files import atomic_write, file_crc32, make_dir
from downpour.checkpoint.shardfile import read_header, valid_id

log = logging.getLogger("downpour.checkpoints")

MANIFEST = "MANIFEST.json"


def list_manifests(checkpoint_dir: str | os.PathLike) -> list[dict]:
    """Committed checkpoints in ``checkpoint_dir`` (a readable manifest), oldest first."""
    found: list[dict] = []
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


def conventional_file(checkpoint_dir: str | os.PathLike, checkpoint_id: str, shard: int) -> Path:
    """Where shard ``shard`` writes its part of a checkpoint under ``checkpoint_dir``."""
    return Path(checkpoint_dir) / checkpoint_id / f"shard-{int(shard)}.ckpt"


def shard_file(checkpoint_dir: str | os.PathLike, manifest: dict, part: dict) -> Path:
    """Where one shard's file of a manifest is: as recorded, or the conventional name (a moved folder)."""
    path = Path(part.get("path", ""))
    if not path.is_file():
        path = conventional_file(checkpoint_dir, manifest["checkpoint_id"], part["shard"])
    return path


def block_table(paths: dict[int, str | os.PathLike]) -> dict[str, dict]:
    """``{block: {shard, crc32_w, crc32_acc, shape, version}}`` from the shards' file headers (for a manifest)."""
    out = {}
    for shard, path in paths.items():
        for b in read_header(path)["blocks"]:
            out[b["name"]] = {
                "shard": int(shard),
                "crc32_w": int(b["crc32_w"]),
                "crc32_acc": int(b["crc32_acc"]),
                "shape": list(b["shape"]),
                "version": int(b["version"]),
            }
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
            raise CheckpointInvalid(
                f"checkpoint {ck}: {path}: crc32 {crc:#010x}, the manifest says {int(part['crc32']):#010x} (corrupt)"
            )
        for b in read_header(path)["blocks"]:
            seen.add(b["name"])
            want = blocks.get(b["name"])
            if want is not None and (
                want["crc32_w"] != b["crc32_w"]
                or want["crc32_acc"] != b["crc32_acc"]
                or int(want["shard"]) != int(part["shard"])
            ):
                raise CheckpointInvalid(f"checkpoint {ck}: block {b['name']!r} does not match the manifest")
    missing = set(blocks) - seen
    if missing:
        raise CheckpointInvalid(f"checkpoint {ck}: blocks missing from the shard files: {sorted(missing)[:5]}")


# What a manifest that cannot be used raises: its own checks, an unreadable file, a field missing or malformed.
_UNUSABLE = (CheckpointInvalid, OSError, KeyError, ValueError)


def valid_manifests(checkpoint_dir: str | os.PathLike) -> list[dict]:
    """Committed checkpoints whose files verify, oldest first (the others are logged and skipped)."""
    good = []
    for m in list_manifests(checkpoint_dir):
        try:
            verify(checkpoint_dir, m)
        except _UNUSABLE as e:
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
        except _UNUSABLE as e:
            log.warning("checkpoint %s is not usable, falling back to an older one: %s", m.get("checkpoint_id"), e)
    return None


def commit(checkpoint_dir: str | os.PathLike, checkpoint_id: str, body: dict[str, Any]) -> str:
    """Write a checkpoint's manifest (atomically, the commit point); returns its path."""
    folder = os.path.join(os.fspath(checkpoint_dir), checkpoint_id)
    make_dir(folder)
    path = os.path.join(folder, MANIFEST)
    atomic_write(path, json.dumps(body, indent=1).encode())
    return path


# The only names this project writes inside a checkpoint folder: the shards' files and their temp
# files (``files.write_new``), the manifest and its temp file (``files.atomic_write``). Cleanup
# deletes these and nothing else, so a folder that holds anything more is left where it is.
_OURS = re.compile(r"^(shard-\d+\.ckpt|\.shard-\d+\.ckpt\.tmp-\d+|MANIFEST\.json|MANIFEST\.json\.tmp\.\d+)$")


def _remove_ours(folder: str) -> bool:
    """Delete this project's files in ``folder``, then the folder if that emptied it; True if it is gone.
    A folder that holds anything else keeps it (and is logged): cleanup never deletes what it did not write."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return True
    except OSError as e:
        log.warning("not cleaning %s: %s", folder, e)
        return False
    for name in names:
        if _OURS.match(name):
            try:
                os.unlink(os.path.join(folder, name))
            except FileNotFoundError:
                pass
            except OSError as e:  # a folder of that name, or no permission: leave it
                log.warning("not removing %s: %s", os.path.join(folder, name), e)
    try:
        os.rmdir(folder)
    except FileNotFoundError:
        return True
    except OSError:
        log.warning(
            "left %s in place: it holds files this project did not write (%s)",
            folder,
            ", ".join(sorted(n for n in os.listdir(folder))[:5]),
        )
        return False
    return True


def _ours(checkpoint_dir: str, name: str) -> str | None:
    """The folder of checkpoint ``name`` in ``checkpoint_dir`` if it can be one of ours: a valid id, a
    real folder (not a link to one elsewhere)."""
    folder = os.path.join(checkpoint_dir, name)
    if not valid_id(name) or os.path.islink(folder) or not os.path.isdir(folder):
        return None
    return folder


def discard_uncommitted(checkpoint_dir: str | os.PathLike, checkpoint_id: str) -> None:
    """Remove what the shards wrote for a checkpoint whose manifest was never written."""
    folder = _ours(os.fspath(checkpoint_dir), checkpoint_id)
    if folder is not None and not os.path.exists(os.path.join(folder, MANIFEST)):
        _remove_ours(folder)


def remove(manifest_path: str) -> None:
    """Remove a committed checkpoint that fell out of retention: its files, then its folder.

    The manifest goes first: a removal cut short (the coordinator killed) leaves an uncommitted
    folder, removed by a later ``remove_uncommitted``, never a manifest naming files that are gone.
    """
    try:
        os.remove(manifest_path)
    except FileNotFoundError:
        pass
    _remove_ours(os.path.dirname(manifest_path))


def remove_uncommitted(checkpoint_dir: str | os.PathLike, keep: set[str]) -> None:
    """Folders the shards wrote for a checkpoint that was never committed (a coordinator died mid-way),
    except those named in ``keep``. Only names a checkpoint can have, and only the files this project
    writes: anything else under ``checkpoint_dir`` stays."""
    d = os.fspath(checkpoint_dir)
    try:
        names = os.listdir(d)
    except OSError:
        return
    for name in names:
        folder = _ours(d, name)
        if name in keep or folder is None:
            continue
        if not os.path.exists(os.path.join(folder, MANIFEST)):
            _remove_ours(folder)
