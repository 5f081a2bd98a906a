"""Everything about checkpoints: the shard file, the manifest commit point, verification,
retention, block layout, and reading (whole, or one block at a time for ``init_from``).

    errors      CheckpointError > CheckpointNotFound, CheckpointInvalid, CheckpointExists
    files       atomic_write, write_new (never over a file), make_dir (durable), fsync_dir, file_crc32
    shardfile   one shard's file: save, load (verified), read_header, shard_path, valid_id
    manifest    MANIFEST.json: list_manifests, verify, newest_valid, commit, retention
    layout      a job's blocks: job_blocks, block_layout
    restore     load_blocks, load_checkpoint, load_params, warm_start
    initfrom    CheckpointReader, check_init_from (a new job's shards read another job's blocks)

The names below are the reading API most callers need:

    from downpour import checkpoint as cks
    m = cks.newest_valid(d)                 # the newest one whose files verify, or None
    cfg, params = cks.load_params(d, m)     # partitioned blocks joined into whole layers

Nothing in this package imports the package itself, so its modules form no cycle.
"""

from downpour.checkpoint.errors import CheckpointError, CheckpointExists, CheckpointInvalid, CheckpointNotFound
from downpour.checkpoint.files import file_crc32
from downpour.checkpoint.layout import block_layout
from downpour.checkpoint.manifest import (
    MANIFEST,
    block_table,
    list_manifests,
    newest_valid,
    shard_file,
    valid_manifests,
    verify,
)
from downpour.checkpoint.restore import load_blocks, load_checkpoint, load_params, warm_start
from downpour.checkpoint.shardfile import read_header, valid_id

__all__ = [
    "MANIFEST",
    "CheckpointError",
    "CheckpointExists",
    "CheckpointInvalid",
    "CheckpointNotFound",
    "block_layout",
    "block_table",
    "file_crc32",
    "list_manifests",
    "load_blocks",
    "load_checkpoint",
    "load_params",
    "newest_valid",
    "read_header",
    "shard_file",
    "valid_id",
    "valid_manifests",
    "verify",
    "warm_start",
]
