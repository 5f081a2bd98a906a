"""The coordinator's job state, free of any transport so it can be tested alone.

Slots are (replica, partition) pairs. A worker that registers takes a free
slot (never held, or whose holder's lease ran out) and the step its replica
had reached; a worker that finds none waits as a spare and takes the next slot
that frees up. Replica 0 may train alone for ``warm_start`` steps before the
other replicas' slots open (Dean et al.'s warm start).

The state is saved to ``state.json`` in the state directory (write to a
temporary file, fsync, rename) whenever membership, progress or checkpoints
change, so that a restarted coordinator re-adopts the running cluster: the
workers' next heartbeats find their slots where they left them.

Member ids are public (JobStatus lists them), so each member also gets a
secret key when it first registers; every later call for that member_id must
carry it (``authorize``): nobody else can report for, renew, deregister or
take over another member. The keys are saved with the state, so the members
of a re-adopted cluster keep theirs.

The job is ``done`` when every replica has reached ``steps`` or when its
wall-clock budget ``max_seconds`` (counted from the first reported step) has
run out, whichever comes first (``ending``); the end is latched and saved. On a
time-budget end the replicas stop wherever they are: ``settled`` says when
every slot's holder has made its last report (or a lease has passed), so that
the final checkpoint records the steps the shards really hold.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import threading
import time
import uuid
from dataclasses import asdict

from downpour import metrics, scalars
from downpour.checkpoint.files import atomic_write
from downpour.config import JobConfig, from_yaml
from downpour.coordinator.ending import TIME_BUDGET, Ending
from downpour.coordinator.records import Checkpoint, Member, MemberKeyError, ReplicaProgress, Slot, TooManyMembers

log = logging.getLogger("downpour.coordinator")


# Members beyond the job's slots (spares, and members whose lease ran out): every Register with a
# new id adds one, so they are bounded; those whose lease ran out go first.
MAX_SPARES = 1024


class JobState:
    def __init__(self, cfg: JobConfig, state_dir: str | None = None, clock=time.monotonic, wall=time.time):
        self.cfg = cfg
        self.clock = clock  # leases and waits: monotonic
        self.wall = wall  # the training clock (``ending``): wall time, which means the same after a restart
        self.state_dir = state_dir
        self.lock = threading.RLock()
        rows, cols = cfg.grid()
        self.partitions = rows * cols
        self.job_id = uuid.uuid4().hex[:12]
        self.generation = 1
        # Bumped whenever any slot of a replica changes hands: its partitions
        # then restart their step together with the new peer set.
        self.replica_generation = [1] * cfg.replicas
        self.replica_start = [0] * cfg.replicas  # the step every partition restarts at in this generation
        self.slot_loss: dict[tuple[int, int], float] = {}
        # Each slot's latest named scalars (``downpour.scalars``: validated, bounded); not persisted.
        self.slot_scalars: dict[tuple[int, int], dict[str, float]] = {}
        self.stages = len(cfg.network_spec().stages)  # keys of other stages are ignored
        self.slots = {(r, p): Slot(r, p) for r in range(cfg.replicas) for p in range(self.partitions)}
        self.progress = [ReplicaProgress() for _ in range(cfg.replicas)]
        self.members: dict[str, Member] = {}
        self.checkpoints: list[Checkpoint] = []
        self.started = time.time()
        self.initialized = False  # parameters created or restored on the shards
        self.stopped = False
        self.ending = Ending()  # the training clock and, once ended, why and at which step
        self._end_clock = 0.0  # self.clock() when the end was seen (here: a restart starts it again)
        self._last_reports: set[tuple[int, int]] = set()  # slots whose holder has reported since the end
        self._examples_window: list[tuple[float, int]] = []

    # ------------------------------------------------------------- membership
    def _slot_free(self, slot: Slot, now: float) -> bool:
        return not slot.member_id or slot.lease_until < now

    def open_replicas(self) -> range:
        # Warm start: only replica 0 trains until it has taken warm_start steps (or all its
        # steps, in a job shorter than the warm start: the others must not wait forever).
        if self.cfg.warm_start and self.progress[0].step < min(self.cfg.warm_start, self.cfg.steps):
            return range(1)
        return range(self.cfg.replicas)

    def authorize(self, member_id: str, key: str) -> Member | None:
        """The member ``member_id`` if ``key`` is its key; None for an unknown member.

        Raises MemberKeyError for a known member and any other key."""
        with self.lock:
            m = self.members.get(member_id)
            if m is not None and m.key and not hmac.compare_digest(m.key.encode(), key.encode()):
                raise MemberKeyError(
                    f"member {member_id!r}: wrong or missing member_key (only the worker that registered "
                    "it may speak for it)"
                )
            return m

    def register(self, address: str, member_id: str = "", key: str = "") -> Member:
        """Register (or re-register) a member; re-registering a known member needs its key (MemberKeyError)."""
        with self.lock:
            now = self.clock()
            self.authorize(member_id, key)
            mid = member_id if member_id in self.members else (member_id or uuid.uuid4().hex[:12])
            if mid not in self.members:
                self._make_room(now)
            m = self.members.get(mid) or Member(mid, address, key=secrets.token_hex(16))
            if not m.key:
                m.key = secrets.token_hex(16)
            m.address = address
            m.lease_until = now + self.cfg.lease_seconds
            self.members[mid] = m
            if m.replica < 0 or self.slots[(m.replica, m.partition)].member_id != mid:
                m.replica = m.partition = -1
                self._place(m, now)
            self._save()
            return m

    def _make_room(self, now: float) -> None:
        """Room for one more member: forget those whose lease ran out, or refuse (TooManyMembers)."""
        cap = len(self.slots) + MAX_SPARES
        if len(self.members) < cap:
            return
        for mid in [mid for mid, m in self.members.items() if m.lease_until < now]:
            del self.members[mid]  # its slot, if it had one, is free already; its heartbeat finds it unknown
        if len(self.members) >= cap:
            raise TooManyMembers(
                f"the job already has {len(self.members)} live members ({len(self.slots)} slots and "
                f"{MAX_SPARES} spares at most)"
            )

    def _place(self, m: Member, now: float) -> bool:
        if self.done:
            return False
        for r in self.open_replicas():
            for p in range(self.partitions):
                slot = self.slots[(r, p)]
                if self._slot_free(slot, now):
                    if slot.member_id and slot.member_id != m.member_id:
                        # The old holder's lease ran out: whoever it was, it is out now.
                        old = self.members.get(slot.member_id)
                        if old is not None:
                            old.replica = old.partition = -1
                    self.generation += 1
                    self.replica_generation[r] = self.generation
                    self.replica_start[r] = self.progress[r].step
                    slot.member_id, slot.address = m.member_id, m.address
                    slot.lease_until, slot.last_heartbeat = m.lease_until, now
                    m.replica, m.partition, m.generation = r, p, self.generation
                    return True
        return False

    def heartbeat(self, member_id: str, step: int | None = None) -> tuple[str, Member | None]:
        """Renew a lease. Returns (action, member): continue, reassign (new slot), wait, stop or unknown."""
        with self.lock:
            now = self.clock()
            m = self.members.get(member_id)
            if m is None:
                return "unknown", None
            if self.done or self.stopped:
                return "stop", m
            m.lease_until = now + self.cfg.lease_seconds
            if m.replica >= 0:
                slot = self.slots[(m.replica, m.partition)]
                if slot.member_id == member_id:
                    slot.lease_until, slot.last_heartbeat = m.lease_until, now
                    return "continue", m
                m.replica = m.partition = -1  # lost the slot while silent
            if self._place(m, now):
                self._save()
                return "reassign", m
            return "wait", m

    def deregister(self, member_id: str) -> None:
        with self.lock:
            m = self.members.pop(member_id, None)
            if m is not None and m.replica >= 0:
                slot = self.slots[(m.replica, m.partition)]
                if slot.member_id == member_id:
                    slot.member_id, slot.address, slot.lease_until = "", "", 0.0
            self._save()

    def peers(self, replica: int) -> list[tuple[int, str]]:
        with self.lock:
            return [
                (p, self.slots[(replica, p)].address)
                for p in range(self.partitions)
                if self.slots[(replica, p)].member_id
            ]

    # --------------------------------------------------------------- progress
    def report(
        self, member_id: str, step: int, loss: float, examples: int, named: dict[str, float] | None = None
    ) -> bool:
        """Record a replica's progress (and the slot's named scalars, when the report has any: keys
        outside ``scalars.KEY``, non-finite values and keys past ``scalars.MAX_KEYS`` are ignored);
        False tells the worker to stop."""
        with self.lock:
            m = self.members.get(member_id)
            if m is None or m.replica < 0:
                return not self.done
            pr = self.progress[m.replica]
            # Partitions report their shares of the loss; partition 0 speaks for the step.
            self.slot_loss[(m.replica, m.partition)] = loss
            if named:
                self.slot_scalars[(m.replica, m.partition)] = scalars.clean(named, self.stages)
            if m.partition == 0:
                if step > pr.step:
                    pr.examples += examples
                    self._examples_window.append((time.time(), examples))
                    if self.ending.start(self.wall()):  # the budget counts from the first step reported
                        self._save()
                pr.step = max(pr.step, step)
                pr.loss = sum(self.slot_loss.get((m.replica, p), 0.0) for p in range(self.partitions))
            if self.done:
                # the answer stops the worker: what it reported is all it pushed (it flushes first)
                self._last_reports.add((m.replica, m.partition))
                return False
            return True

    def replica_scalars(self, replica: int) -> dict[str, float]:
        """One replica's latest scalars, its partitions' combined (``scalars.combine``)."""
        with self.lock:
            return scalars.combine(self.slot_scalars.get((replica, p), {}) for p in range(self.partitions))

    @property
    def step(self) -> int:
        """The job's step: that of its slowest replica."""
        return min(p.step for p in self.progress)

    @property
    def done(self) -> bool:
        """Whether the job's training has ended (``ending``): latched, and saved when it ends."""
        with self.lock:
            if self.ending.check(self.step, self.cfg.steps, self.cfg.max_seconds, self.wall()):
                self._end_clock = self.clock()
                log.info(
                    "training ended (%s) at step %d after %.1f s",
                    self.ending.reason,
                    self.ending.step,
                    self.ending.seconds(self.wall()),
                )
                self._save()
            return bool(self.ending.reason)

    def settled(self) -> bool:
        """Whether the final checkpoint may be taken: the job is done and nothing is still stepping.

        Replicas that reached ``steps`` stopped by themselves. After a time-budget end every slot's
        holder is told to stop in the answer to its next report (or heartbeat: then it makes one
        last report), so this waits until each has made that report, its lease has run out or one
        lease has passed since the end: the checkpoint then records every replica's reached step."""
        with self.lock:
            if not self.done:
                return False
            if self.ending.reason != TIME_BUDGET:
                return True
            now = self.clock()
            if now - self._end_clock >= self.cfg.lease_seconds:
                return True
            return all(
                not s.member_id or s.lease_until < now or key in self._last_reports for key, s in self.slots.items()
            )

    def training_seconds(self) -> float:
        """Seconds of training so far (or until the end): from the first reported step."""
        with self.lock:
            return self.ending.seconds(self.wall())

    def examples_per_second(self, window: float = 10.0) -> float:
        with self.lock:
            now = time.time()
            self._examples_window = [(t, n) for t, n in self._examples_window if now - t <= window]
            if not self._examples_window:
                return 0.0
            span = max(now - self._examples_window[0][0], 1e-3)
            return sum(n for _, n in self._examples_window) / span

    # ------------------------------------------------------------ checkpoints
    def add_checkpoint(self, ck: Checkpoint) -> list[Checkpoint]:
        """Record a committed checkpoint; returns those that fall out of retention."""
        with self.lock:
            # one entry per id: an id recorded twice would be deleted as "old" while it is the newest
            self.checkpoints = [c for c in self.checkpoints if c.checkpoint_id != ck.checkpoint_id]
            self.checkpoints.append(ck)
            dropped = self.checkpoints[: -self.cfg.keep_checkpoints]
            self.checkpoints = self.checkpoints[-self.cfg.keep_checkpoints :]
            self._save()
            return dropped

    def adopt_checkpoint(self, ck: Checkpoint) -> None:
        """Continue from a checkpoint: every replica resumes at its recorded step."""
        with self.lock:
            for r, s in enumerate(ck.replica_steps[: self.cfg.replicas]):
                self.progress[r].step = self.replica_start[r] = s
            if len(ck.replica_steps) < self.cfg.replicas:  # more replicas now: they start with the slowest
                for r in range(len(ck.replica_steps), self.cfg.replicas):
                    self.progress[r].step = self.replica_start[r] = min(ck.replica_steps) if ck.replica_steps else 0
            self.checkpoints = [ck]
            self.initialized = True
            self._save()

    # ------------------------------------------------------------ persistence
    def to_json(self) -> dict:
        wall_offset = time.time() - self.clock()  # leases are monotonic; store wall time
        return {
            "job_id": self.job_id,
            "generation": self.generation,
            "config": self.cfg.to_yaml(),
            "replica_generation": self.replica_generation,
            "replica_start": self.replica_start,
            "initialized": self.initialized,
            "started": self.started,
            "ending": self.ending.to_json(),
            "slots": [dict(asdict(s), lease_until=s.lease_until + wall_offset) for s in self.slots.values()],
            "members": [dict(asdict(m), lease_until=m.lease_until + wall_offset) for m in self.members.values()],
            "progress": [asdict(p) for p in self.progress],
            "checkpoints": [asdict(c) for c in self.checkpoints],
        }

    def _save(self) -> None:
        if not self.state_dir:
            return
        try:
            os.makedirs(self.state_dir, exist_ok=True)
            atomic_write(os.path.join(self.state_dir, "state.json"), json.dumps(self.to_json()).encode())
        except OSError as e:
            # A full disk must not fail a worker's Register or Heartbeat: the state stays in memory
            # and the checkpoint thread writes it again every second until there is room.
            metrics.STATE_SAVE_FAILURES.inc()
            log.warning("could not write %s/state.json (%s); kept in memory, retrying", self.state_dir, e)

    def save(self) -> None:
        with self.lock:
            self._save()

    @classmethod
    def load(cls, state_dir: str, clock=time.monotonic, wall=time.time) -> JobState | None:
        """The state a previous coordinator left in ``state_dir``, or None."""
        path = os.path.join(state_dir, "state.json")
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        st = cls(from_yaml(d["config"]), state_dir, clock, wall)
        offset = st.clock() - time.time()
        # Leases restart from now: the workers get a full lease to find us again.
        grace = st.clock() + st.cfg.lease_seconds
        st.job_id, st.generation = d["job_id"], d["generation"]
        st.replica_generation = d.get("replica_generation", st.replica_generation)
        st.replica_start = d.get("replica_start", st.replica_start)
        st.initialized, st.started = d["initialized"], d["started"]
        st.ending = Ending.from_json(d.get("ending"))  # the budget goes on counting; an end stays
        st._end_clock = st.clock()
        for s in d["slots"]:
            slot = Slot(**dict(s, lease_until=max(s["lease_until"] + offset, grace) if s["member_id"] else 0.0))
            st.slots[(slot.replica, slot.partition)] = slot
        for m in d["members"]:
            member = Member(**dict(m, lease_until=grace))
            st.members[member.member_id] = member
        st.progress = [ReplicaProgress(**p) for p in d["progress"]]
        st.checkpoints = [Checkpoint(**c) for c in d["checkpoints"]]
        return st
