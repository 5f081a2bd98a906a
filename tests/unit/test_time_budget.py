"""A job's wall-clock training budget (``max_seconds``): when its clock starts, when the job ends,
that the end is latched and survives a restart, and the final checkpoint after it."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext

import pytest
from shard_fakes import FakeShards

from downpour import config
from downpour.config import JobConfig
from downpour.coordinator import messages
from downpour.coordinator.ending import STEPS, TIME_BUDGET, Ending
from downpour.coordinator.manager import CheckpointManager
from downpour.coordinator.params import Parameters
from downpour.coordinator.state import JobState
from downpour.up.command import ending_line
from downpour.up.outputs import write_outputs
from downpour.up.status import ended_by, snapshot
from downpour.v1 import common_pb2
from downpour.v1 import coordinator_pb2 as pb


class Clock:
    """A settable clock: the monotonic one (leases) and the wall one (the budget) are two of these."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(state_dir=None, replicas=2, steps=1000, max_seconds=4.0, **kw):
    cfg = JobConfig(
        preset="tiny",
        replicas=replicas,
        steps=steps,
        max_seconds=max_seconds,
        lease_seconds=5.0,
        warm_start=0,
        **kw,
    )
    clock, wall = Clock(100.0), Clock(1_700_000_000.0)
    return JobState(cfg, state_dir, clock, wall), clock, wall


def test_the_budget_counts_from_the_first_reported_step_not_from_the_start_up():
    st, _, wall = make()
    a, b = st.register("h:1"), st.register("h:2")
    wall.t += 3600  # an hour of start-up (launches, imports) eats nothing
    assert not st.done and st.training_seconds() == 0.0
    assert st.report(a.member_id, 0, 1.0, 0) is True  # a report without a step taken starts nothing
    assert st.ending.started == 0.0
    t0 = wall.t
    assert st.report(a.member_id, 1, 1.0, 32) is True
    assert st.ending.started == t0
    st.report(b.member_id, 3, 1.0, 96)
    wall.t = t0 + 3.999
    assert not st.done and st.training_seconds() == pytest.approx(3.999)
    assert st.heartbeat(a.member_id)[0] == "continue"
    wall.t = t0 + 4.0
    assert st.done
    assert (st.ending.reason, st.ending.step) == (TIME_BUDGET, 1)  # the slowest replica's step then
    assert st.training_seconds() == pytest.approx(4.0)
    # ended exactly as at the step count: reports and heartbeats say stop, nobody new gets a slot
    assert st.report(a.member_id, 2, 1.0, 32) is False
    assert st.heartbeat(b.member_id)[0] == "stop"
    assert st.register("h:3").replica == -1
    assert st.progress[0].step == 2  # a step taken before the stop arrived still counts (it was pushed)


def test_the_end_by_time_is_latched_whatever_the_clock_does_afterwards():
    st, _, wall = make()
    a = st.register("h:1")
    st.report(a.member_id, 1, 1.0, 32)
    wall.t += 10
    assert st.done
    wall.t -= 1000  # the wall clock set back (NTP): the job does not start again
    assert st.done and st.ending.reason == TIME_BUDGET
    assert st.training_seconds() == pytest.approx(10.0)  # frozen at the end


def test_done_by_steps_first_says_so_and_a_budget_of_zero_never_ends_a_job():
    st, _, wall = make(steps=5)
    a, b = st.register("h:1"), st.register("h:2")
    st.report(a.member_id, 5, 1.0, 32)
    assert not st.done
    st.report(b.member_id, 5, 1.0, 32)
    assert st.done and (st.ending.reason, st.ending.step) == (STEPS, 5)
    wall.t += 100
    assert st.ending.reason == STEPS  # the budget spent later changes nothing
    unlimited, _, wall = make(max_seconds=0.0)
    m = unlimited.register("h:1")
    unlimited.report(m.member_id, 1, 1.0, 32)
    wall.t += 1e9
    assert not unlimited.done


def test_the_training_clock_is_saved_and_a_restarted_coordinator_keeps_counting(tmp_path):
    st, clock, wall = make(str(tmp_path))
    a = st.register("h:1")
    st.report(a.member_id, 1, 1.0, 32)
    t0 = wall.t
    wall.t += 2.5
    st.save()
    # A new coordinator adopts the state (its own monotonic clock starts elsewhere).
    again = JobState.load(str(tmp_path), Clock(7.0), wall)
    assert again is not None and again.ending.started == t0 and not again.done
    assert again.training_seconds() == pytest.approx(2.5)
    wall.t = t0 + 4.0  # the time down counts: it is wall-clock time
    assert again.done and again.ending.reason == TIME_BUDGET


def test_an_ended_job_stays_ended_across_a_restart(tmp_path):
    st, _, wall = make(str(tmp_path))
    a, b = st.register("h:1"), st.register("h:2")
    st.report(a.member_id, 7, 1.0, 32)
    st.report(b.member_id, 5, 1.0, 32)
    wall.t += 4.0
    assert st.done  # saved as it ends
    wall.t -= 100  # whatever the clock of the machine the new coordinator runs on says
    again = JobState.load(str(tmp_path), Clock(0.0), wall)
    assert again is not None and again.done
    assert (again.ending.reason, again.ending.step) == (TIME_BUDGET, 5)
    assert again.heartbeat(a.member_id)[0] == "stop"


def test_after_a_time_budget_end_the_state_settles_once_every_holder_reported_or_a_lease_passed():
    st, clock, wall = make()
    a, b = st.register("h:1"), st.register("h:2")
    st.report(a.member_id, 1, 1.0, 32)
    st.report(b.member_id, 1, 1.0, 32)
    assert not st.settled()  # not done
    wall.t += 5
    assert st.done and not st.settled()  # both replicas may still be inside a step
    st.report(a.member_id, 4, 1.0, 96)
    assert not st.settled()
    st.report(b.member_id, 3, 1.0, 64)
    assert st.settled()
    # a holder that never reports again is waited for one lease at most
    st2, clock2, wall2 = make()
    c = st2.register("h:1")
    st2.register("h:2")
    st2.report(c.member_id, 1, 1.0, 32)
    wall2.t += 5
    assert st2.done and not st2.settled()
    clock2.t += st2.cfg.lease_seconds
    assert st2.settled()


def test_the_final_checkpoint_after_a_time_budget_records_every_replicas_reached_step(tmp_path):
    st, clock, wall = make()
    st.initialized = True
    params = Parameters(st.cfg, 2)
    shards = FakeShards(tmp_path, params.sizes, params.place)
    mgr = CheckpointManager(st, params.place, str(tmp_path), lambda: nullcontext(shards), clock)
    a, b = st.register("h:1"), st.register("h:2")
    st.report(a.member_id, 1, 1.0, 32)
    st.report(b.member_id, 1, 1.0, 32)
    mgr.tick()
    st.report(a.member_id, 9, 1.0, 32)
    wall.t += 4.0
    mgr.tick()  # the budget is spent, but replica 1 has not made its last report yet
    assert st.done and not mgr.succeeded and shards.named("checkpoint") == []
    st.report(b.member_id, 6, 1.0, 32)  # its answer stops it
    st.report(a.member_id, 9, 1.0, 0)
    mgr.tick()
    assert mgr.succeeded
    [ck] = st.checkpoints
    assert ck.replica_steps == [9, 6] and ck.step == 6 and 0 < ck.step < st.cfg.steps
    mgr.tick()
    assert len(shards.named("checkpoint")) == 1  # written once


def test_ending_records():
    e = Ending()
    assert not e.check(3, 10, 4.0, 1e9)  # no clock started: no time end
    assert e.start(50.0) and not e.start(60.0)  # the first start wins
    assert not e.check(3, 10, 4.0, 53.9)
    assert e.check(3, 10, 4.0, 54.0) and e.reason == TIME_BUDGET and e.step == 3
    assert not e.check(10, 10, 4.0, 55.0) and e.reason == TIME_BUDGET  # set once
    assert Ending.from_json(e.to_json()) == e
    assert Ending.from_json(None) == Ending()  # a state saved before budgets existed
    with pytest.raises(ValueError, match="unknown reason"):
        Ending.from_json({"reason": "bored"})


@pytest.mark.parametrize("bad", [-1.0, -1e-9, math.nan, math.inf])
def test_max_seconds_must_be_a_finite_number_at_least_zero(bad):
    with pytest.raises(ValueError, match="max_seconds"):
        config.load(env={}, overrides={"max_seconds": bad})


def test_max_seconds_comes_from_yaml_the_environment_and_flags(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("max_seconds: 30\n")
    assert config.load(str(p), env={}).max_seconds == 30.0
    assert config.load(str(p), env={"DOWNPOUR_MAX_SECONDS": "4.5"}).max_seconds == 4.5
    assert config.load(str(p), env={"DOWNPOUR_MAX_SECONDS": "4.5"}, overrides={"max_seconds": 2}).max_seconds == 2.0
    with pytest.raises(ValueError, match="max_seconds must be a number"):
        config.load(env={"DOWNPOUR_MAX_SECONDS": "soon"})
    assert config.JobConfig().max_seconds == 0.0
    assert config.from_yaml(config.load(str(p), env={}).to_yaml()).max_seconds == 30.0


def _ended_status(reason: int, end_step: int, seconds: float, max_seconds: float) -> pb.JobStatusResponse:
    r = pb.JobStatusResponse(
        job=common_pb2.JobSpec(max_steps=100000, max_seconds=max_seconds),
        state=pb.JOB_STATE_SUCCEEDED,
        step=end_step + 2,
        end_reason=reason,
        end_step=end_step,
        training_seconds=seconds,
    )
    r.slots.add(replica=0, partition=0, step=end_step + 2, loss=1.0)
    return r


def test_status_rows_metrics_and_the_status_line_say_what_ended_the_job(tmp_path):
    timed = _ended_status(pb.END_REASON_TIME_BUDGET, 120, 4.1, 4.0)
    row = snapshot(timed)
    assert (row["ended_by"], row["end_step"], row["training_seconds"]) == (TIME_BUDGET, 120, pytest.approx(4.1))
    assert ending_line(timed) == "ended on its time budget (4 s of training) at step 120"
    by_steps = _ended_status(pb.END_REASON_STEPS, 60, 9.24, 0.0)
    assert snapshot(by_steps)["ended_by"] == STEPS
    assert ending_line(by_steps) == "ended at its step count, step 60, after 9.2 s of training"
    running = pb.JobStatusResponse(job=common_pb2.JobSpec(max_seconds=30.0), training_seconds=12.34)
    assert (
        snapshot(running)["ended_by"] == "" and ending_line(running) == "time budget: 12.3 s of 30 s of training used"
    )
    assert ending_line(pb.JobStatusResponse()) == ""
    write_outputs(str(tmp_path), [snapshot(running), row], JobConfig(preset="tiny", replicas=1, max_seconds=4.0))
    final = json.loads((tmp_path / "metrics.json").read_text())["final"]
    assert (final["ended_by"], final["end_step"], final["step"]) == (TIME_BUDGET, 120, 122)


def test_the_job_spec_carries_the_budget_and_the_coordinator_reports_the_end():
    cfg = JobConfig(preset="tiny", replicas=1, max_seconds=2.5)
    assert messages.job_spec(cfg, "j", 1, "/ck").max_seconds == 2.5
    assert set(messages.END_REASONS) == {STEPS, TIME_BUDGET}
    for reason, wire in messages.END_REASONS.items():  # the launcher's names are the state's
        assert ended_by(pb.JobStatusResponse(end_reason=wire)) == reason
