"""The worker's state machine (``downpour.worker.state``): every event in every state, no gRPC, no threads."""

from __future__ import annotations

import threading

import pytest

from downpour.v1 import common_pb2, worker_pb2
from downpour.v1 import coordinator_pb2 as cpb
from downpour.worker.state import (
    CONTROL,
    TRANSITIONS,
    WIRE_STATE,
    Control,
    Event,
    IllegalTransition,
    Inbox,
    State,
    from_heartbeat,
    merge,
    transition,
)

S, E = State, Event

# The whole table, written out: a change to the worker's life shows up here.
EXPECTED = {
    S.REGISTERING: {E.STOP: S.STOPPED, E.REASSIGN: S.REGISTERING, E.REREGISTER: S.REGISTERING,
                    E.SLOT: S.TRAINING, E.NO_SLOT: S.WAITING},
    S.WAITING: {E.STOP: S.STOPPED, E.REASSIGN: S.TRAINING, E.REREGISTER: S.REGISTERING},
    S.TRAINING: {E.STOP: S.STOPPED, E.REASSIGN: S.TRAINING, E.REREGISTER: S.REGISTERING,
                 E.FINISHED: S.DONE, E.INTERRUPTED: S.RESYNCING, E.PEER_LOST: S.RESYNCING},
    S.RESYNCING: {E.STOP: S.STOPPED, E.REASSIGN: S.RESYNCING, E.REREGISTER: S.RESYNCING,
                  E.SLOT: S.TRAINING, E.NO_SLOT: S.WAITING},
    S.DONE: {E.STOP: S.STOPPED, E.REASSIGN: S.TRAINING, E.REREGISTER: S.DONE},
    S.STOPPED: {},
}  # fmt: skip


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", list(Event))
def test_every_event_in_every_state(state, event):
    want = EXPECTED[state].get(event)
    if want is None:
        with pytest.raises(IllegalTransition, match=f"{event.value} in state {state.value}"):
            transition(state, event)
    else:
        assert transition(state, event) is want


def test_the_table_has_nothing_else():
    assert TRANSITIONS == {(s, e): t for s, row in EXPECTED.items() for e, t in row.items()}


def test_control_events_are_legal_in_every_state_but_the_last():
    for s in State:
        for e in CONTROL:
            assert ((s, e) in TRANSITIONS) == (s is not State.STOPPED)


def test_stop_always_ends_and_stopped_is_final():
    assert all(transition(s, Event.STOP) is State.STOPPED for s in State if s is not State.STOPPED)
    assert not [k for k in TRANSITIONS if k[0] is State.STOPPED]


def test_every_state_is_reachable_from_registering():
    seen, todo = {State.REGISTERING}, [State.REGISTERING]
    while todo:
        s = todo.pop()
        for (a, _), b in TRANSITIONS.items():
            if a is s and b not in seen:
                seen.add(b)
                todo.append(b)
    assert seen == set(State)


def test_a_life_registering_waiting_training_resyncing_done_stopped():
    life = [E.NO_SLOT, E.REASSIGN, E.PEER_LOST, E.SLOT, E.INTERRUPTED, E.NO_SLOT, E.REASSIGN, E.FINISHED, E.STOP]
    s, path = State.REGISTERING, []
    for e in life:
        s = transition(s, e)
        path.append(s)
    assert path == [S.WAITING, S.TRAINING, S.RESYNCING, S.TRAINING, S.RESYNCING, S.WAITING, S.TRAINING, S.DONE,
                    S.STOPPED]  # fmt: skip


def test_every_state_has_a_wire_state():
    assert set(WIRE_STATE) == set(State)
    assert WIRE_STATE[State.DONE] == worker_pb2.WORKER_STATE_PAUSED
    assert WIRE_STATE[State.STOPPED] == worker_pb2.WORKER_STATE_STOPPED


# ------------------------------------------------------------------ what the coordinator says


def assignment(generation: int) -> common_pb2.Assignment:
    return common_pb2.Assignment(replica=1, partition=0, generation=generation)


def test_from_heartbeat():
    assert from_heartbeat(cpb.HeartbeatResponse(action=cpb.ACTION_STOP)) == Control(Event.STOP)
    r = cpb.HeartbeatResponse(action=cpb.ACTION_REASSIGN, assignment=assignment(3))
    c = from_heartbeat(r)
    assert c is not None and c.event is Event.REASSIGN and c.assignment.generation == 3
    c = from_heartbeat(cpb.HeartbeatResponse(action=cpb.ACTION_CONTINUE, assignment=assignment(4)))
    assert c is not None and c.event is None and c.assignment.generation == 4
    assert from_heartbeat(cpb.HeartbeatResponse(action=cpb.ACTION_CONTINUE)) is None
    assert from_heartbeat(cpb.HeartbeatResponse(action=cpb.ACTION_PAUSE)) is None


def test_a_confirmed_assignment_is_news_only_in_another_generation():
    same, other = Control(None, assignment(2)), Control(None, assignment(3))
    assert merge(None, same, generation=2) is None
    assert merge(None, other, generation=None) is None  # without a slot there is nothing to compare
    got = merge(None, other, generation=2)
    assert got is not None and got.event is Event.REASSIGN and got.assignment.generation == 3


def test_stop_wins_and_otherwise_the_newer_word_wins():
    stop, rereg = Control(Event.STOP), Control(Event.REREGISTER)
    reassign = Control(Event.REASSIGN, assignment(5))
    assert merge(stop, reassign, 1) is stop
    assert merge(reassign, stop, 1) is stop
    assert merge(reassign, rereg, 1) is rereg
    assert merge(rereg, reassign, 1) is reassign
    assert merge(reassign, Control(None, assignment(1)), 1) is reassign  # a stale confirmation changes nothing


def test_inbox_holds_what_is_pending_until_taken():
    box = Inbox()
    assert box.pending(1) is None and box.take(1) is None
    box.put(Control(None, assignment(1)))
    assert box.pending(1) is None  # our own generation: no news
    box.put(Control(Event.REASSIGN, assignment(2)))
    box.put(Control(Event.REREGISTER))
    assert box.pending(1) == Control(Event.REREGISTER)
    assert box.pending(1) == Control(Event.REREGISTER)  # still held
    box.put(Control(Event.STOP))
    box.put(Control(Event.REASSIGN, assignment(3)))
    assert box.take(1) == Control(Event.STOP)
    assert box.take(1) is None


def test_inbox_wait_returns_at_once_with_something_held_or_after_the_timeout():
    box = Inbox()
    assert box.wait(1, 0.01) is None
    box.put(Control(Event.STOP))
    assert box.wait(1, 60) == Control(Event.STOP)  # would hang the test if it waited
    assert box.take(1) == Control(Event.STOP)


def test_inbox_carries_control_from_another_thread():
    box = Inbox()
    t = threading.Thread(target=box.put, args=(Control(Event.REREGISTER),))
    t.start()
    got = box.wait(None, 10)
    t.join()
    assert got == Control(Event.REREGISTER)
