"""The coordinator's membership and progress rules, without any transport."""

import pytest

from downpour.config import JobConfig, from_yaml
from downpour.coordinator.state import MAX_SPARES, Checkpoint, JobState, MemberKeyError, TooManyMembers


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make(replicas=2, partitions="1x1", warm_start=0, **kw):
    # Slot logic without the default warm start (tested on its own below).
    cfg = JobConfig(
        preset="tiny",
        replicas=replicas,
        partitions=partitions,
        steps=10,
        lease_seconds=5.0,
        warm_start=warm_start,
        **kw,
    )
    clock = Clock()
    return JobState(cfg, None, clock), clock


def test_workers_fill_slots_in_order_then_wait_as_spares():
    st, _ = make(replicas=2, partitions="1x2")
    got = [st.register(f"h:{i}") for i in range(5)]
    assert [(m.replica, m.partition) for m in got[:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert got[4].replica == -1  # a spare
    assert st.heartbeat(got[4].member_id)[0] == "wait"


def test_a_dead_workers_slot_goes_to_the_next_worker_with_the_replica_step():
    st, clock = make(replicas=2)
    a, b = st.register("h:1"), st.register("h:2")
    spare = st.register("h:3")
    st.report(b.member_id, 7, 1.5, 32)
    clock.t += 3
    assert st.heartbeat(a.member_id)[0] == "continue"
    clock.t += 3  # b silent for 6 s > 5 s lease
    action, m = st.heartbeat(spare.member_id)
    assert action == "reassign" and (m.replica, m.partition) == (1, 0)
    assert st.progress[1].step == 7  # the replacement resumes replica 1 at its step
    # the old holder, back from the dead, has lost its slot and waits
    assert st.heartbeat(b.member_id)[0] == "wait"


def test_a_registered_worker_that_registers_again_keeps_its_slot():
    st, _ = make()
    a = st.register("h:1")
    again = st.register("h:1", a.member_id, a.key)  # with its key: a known member_id needs it
    assert (again.replica, again.partition) == (a.replica, a.partition)
    assert st.register("h:2").replica == 1


def test_nobody_takes_over_a_member_without_its_key():
    st, _ = make()
    a = st.register("h:1")
    assert len(a.key) == 32 and st.authorize(a.member_id, a.key) is a
    for key in ("", "0" * 32):
        with pytest.raises(MemberKeyError):
            st.register("evil:1", a.member_id, key)
        with pytest.raises(MemberKeyError):
            st.authorize(a.member_id, key)
    assert st.members[a.member_id].address == "h:1"
    assert st.authorize("nobody", "") is None


def test_members_are_bounded_and_those_whose_lease_ran_out_go_first():
    st, clock = make()
    first = st.register("h:0")
    for i in range(len(st.slots) + MAX_SPARES - 1):
        st.register(f"s:{i}")
    with pytest.raises(TooManyMembers):
        st.register("one:more")
    again = st.register("h:0", first.member_id, first.key)  # a known member is no new one
    assert again is first
    clock.t += st.cfg.lease_seconds + 1  # every lease runs out: room again
    st.register("one:more")
    assert len(st.members) == 1


def test_job_step_is_the_slowest_replica_and_done_stops_everyone():
    st, _ = make(replicas=2)
    a, b = st.register("h:1"), st.register("h:2")
    assert st.report(a.member_id, 10, 0.5, 32) is True
    assert st.step == 0 and not st.done
    assert st.report(b.member_id, 10, 0.6, 32) is False  # the job is complete
    assert st.done
    assert st.heartbeat(a.member_id)[0] == "stop"


def test_progress_never_goes_backwards():
    st, _ = make(replicas=1)
    a = st.register("h:1")
    st.report(a.member_id, 5, 1.0, 32)
    st.report(a.member_id, 3, 2.0, 32)  # a late report from before
    assert st.progress[0].step == 5


def test_warm_start_opens_other_replicas_after_replica_0_has_trained():
    st, _ = make(replicas=2, warm_start=4)
    a = st.register("h:1")
    b = st.register("h:2")
    assert a.replica == 0 and b.replica == -1
    st.report(a.member_id, 4, 1.0, 32)
    action, m = st.heartbeat(b.member_id)
    assert action == "reassign" and m.replica == 1


def test_warm_start_longer_than_the_job_does_not_lock_the_others_out():
    st, _ = make(replicas=2, warm_start=50)  # make() gives steps=10
    a = st.register("h:1")
    b = st.register("h:2")
    assert b.replica == -1
    st.report(a.member_id, 10, 1.0, 32)  # replica 0 is done before the warm start would end
    action, m = st.heartbeat(b.member_id)
    assert action == "reassign" and m.replica == 1


def test_unknown_member_is_told_so():
    st, _ = make()
    assert st.heartbeat("nobody") == ("unknown", None)


def test_state_survives_a_restart(tmp_path):
    cfg = JobConfig(preset="tiny", replicas=2, steps=10, lease_seconds=5.0, warm_start=0)
    st = JobState(cfg, str(tmp_path))
    a, b = st.register("h:1"), st.register("h:2")
    st.report(a.member_id, 6, 0.25, 32)
    st.add_checkpoint(Checkpoint("ck1", 3, "/x/MANIFEST.json", [3, 3], [], 1.0))
    again = JobState.load(str(tmp_path))
    assert again.job_id == st.job_id and again.progress[0].step == 6
    assert again.cfg.to_yaml() == cfg.to_yaml()
    # the running workers are re-adopted: their heartbeats continue in their slots
    assert again.heartbeat(a.member_id)[0] == "continue"
    assert again.heartbeat(b.member_id)[0] == "continue"
    assert again.checkpoints[0].checkpoint_id == "ck1"


def test_retention_drops_the_oldest_checkpoints():
    st, _ = make(keep_checkpoints=2)
    dropped = []
    for i in range(4):
        dropped += st.add_checkpoint(Checkpoint(f"ck{i}", i, "", [i, i], [], float(i)))
    assert [c.checkpoint_id for c in st.checkpoints] == ["ck2", "ck3"]
    assert [c.checkpoint_id for c in dropped] == ["ck0", "ck1"]


def test_adopting_a_checkpoint_resumes_each_replica_at_its_step():
    st, _ = make(replicas=3)
    st.adopt_checkpoint(Checkpoint("ck", 4, "", [4, 6], [], 0.0))
    assert [p.step for p in st.progress] == [4, 6, 4]


@pytest.mark.parametrize(
    "bad, needle",
    [
        ({"replicas": 0}, "replicas"),
        ({"partitions": "2by2"}, "partitions"),
        ({"optimizer": {"kind": "adam"}}, "adam"),
        ({"preset": "huge"}, "huge"),
        ({"stepz": 3}, "stepz"),
        ({"steps": "many"}, "steps"),
    ],
)
def test_bad_job_configs_name_the_setting(bad, needle):
    import yaml

    with pytest.raises(ValueError, match=needle):
        from_yaml(yaml.safe_dump(bad))
