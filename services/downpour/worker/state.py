"""The worker's life as a state machine, free of gRPC and threads.

One thread owns a worker's state: the training thread (``Worker.run``). The
heartbeat thread and the progress reports only *say* what the coordinator
wants, as ``Control`` messages put into an ``Inbox`` (a ``queue.Queue``); the
owner reads them where it can act on them (between steps, while waiting, in
a halo exchange's cancellation check) and feeds them through ``transition``.

States::

    REGISTERING --SLOT--> TRAINING --FINISHED--> DONE --STOP--> STOPPED
        |                  |  ^  |                 |
     NO_SLOT    INTERRUPTED|  |  |REASSIGN         |REASSIGN (a new slot)
        v       PEER_LOST  v  |  +-------<---------+
     WAITING <--NO_SLOT-- RESYNCING

Events are of two kinds. Control events come from the coordinator and can
arrive in any state but the last: ``STOP`` (the job, or our part in it, is
over), ``REASSIGN`` (a new slot, or our replica's generation changed: restart
there) and ``REREGISTER`` (a restarted coordinator does not know us).
Outcomes come from the owner's own work and only where that work is done:
``SLOT``/``NO_SLOT`` answer a registration, ``FINISHED``, ``INTERRUPTED`` (a
shard or the feeder stayed away past its deadline) and ``PEER_LOST`` (a peer
partition went silent) end a training run. Anything else is a bug:
``transition`` refuses it with ``IllegalTransition``.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from enum import Enum
from typing import Any

from downpour.v1 import coordinator_pb2 as cpb
from downpour.v1 import worker_pb2


class State(Enum):
    REGISTERING = "registering"  # asking the coordinator for a membership and perhaps a slot
    WAITING = "waiting"  # a spare: registered, no slot free yet
    TRAINING = "training"  # running the Downpour loop on an assignment
    RESYNCING = "resyncing"  # giving the slot back and taking it again: a new generation for the replica
    DONE = "done"  # our replica reached the job's steps: waiting for the coordinator to end the job
    STOPPED = "stopped"  # the coordinator ended our part (or the process is shutting down)


class Event(Enum):
    # Control, from the coordinator (heartbeats and progress reports)
    STOP = "stop"
    REASSIGN = "reassign"
    REREGISTER = "reregister"
    # Outcomes of the owner's own work
    SLOT = "slot"  # registered with an assignment
    NO_SLOT = "no_slot"  # registered as a spare
    FINISHED = "finished"  # the replica reached the job's steps
    INTERRUPTED = "interrupted"  # a shard or the feeder stayed away past its retry deadline
    PEER_LOST = "peer_lost"  # a peer partition of our replica went silent


CONTROL = frozenset({Event.STOP, Event.REASSIGN, Event.REREGISTER})


class IllegalTransition(RuntimeError):
    """An event that cannot happen in the state it was fed to."""


def _control(state: State, reassign: State, reregister: State) -> dict[tuple[State, Event], State]:
    return {
        (state, Event.STOP): State.STOPPED,
        (state, Event.REASSIGN): reassign,
        (state, Event.REREGISTER): reregister,
    }


TRANSITIONS: dict[tuple[State, Event], State] = {
    # Control events during a registration wait until it has answered (the owner does not read the
    # inbox meanwhile); fed here they change nothing but STOP: the answer is the news.
    **_control(State.REGISTERING, reassign=State.REGISTERING, reregister=State.REGISTERING),
    (State.REGISTERING, Event.SLOT): State.TRAINING,
    (State.REGISTERING, Event.NO_SLOT): State.WAITING,
    **_control(State.WAITING, reassign=State.TRAINING, reregister=State.REGISTERING),
    # A reassignment restarts the loop on the new slot or generation.
    **_control(State.TRAINING, reassign=State.TRAINING, reregister=State.REGISTERING),
    (State.TRAINING, Event.FINISHED): State.DONE,
    (State.TRAINING, Event.INTERRUPTED): State.RESYNCING,
    (State.TRAINING, Event.PEER_LOST): State.RESYNCING,
    # A resync registers anew: its answer supersedes a reassignment or a lost membership.
    **_control(State.RESYNCING, reassign=State.RESYNCING, reregister=State.RESYNCING),
    (State.RESYNCING, Event.SLOT): State.TRAINING,
    (State.RESYNCING, Event.NO_SLOT): State.WAITING,
    # A replica that is done has nothing to resume: it waits for the job's end, or a new slot.
    **_control(State.DONE, reassign=State.TRAINING, reregister=State.DONE),
}


def transition(state: State, event: Event) -> State:
    """The state after ``event`` in ``state``; ``IllegalTransition`` where it cannot happen."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"{event.value} in state {state.value}") from None


# What ``Status`` reports for each state (the wire has fewer states than the worker).
WIRE_STATE = {
    State.REGISTERING: worker_pb2.WORKER_STATE_WAITING,
    State.WAITING: worker_pb2.WORKER_STATE_WAITING,
    State.TRAINING: worker_pb2.WORKER_STATE_TRAINING,
    State.RESYNCING: worker_pb2.WORKER_STATE_TRAINING,
    State.DONE: worker_pb2.WORKER_STATE_PAUSED,
    State.STOPPED: worker_pb2.WORKER_STATE_STOPPED,
}


@dataclass(frozen=True)
class Control:
    """What the coordinator said: a control event, or (``event`` None) an assignment it confirmed.

    ``assignment`` is the coordinator's ``Assignment`` message where it sent one.
    """

    event: Event | None
    assignment: Any = None


def merge(held: Control | None, new: Control, generation: int | None) -> Control | None:
    """The control to act on, given the one already held and a newer one.

    ``generation`` is the owner's current assignment's (None without one). A STOP is final and
    wins; otherwise the newer word wins. A confirmed assignment (``event`` None) is news only where
    its generation differs from ours: a peer partition of our replica was replaced.
    """
    if new.event is None:
        if generation is None or new.assignment is None or new.assignment.generation == generation:
            return held
        new = Control(Event.REASSIGN, new.assignment)
    if held is not None and held.event is Event.STOP:
        return held
    return new


class Inbox:
    """Control messages from any thread to the one owner of the state.

    ``put`` may be called from any thread; ``pending`` and ``take`` only from the owner's,
    which alone holds the merged result between them.
    """

    def __init__(self) -> None:
        self._q: queue.Queue[Control] = queue.Queue()
        self._held: Control | None = None

    def put(self, c: Control) -> None:
        self._q.put(c)

    def pending(self, generation: int | None) -> Control | None:
        """Read what has arrived and return the control to act on, keeping it for ``take``."""
        while True:
            try:
                c = self._q.get_nowait()
            except queue.Empty:
                return self._held
            self._held = merge(self._held, c, generation)

    def take(self, generation: int | None) -> Control | None:
        """``pending``, and forget it: the owner is acting on it."""
        c = self.pending(generation)
        self._held = None
        return c

    def wait(self, generation: int | None, timeout: float) -> Control | None:
        """``pending``, waiting up to ``timeout`` seconds for something to arrive."""
        if self.pending(generation) is None:
            try:
                self._held = merge(None, self._q.get(timeout=timeout), generation)
            except queue.Empty:
                pass
        return self.pending(generation)


def from_heartbeat(r: cpb.HeartbeatResponse) -> Control | None:
    """What a heartbeat's answer says, as a control message (None: carry on)."""
    if r.action == cpb.ACTION_STOP:
        return Control(Event.STOP)
    if r.action == cpb.ACTION_REASSIGN:
        return Control(Event.REASSIGN, r.assignment)
    if r.action == cpb.ACTION_CONTINUE and r.HasField("assignment"):
        return Control(None, r.assignment)  # news only if its generation is not ours: see ``merge``
    return None
