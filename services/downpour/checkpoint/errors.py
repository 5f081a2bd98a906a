"""What can go wrong with a checkpoint, as types: callers choose by class, never by wording.

    CheckpointError            any checkpoint that cannot be used
    ├── CheckpointNotFound     the file is not there
    ├── CheckpointInvalid      it is there but does not verify: not a checkpoint, truncated,
    │                          a crc32 that does not match, blocks missing from its manifest
    └── CheckpointExists       a new checkpoint named like one that is already there (ids are
                               write-once: ALREADY_EXISTS)

A shard maps ``CheckpointNotFound`` to NOT_FOUND and the rest to DATA_LOSS; the coordinator
maps them back when it asks a shard to restore.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """A checkpoint that cannot be used."""


class CheckpointNotFound(CheckpointError):
    """The checkpoint (or one of its files) does not exist."""


class CheckpointInvalid(CheckpointError):
    """A checkpoint whose files are damaged or do not match its manifest."""


class CheckpointExists(CheckpointError):
    """A checkpoint id that is already taken: checkpoints are never overwritten."""
