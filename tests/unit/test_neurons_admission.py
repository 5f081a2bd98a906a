"""downpour.neurons.limits in process: the cost of a query, and the admission queue's order and refusals."""

from __future__ import annotations

import threading
import time

import pytest

from downpour.neurons import cancel, limits
from downpour.nn import presets
from downpour.nn.summary import summarize

TINY = presets.get("tiny")


def test_layer_flops_add_up_to_the_summary_and_grow_with_depth():
    per = [limits.layer_flops(TINY, f"stage{i}.{p}") for i in (1, 2, 3) for p in ("filter", "pool", "output")]
    assert per == sorted(per) and len(set(per)) == len(per)
    assert per[-1] == summarize(TINY)["flops_per_example"]  # tiny has no head: stage3.output is everything
    assert limits.layer_flops(TINY, "stage1.filter") == summarize(TINY)["layers"][0]["flops"]


def test_budgets_refuse_by_cost_and_cut_an_open_scan():
    b = limits.Budgets(stimulus_gflop=20, scan_gflop=0.01)
    b.check_stimulus(TINY, "stage3.output", 1000, 8)  # the explorer's biggest search
    with pytest.raises(limits.OverBudget, match=r"steps=5000 x restarts=64 .* 67.2 GFLOP"):
        b.check_stimulus(TINY, "stage3.output", 5000, 64)
    assert b.scan_examples(TINY, "stage3.output", 100, 100) == 100
    assert b.scan_examples(TINY, "stage3.output", 2100, 0) == 142  # 0: as many as allowed
    with pytest.raises(limits.OverBudget, match="max_examples <= 142"):
        b.scan_examples(TINY, "stage3.output", 1000, 1000)
    assert limits.NO_BUDGETS.scan_examples(TINY, "stage3.output", 10**9, 10**9) == 10**9
    limits.NO_BUDGETS.check_stimulus(TINY, "stage3.output", 5000, 64)


@pytest.mark.parametrize("preset", ["tiny", "small", "medium", "le2012"])
def test_default_budgets_let_the_explorers_questions_through_on_every_model_and_nothing_40x_larger(preset):
    from downpour.neurons.explorer import MAX_STEPS

    spec = presets.get(preset)
    top = summarize(spec)["layers"][-1]["name"]
    b = limits.Budgets(stimulus_gflop=None, scan_gflop=None, scan_examples_default=20000)
    assert b.stimulus_limit(spec) >= limits.MIN_STIMULUS_GFLOP and b.scan_limit(spec) >= limits.MIN_SCAN_GFLOP
    assert limits.EXPLORER_LARGEST_SEARCH == (MAX_STEPS, limits.StimulusSettings().restarts)
    b.check_stimulus(spec, top, MAX_STEPS, 8)
    assert b.scan_examples(spec, top, 20000, 20000) == 20000
    with pytest.raises(limits.OverBudget):
        b.check_stimulus(spec, top, 5000, 64)


def _until(cond, what: str, seconds: float = 10.0) -> None:
    end = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


class _Caller:
    """A thread that takes a slot and holds it until released; its caller can hang up."""

    def __init__(self, adm: limits.Admission, order: list[str], name: str) -> None:
        self.active, self.release, self.outcome = True, threading.Event(), ""
        self.thread = threading.Thread(target=self._run, args=(adm, order, name))
        self.thread.start()

    def _run(self, adm, order, name) -> None:
        try:
            with adm.slot("T", lambda: self.active):
                order.append(name)
                self.release.wait(30)
            self.outcome = "ran"
        except cancel.Cancelled:
            self.outcome = "cancelled"
        except limits.Busy:
            self.outcome = "busy"

    def done(self) -> str:
        self.thread.join(30)
        return self.outcome


def test_admission_runs_n_queues_q_in_order_and_refuses_the_rest_at_once():
    adm = limits.Admission(running=1, queued=2)
    order: list[str] = []
    a = _Caller(adm, order, "a")
    _until(lambda: order == ["a"], "a to run")
    b = _Caller(adm, order, "b")
    _until(lambda: len(adm._queue) == 1, "b queued")
    c = _Caller(adm, order, "c")
    _until(lambda: len(adm._queue) == 2, "c queued")
    assert _Caller(adm, order, "d").done() == "busy"  # no wait for anything
    b.active = False  # b's caller hangs up while it waits
    adm.wake()
    assert b.done() == "cancelled"
    assert len(adm._queue) == 1
    a.release.set()
    assert a.done() == "ran"
    _until(lambda: order == ["a", "c"], "c to run after a")
    c.release.set()
    assert c.done() == "ran"
    assert adm._running == 0 and not adm._queue


def test_admission_serves_the_queue_first_come_first_served():
    adm = limits.Admission(running=1, queued=3)
    order: list[str] = []
    first = _Caller(adm, order, "first")
    _until(lambda: order == ["first"], "the first to run")
    waiting = []
    for n, name in enumerate(("x", "y", "z"), 1):
        waiting.append(_Caller(adm, order, name))
        _until(lambda n=n: len(adm._queue) == n, f"{name} queued")
    first.release.set()
    for w in waiting:
        w.release.set()
        assert w.done() == "ran"
    assert order == ["first", "x", "y", "z"]
