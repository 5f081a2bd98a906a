"""Reading a committed checkpoint's values whole: for tools, the neurons service and ``warm_start``.

    blocks = load_blocks(d, m)                    # {name: weights}, every crc32 checked
    cfg, blocks = load_checkpoint(d, m)           # with the job config it was written under
    cfg, params = load_params(d, m)               # partitioned blocks joined into whole layers
    params, taken, m = warm_start(d, fresh)       # a new job's start from another job's checkpoint

(The shards themselves restore their own file with ``shardfile.load``; a new
job's shards read ``init_from`` one block at a time with ``initfrom``.)
"""

from __future__ import annotations

import os
import zlib

import numpy as np

from downpour import config as jobconfig
from downpour.checkpoint import shardfile
from downpour.checkpoint.errors import CheckpointError, CheckpointInvalid
from downpour.checkpoint.layout import block_layout
from downpour.checkpoint.manifest import newest_valid, shard_file


def load_blocks(checkpoint_dir: str | os.PathLike, manifest: dict) -> dict[str, np.ndarray]:
    """Every block's weights of one committed checkpoint, verified (raises CheckpointInvalid)."""
    table = manifest.get("blocks") or {}
    out: dict[str, np.ndarray] = {}
    for part in manifest["shards"]:
        path = shard_file(checkpoint_dir, manifest, part)
        try:
            _, _, blocks, _ = shardfile.load(path)
        except CheckpointError as e:  # a missing file too: the manifest says it is there
            raise CheckpointInvalid(str(e)) from None
        for b in blocks:
            want = table.get(b.name)
            if want is not None and want["crc32_w"] != zlib.crc32(b.w.data):
                raise CheckpointInvalid(f"{path}: block {b.name!r} does not match the manifest")
            out[b.name] = b.w.reshape(b.shape)
    missing = set(table) - set(out)
    if missing:
        raise CheckpointInvalid(f"checkpoint {manifest.get('checkpoint_id')}: blocks missing: {sorted(missing)[:5]}")
    return out


def load_checkpoint(checkpoint_dir: str | os.PathLike, manifest: dict) -> tuple[jobconfig.JobConfig, dict]:
    """(job config, {name: weights}) of one committed checkpoint, verified."""
    return jobconfig.from_yaml(manifest["config"]), load_blocks(checkpoint_dir, manifest)


def load_params(checkpoint_dir: str | os.PathLike, manifest: dict) -> tuple[jobconfig.JobConfig, dict]:
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
            raise ValueError(
                f"init_from={d}: block {name!r} has shape {tuple(w.shape)} in checkpoint "
                f"{m['checkpoint_id']} but {tuple(np.shape(fresh[name]))} in this model"
            )
        out[name] = np.asarray(w, dtype=np.float32)
        taken.append(name)
    if not taken:
        raise ValueError(
            f"init_from={d}: checkpoint {m['checkpoint_id']} shares no block with this model "
            f"(it has {', '.join(sorted(old)[:4])}{', ...' if len(old) > 4 else ''})"
        )
    return out, sorted(taken), m
