"""Weights in a standard format: ``downpour export`` and the reader ``downpour.load`` uses.

    downpour export --checkpoint runs/a/checkpoints --format safetensors --out a.safetensors
    downpour export --checkpoint runs/a --format npz --out a.npz

Every parameter block of the newest valid checkpoint (or of ``--checkpoint-id``)
is written under its own name (``stage1.W1``, ..., ``head.b``) in the shape the
network uses it (``Network.param_shapes``; a model-parallel job's per-partition
blocks are joined into whole layers first), float32, with metadata that makes
the file self-describing:

* ``downpour.network_spec``: the network (JSON, ``downpour.nn.spec.to_dict``),
* ``downpour.job_config``: the job's config (YAML, as in ``job.yaml``),
* ``downpour.checkpoint_id``, ``downpour.step``, ``downpour.normalize`` and
  ``downpour.format_version``.

safetensors keeps the metadata in its header (``safe_open(...).metadata()``);
an .npz keeps it as one JSON string array, ``__metadata__``, so that NumPy
alone reads it without pickle (``np.load(f)["__metadata__"].item()``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, safe_open, save_file

from downpour import checkpoint as checkpoints
from downpour import config as jobconfig
from downpour.nn import Network
from downpour.nn.spec import from_dict, to_dict

FORMATS = ("safetensors", "npz")
FORMAT_VERSION = "1"
NPZ_METADATA = "__metadata__"
PREFIX = "downpour."


def checkpoint_dir_of(path: Path) -> tuple[Path, str]:
    """(checkpoint directory, one checkpoint id or "") for a run folder, a checkpoint directory or one checkpoint."""
    if (path / checkpoints.MANIFEST).is_file():
        return path.parent, path.name
    if (path / "checkpoints").is_dir() and (path / "job.yaml").is_file():
        return path / "checkpoints", ""
    return path, ""


def checkpoint_params(path: str | os.PathLike, checkpoint_id: str = ""):
    """(job config, manifest, {name: float32 array in its network shape}) of a run folder or checkpoint directory."""
    ckdir, one = checkpoint_dir_of(Path(path).expanduser())
    checkpoint_id = checkpoint_id or one
    if checkpoint_id:
        m = next((m for m in checkpoints.list_manifests(ckdir) if m["checkpoint_id"] == checkpoint_id), None)
        if m is None:
            raise ValueError(f"no committed checkpoint {checkpoint_id!r} in {ckdir}")
        checkpoints.verify(ckdir, m)
    else:
        m = checkpoints.newest_valid(ckdir)
        if m is None:
            raise ValueError(
                f"{path}: no committed checkpoint whose files verify (expected a run folder or "
                f"a checkpoint directory with <id>/MANIFEST.json)"
            )
    try:
        cfg, params = checkpoints.load_params(ckdir, m)
    except checkpoints.CheckpointInvalid as e:
        raise ValueError(str(e)) from None
    shapes = Network(cfg.network_spec()).param_shapes()
    return cfg, m, {k: np.ascontiguousarray(np.asarray(params[k], np.float32).reshape(shapes[k])) for k in shapes}


def metadata(cfg, manifest: dict) -> dict[str, str]:
    return {
        PREFIX + "format_version": FORMAT_VERSION,
        PREFIX + "network_spec": json.dumps(to_dict(cfg.network_spec()), sort_keys=True),
        PREFIX + "job_config": cfg.to_yaml(),
        PREFIX + "checkpoint_id": str(manifest.get("checkpoint_id", "")),
        PREFIX + "step": str(int(manifest.get("step", 0))),
        PREFIX + "normalize": cfg.normalize,
    }


def export(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike, checkpoint_id: str = "") -> dict:
    """Write one checkpoint's parameters to ``out`` as ``fmt``; returns what was written."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    cfg, m, params = checkpoint_params(checkpoint, checkpoint_id)
    meta = metadata(cfg, m)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if fmt == "safetensors":
        save_file(params, str(tmp), metadata=meta)
    else:
        with open(tmp, "wb") as f:
            # Any: NumPy's stub would otherwise match a name in ``params`` against ``allow_pickle``
            arrays: dict[str, Any] = {**params, NPZ_METADATA: np.array(json.dumps(meta))}
            np.savez(f, **arrays)
    os.replace(tmp, out)  # a reader never sees half a file
    return {
        "path": str(out),
        "format": fmt,
        "checkpoint_id": m["checkpoint_id"],
        "step": int(m["step"]),
        "blocks": len(params),
        "parameters": int(sum(v.size for v in params.values())),
        "bytes": out.stat().st_size,
    }


def _meta_to_fields(meta: dict[str, str], path: Path):
    if PREFIX + "network_spec" not in meta:
        raise ValueError(f"{path}: no {PREFIX}network_spec in its metadata; not written by downpour export")
    spec = from_dict(json.loads(meta[PREFIX + "network_spec"]))
    cfg = jobconfig.from_yaml(meta[PREFIX + "job_config"]) if meta.get(PREFIX + "job_config") else None
    fields = {
        "checkpoint_id": meta.get(PREFIX + "checkpoint_id", ""),
        "step": int(meta.get(PREFIX + "step", 0) or 0),
        "normalize": meta.get(PREFIX + "normalize") or (cfg.normalize if cfg else "standardize"),
        "data": cfg.data if cfg else "default",
        "config": cfg,
    }
    return spec, fields


def read(path: str | os.PathLike):
    """(network spec, {name: flat float32 block}, metadata fields) of a file ``export`` wrote."""
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):  # a zip: .npz
        with np.load(p, allow_pickle=False) as z:
            if NPZ_METADATA not in z.files:
                raise ValueError(f"{p}: an .npz without {NPZ_METADATA}; not written by downpour export")
            meta = json.loads(z[NPZ_METADATA].item())
            arrays = {k: z[k] for k in z.files if k != NPZ_METADATA}
    else:
        try:
            with safe_open(str(p), framework="np") as f:
                meta = dict(f.metadata() or {})
            arrays = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{p}: neither an .npz nor a safetensors file ({e})") from None
    spec, fields = _meta_to_fields(meta, p)
    sizes = Network(spec).block_sizes()
    missing = sorted(set(sizes) - set(arrays))
    if missing:
        raise ValueError(f"{p}: blocks missing for its network: {missing[:5]}")
    params = {}
    for k, n in sizes.items():
        a = np.asarray(arrays[k], np.float32).reshape(-1)
        if a.size != n:
            raise ValueError(f"{p}: block {k!r} has {a.size} values; the network needs {n}")
        params[k] = a
    return spec, params, fields


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    e = subparsers.add_parser("export", help="write a checkpoint's weights as safetensors or npz (self-describing)")
    e.add_argument("--checkpoint", required=True, metavar="DIR", help="a run folder or a checkpoint directory")
    e.add_argument("--checkpoint-id", default="", help="a committed checkpoint (default: the newest valid one)")
    e.add_argument("--format", choices=FORMATS, default="safetensors")
    e.add_argument("--out", required=True, metavar="FILE")
    e.add_argument("--json", action="store_true", help="print what was written as JSON")
    e.set_defaults(func=_cmd_export)
    return e


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        r = export(args.checkpoint, args.format, args.out, args.checkpoint_id)
    except (OSError, ValueError) as e:
        print(f"downpour export: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(r))
    else:
        print(
            f"{r['path']}: {r['blocks']} blocks, {r['parameters']} parameters of checkpoint {r['checkpoint_id']} "
            f"(step {r['step']}), {r['format']}, {r['bytes']} bytes"
        )
    return 0
