"""The coordinator's records: a slot, a replica's progress, a committed checkpoint, a member, and
the errors of membership (``state.JobState`` keeps them and saves them as they are)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Slot:
    replica: int
    partition: int
    member_id: str = ""
    address: str = ""
    lease_until: float = 0.0
    last_heartbeat: float = 0.0


@dataclass
class ReplicaProgress:
    step: int = 0
    loss: float = float("nan")
    examples: int = 0


@dataclass
class Checkpoint:
    checkpoint_id: str
    step: int
    manifest_path: str
    replica_steps: list[int]
    shards: list[dict]
    created: float


@dataclass
class Member:
    member_id: str
    address: str
    replica: int = -1  # -1: a spare waiting for a slot
    partition: int = -1
    lease_until: float = 0.0
    generation: int = 0
    key: str = ""  # the member's secret (an adopted state of an older coordinator may have none)


class MemberKeyError(Exception):
    """A call for a member without that member's key."""


class TooManyMembers(Exception):
    """A new member beyond the job's slots plus MAX_SPARES live spares."""
