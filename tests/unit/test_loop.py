"""The Downpour loop's schedule against a fake store that counts what it is asked.

The fake store holds one value ``w``; a push adds the gradient to it, so the
value a step computes with says exactly which updates it saw: with every
gradient 1, ``w`` is the number of examples' updates applied before that step.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from downpour.optim import OptimizerConfig
from downpour.worker.loop import DownpourLoop, LocalStore


class CountingStore:
    def __init__(self, push_seconds: float = 0.0) -> None:
        self.w = 0.0
        self.pulls = self.pushes = self.push_pulls = 0
        self.in_flight = self.max_in_flight = 0
        self.push_seconds = push_seconds
        self.pushed: list[float] = []  # the gradient of every push and push_pull, in order
        self._lock = threading.Lock()

    def pull(self, names):
        with self._lock:
            self.pulls += 1
            return {"w": np.array([self.w], np.float32)}

    def push(self, grads):
        with self._lock:
            self.pushes += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        time.sleep(self.push_seconds)
        with self._lock:
            self.w += float(grads["w"][0])
            self.pushed.append(float(grads["w"][0]))
            self.in_flight -= 1
        return None

    def wait(self, ticket) -> None:
        return None

    def push_pull(self, grads, views=False):
        with self._lock:
            self.push_pulls += 1
            self.w += float(grads["w"][0])
            self.pushed.append(float(grads["w"][0]))
            return {"w": np.array([self.w], np.float32)}


def run(store, steps: int, **kw) -> list[float]:
    seen: list[float] = []

    def compute(params, x, y):
        seen.append(float(params["w"][0]))
        return 0.0, {"w": np.ones(1, np.float32)}

    batches = iter([(np.zeros((1, 1)), None)] * steps)
    loop = DownpourLoop(compute, store, ["w"], batches, **kw)
    for s in range(steps):
        loop.step(s, first=s == 0)
    loop.close()
    return seen


def test_pushpull_computes_with_every_own_update():
    store = CountingStore()
    seen = run(store, 10, schedule="pushpull")
    assert seen == list(range(10))  # zero staleness: step t sees all t earlier updates
    assert (store.pulls, store.push_pulls, store.pushes) == (1, 10, 0)
    assert store.w == 10


def test_pushpull_accumulates_n_push_steps_into_one_round_trip():
    store = CountingStore()
    seen = run(store, 9, schedule="pushpull", n_push=3)
    assert seen == [0, 0, 0, 3, 3, 3, 6, 6, 6]
    assert store.push_pulls == 3 and store.w == 9


def test_pushpull_flushes_a_partial_accumulation_on_close():
    store = CountingStore()
    run(store, 7, schedule="pushpull", n_push=3)
    assert store.push_pulls == 3 and store.w == 7  # 3 + 3 + the last 1 at close


def test_overlap_without_threads_is_one_step_stale():
    store = CountingStore()
    seen = run(store, 6, schedule="overlap", overlap=False)
    # The fetch for step t+1 starts before step t's push: it misses that push.
    assert seen == [0, 0, 1, 2, 3, 4]
    assert store.pushes == 6 and store.pulls == 1 + 6 and store.w == 6


def test_overlap_fetches_every_n_fetch_steps():
    store = CountingStore()
    seen = run(store, 10, schedule="overlap", overlap=False, n_fetch=2, n_push=2)
    assert store.pulls == 1 + 5 and store.pushes == 5 and store.w == 10
    assert seen == [0, 0, 0, 0, 2, 2, 4, 4, 6, 6]


def test_overlap_keeps_at_most_one_push_in_flight():
    store = CountingStore(push_seconds=0.02)
    run(store, 12, schedule="overlap")
    assert store.max_in_flight == 1  # backpressure: the next push waits for the last
    assert store.pushes == 12 and store.w == 12  # close() waited for every push


def test_n_push_steps_accumulate_into_one_push_in_both_schedules():
    for schedule in ("pushpull", "overlap"):
        store = CountingStore()
        run(store, 8, schedule=schedule, overlap=False, n_push=4)
        assert store.pushed == [4.0, 4.0], schedule  # each push carries the sum of four steps' gradients


def test_overlap_flushes_a_partial_accumulation_on_close():
    store = CountingStore()
    run(store, 7, schedule="overlap", overlap=False, n_push=3)
    assert store.pushed == [3.0, 3.0, 1.0] and store.w == 7


def test_overlap_with_threads_is_at_most_two_updates_stale():
    store = CountingStore(push_seconds=0.005)
    seen = run(store, 20, schedule="overlap")
    # A step misses at most its own last update (the pull started before that push) and the
    # one push that may still be in flight; it never goes back in time.
    assert all(t - 2 <= w <= t for t, w in enumerate(seen)), seen
    assert seen == sorted(seen)
    assert store.pushes == 20 and store.w == 20


def test_backpressure_waits_for_the_push_in_flight():
    store = CountingStore(push_seconds=0.03)
    batches = iter([(np.zeros((2, 1)), None)] * 4)
    loop = DownpourLoop(lambda p, x, y: (0.5, {"w": np.ones(1, np.float32)}), store, ["w"], batches)
    results = [loop.step(s, first=s == 0) for s in range(4)]
    # Steps 1-3 each found the previous step's push still in flight (compute is instant).
    assert loop.waited["push"] >= 2 * 0.03 * 0.8
    loop.close()
    assert store.max_in_flight == 1 and store.pushes == 4
    assert [(r.step, r.loss, r.examples) for r in results] == [(s, 0.5, 2) for s in range(4)]


def test_first_step_pulls_again_and_to_host_runs_once_per_push():
    store, copies = CountingStore(), []

    def to_host(grads):
        copies.append(dict(grads))
        return grads

    batches = iter([(np.zeros((1, 1)), None)] * 6)
    loop = DownpourLoop(lambda p, x, y: (0.0, {"w": np.ones(1, np.float32)}), store, ["w"], batches,
                        schedule="pushpull", n_push=2, to_host=to_host)  # fmt: skip
    for s in range(6):
        loop.step(s, first=s in (0, 3))  # a restart at step 3 takes fresh parameters
    loop.close()
    assert store.pulls == 2 and store.push_pulls == 3 and len(copies) == 3


def test_flush_makes_every_step_so_far_reach_the_store():
    store = CountingStore(push_seconds=0.01)
    batches = iter([(np.zeros((1, 1)), None)] * 5)
    loop = DownpourLoop(lambda p, x, y: (0.0, {"w": np.ones(1, np.float32)}), store, ["w"], batches, n_push=2)
    for s in range(5):
        loop.step(s, first=s == 0)
    loop.flush()
    assert store.w == 5 and store.in_flight == 0  # what a worker reports as done has reached the shards
    loop.close()
    assert store.w == 5


def test_the_loop_records_how_long_it_waited_for_batches():
    def slow_batches():
        while True:
            time.sleep(0.01)
            yield np.zeros((1, 1)), None

    loop = DownpourLoop(lambda p, x, y: (0.0, {"w": np.ones(1, np.float32)}), CountingStore(), ["w"], slow_batches(),
                        schedule="pushpull")  # fmt: skip
    for s in range(3):
        loop.step(s, first=s == 0)
    loop.close()
    assert loop.waited["batch"] >= 3 * 0.01 * 0.8


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule='sync'"):
        DownpourLoop(lambda *a: None, CountingStore(), ["w"], iter([]), schedule="sync")


def test_local_store_push_pull_equals_push_then_pull():
    w0 = {"a": np.linspace(-1, 1, 7, dtype=np.float32)}
    g = {"a": np.arange(7, dtype=np.float32) - 3}
    opt = OptimizerConfig(lr=0.1, eps=1e-6, initial_accumulator=0.0)
    s1, s2 = LocalStore(w0, opt), LocalStore(w0, opt)
    got = s1.push_pull(g)
    s2.push(g)
    np.testing.assert_array_equal(got["a"], s2.pull(["a"])["a"])
    assert not np.array_equal(got["a"], w0["a"])
