"""The shard watchdog without gRPC: which shards it refills, from what, and under the commit lock."""

from __future__ import annotations

import threading
from contextlib import nullcontext

import numpy as np
from shard_fakes import FakeShards

from downpour.config import JobConfig
from downpour.coordinator.manager import CheckpointManager
from downpour.coordinator.params import Parameters
from downpour.coordinator.shards import ShardError
from downpour.coordinator.state import JobState
from downpour.coordinator.supervisor import ShardSupervisor


def make(tmp_path, initialized=True):
    cfg = JobConfig(preset="tiny", replicas=1, steps=50, keep_checkpoints=3, warm_start=0)
    params = Parameters(cfg, 2)
    shards = FakeShards(tmp_path, params.sizes, params.place)
    state = JobState(cfg, None)
    state.initialized = initialized
    mgr = CheckpointManager(state, params.place, str(tmp_path), lambda: nullcontext(shards))
    sup = ShardSupervisor(state, params, str(tmp_path), mgr.lock)
    return sup, mgr, shards, params


def values(shards, i):
    return {n: b.w.copy() for n, b in shards.stores[i].blocks.items()}


def test_nothing_is_checked_before_the_parameters_exist(tmp_path):
    sup, _, shards, _ = make(tmp_path, initialized=False)
    shards.restart(0)
    assert sup.check(shards) == [] and shards.calls == []


def test_shards_holding_their_blocks_are_left_alone(tmp_path):
    sup, _, shards, _ = make(tmp_path)
    assert sup.check(shards) == []
    assert [c[0] for c in shards.calls] == ["blocks", "blocks"]


def test_a_shard_that_does_not_answer_is_waited_for(tmp_path):
    sup, _, shards, _ = make(tmp_path)
    shards.down.add(1)
    assert sup.check(shards) == [] and sup.down == [False, True]
    shards.down.clear()
    assert sup.check(shards) == [] and sup.down == [False, False]


def test_before_any_checkpoint_an_empty_shard_makes_its_initial_blocks_again(tmp_path):
    sup, _, shards, params = make(tmp_path)
    shards.restart(1)
    assert sup.check(shards) == [1]
    assert shards.named("set_optimizer") == [("set_optimizer", 1)]
    assert shards.named("init_blocks") == [("init_blocks", 1, sorted(params.names_on(1)))]
    assert set(shards.stores[1].blocks) == set(params.names_on(1))


def test_an_empty_shard_restores_its_part_of_the_newest_checkpoint(tmp_path):
    sup, mgr, shards, _ = make(tmp_path)
    mgr.checkpoint("old")
    for b in shards.stores[0].blocks.values():
        b.w += 1  # training goes on
    mgr.checkpoint("new")
    want = values(shards, 0)
    shards.restart(0)
    assert sup.check(shards) == [0]
    assert shards.named("restore") == [("restore", 0, "new")]
    assert shards.named("set_optimizer") == [("set_optimizer", 0)]
    got = values(shards, 0)
    assert set(got) == set(want)
    for n in want:
        np.testing.assert_array_equal(got[n], want[n])


def test_a_checkpoint_the_shard_cannot_load_falls_back_to_an_older_one(tmp_path):
    sup, mgr, shards, _ = make(tmp_path)
    mgr.checkpoint("old")
    mgr.checkpoint("new")
    shards.unloadable.add("new")
    shards.restart(1)
    assert sup.check(shards) == [1]
    assert shards.named("restore") == [("restore", 1, "new"), ("restore", 1, "old")]
    assert shards.named("init_blocks") == []


def test_a_checkpoint_of_another_placement_is_not_used(tmp_path):
    sup, mgr, shards, params = make(tmp_path)
    mgr.place = {n: 1 - s for n, s in params.place.items()}  # written under another placement
    shards_other = FakeShards(tmp_path, params.sizes, mgr.place)
    mgr.connect = lambda: nullcontext(shards_other)
    mgr.checkpoint("elsewhere")
    shards.restart(0)
    assert sup.check(shards) == [0]
    assert shards.named("restore") == [] and len(shards.named("init_blocks")) == 1


def test_no_checkpoint_is_committed_while_a_shard_is_refilled(tmp_path):
    sup, mgr, shards, _ = make(tmp_path)
    mgr.checkpoint("c")
    held = []
    shards.on_restore = lambda i, ck: held.append(mgr.lock.locked())
    shards.restart(0)
    sup.check(shards)
    assert held == [True] and not mgr.lock.locked()


def test_the_watchdog_thread_logs_and_retries_a_failed_refill(tmp_path):
    sup, _, shards, _ = make(tmp_path)
    shards.restart(1)
    shards.fail["init_blocks"] = ShardError("UNAVAILABLE", "busy")
    stop = threading.Event()
    t = threading.Thread(target=sup.run, args=(stop, lambda: nullcontext(shards), 0.01))
    t.start()
    try:
        for _ in range(500):
            if len(shards.named("init_blocks")) >= 2:
                break
            stop.wait(0.01)
    finally:
        stop.set()
        t.join(5)
    assert len(shards.named("init_blocks")) >= 2  # the first failed, a later check refilled it
