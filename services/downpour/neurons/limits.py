"""What one neurons query may cost, and how many heavy queries the service runs and queues at once.

Cost is counted in forward FLOPs of the network up to the queried layer, per image, as
``downpour model --preset NAME`` lists them per layer (``downpour.nn.summary``; a multiply-add
counts 2), and is known from the request alone, before any work starts:

    OptimalStimulus   steps x restarts x 3 x FLOPs(layer)   (a step is a forward and a backward pass,
                                                             the backward counted as two forwards)
    TopInputs         examples scanned x FLOPs(layer)

A request over its budget is refused (``OverBudget``: RESOURCE_EXHAUSTED over gRPC) with the
asked cost, the limit and the flag that sets it. A scan that asks for every example
(``max_examples`` 0) is cut to what the budget allows instead: 0 already meant "as many as the
service allows".

``Admission`` bounds the heavy queries (OptimalStimulus, TopInputs, GetActivations): at most
``running`` at once, at most ``queued`` waiting in arrival order; one more is refused at once
(``Busy``), not after its deadline. A waiting query whose caller hangs up or whose deadline passes
leaves the queue (``cancel.Cancelled``). Cheap calls (health, DescribeModel) never pass through it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from downpour import metrics
from downpour.neurons import cancel
from downpour.neurons.api import StimulusSettings
from downpour.neurons.model import QueryError
from downpour.nn.spec import NetworkSpec
from downpour.nn.summary import summarize

# A step of the optimal-stimulus ascent: the forward pass and the backward pass to the input.
STEP_PASSES = 3
# How often a queued query looks at its caller even when nothing woke it.
POLL_SECONDS = 0.25


class OverBudget(QueryError):
    """A request whose cost, known before any work, is over the service's budget."""


class Busy(Exception):
    """Every slot for heavy queries is taken and the queue is full."""


def layer_flops(spec: NetworkSpec, layer: str) -> int:
    """Forward FLOPs per image of the network up to and including ``layer`` (``stageN.filter``,
    ``stageN.pool``, ``stageN.output``: the stage's last row, ``head.logits``: every row)."""
    stage, _, part = layer.partition(".")
    rows = summarize(spec)["layers"]
    total = 0
    for i, row in enumerate(rows):
        total += int(row["flops"])
        if row["name"] == layer:
            return total
        last_of_stage = i + 1 == len(rows) or not rows[i + 1]["name"].startswith(stage + ".")
        if part == "output" and row["name"].startswith(stage + ".") and last_of_stage:
            return total
    return total


def _gflop(flops: float) -> str:
    return f"{flops / 1e9:.3g} GFLOP"


# The floors of the service's default budgets, and the largest search the explorer asks
# (explorer.MAX_STEPS steps x the default restarts), which the default lets through on any model.
MIN_STIMULUS_GFLOP = 20.0
MIN_SCAN_GFLOP = 100.0
EXPLORER_LARGEST_SEARCH = (1000, StimulusSettings.restarts)
DEFAULT_SCAN_EXAMPLES = 20000  # serve neurons --max-scan


def _top_flops(spec: NetworkSpec) -> int:
    return sum(int(row["flops"]) for row in summarize(spec)["layers"])


@dataclass(frozen=True)
class Budgets:
    """GFLOP one query may cost (0: no limit; None: the default for the served model, see
    ``stimulus_limit``/``scan_limit``); the module docstring says how cost is counted."""

    stimulus_gflop: float | None = 0.0
    scan_gflop: float | None = 0.0
    scan_examples_default: int = DEFAULT_SCAN_EXAMPLES  # the scan the default lets through

    def stimulus_limit(self, spec: NetworkSpec) -> float:
        """GFLOP of one OptimalStimulus on ``spec``. The default: the explorer's largest search at the
        top layer, and at least 20, so that whatever the service's own page asks fits on every
        model and nothing larger does (a 5,000-step x 64-restart search is 40x that)."""
        if self.stimulus_gflop is not None:
            return self.stimulus_gflop
        steps, restarts = EXPLORER_LARGEST_SEARCH
        return max(MIN_STIMULUS_GFLOP, steps * restarts * STEP_PASSES * _top_flops(spec) / 1e9)

    def scan_limit(self, spec: NetworkSpec) -> float:
        """GFLOP of one TopInputs on ``spec``. The default: ``scan_examples_default`` examples at the
        top layer, and at least 100."""
        if self.scan_gflop is not None:
            return self.scan_gflop
        return max(MIN_SCAN_GFLOP, self.scan_examples_default * _top_flops(spec) / 1e9)

    def check_stimulus(self, spec: NetworkSpec, layer: str, steps: int, restarts: int) -> None:
        limit = self.stimulus_limit(spec)
        if not limit:
            return
        per = layer_flops(spec, layer)
        cost = steps * restarts * STEP_PASSES * per
        if cost > limit * 1e9:
            raise OverBudget(
                f"optimal stimulus of steps={steps} x restarts={restarts} at {layer} costs {_gflop(cost)} "
                f"({STEP_PASSES} x {per / 1e6:.3g} MFLOP per step and restart); the limit is "
                f"{limit:.4g} GFLOP (--max-stimulus-gflop): ask for fewer steps or restarts"
            )

    def scan_examples(self, spec: NetworkSpec, layer: str, n: int, asked: int) -> int:
        """How many of ``n`` examples a scan may run; ``asked``: the request's max_examples (0: all)."""
        limit = self.scan_limit(spec)
        if not limit:
            return n
        per = max(layer_flops(spec, layer), 1)
        allowed = int(limit * 1e9 // per)
        if n <= allowed:
            return n
        if asked == 0:  # "as many as the service allows"
            return allowed
        raise OverBudget(
            f"a scan of {n} examples at {layer} costs {_gflop(n * per)} ({per / 1e6:.3g} MFLOP per example); "
            f"the limit is {limit:.4g} GFLOP (--max-scan-gflop), {allowed} examples at this layer: "
            f"ask for max_examples <= {allowed} (0: as many as allowed)"
        )


NO_BUDGETS = Budgets()  # the library's: whatever the caller asks of its own process


class _Ticket:
    """A place in the queue: ``granted`` once a slot is handed to it; ``event`` wakes its waiter."""

    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event, self.granted = threading.Event(), False


class Admission:
    """At most ``running`` heavy queries at once and ``queued`` waiting, first come first served.

    A query that ends hands its slot straight to the head of the queue and wakes only that waiter
    (waking every waiter on every end made 30 queued callers cost a third of the throughput)."""

    def __init__(self, running: int, queued: int) -> None:
        if running < 1 or queued < 0:
            raise ValueError(f"running={running} must be >= 1 and queued={queued} >= 0")
        self.running_max, self.queued_max = running, queued
        self._lock = threading.Lock()
        self._running = 0
        self._queue: deque[_Ticket] = deque()

    def _publish(self) -> None:
        metrics.NEURONS_QUERIES_RUNNING.set(self._running)
        metrics.NEURONS_QUERIES_QUEUED.set(len(self._queue))

    def wake(self) -> None:
        """Let every waiting query look at its caller again."""
        with self._lock:
            for t in self._queue:
                t.event.set()

    def _release(self) -> None:
        with self._lock:
            if self._queue:  # the slot passes to the head of the queue; the running count stays
                head = self._queue.popleft()
                head.granted = True
                head.event.set()
            else:
                self._running -= 1
            self._publish()

    @contextmanager
    def slot(
        self, method: str, is_active: Callable[[], bool], on_end: Callable[[Callable[[], None]], object] | None = None
    ) -> Iterator[None]:
        """Run the block in a slot: at once, after waiting in the queue, or not at all (``Busy``,
        or ``cancel.Cancelled`` when the caller goes away while queued). ``on_end`` (an RPC's
        ``context.add_callback``) wakes this waiter when its call ends, so that it leaves the queue
        at once rather than at its next look (every ``POLL_SECONDS``)."""
        ticket = None
        with self._lock:
            if self._running < self.running_max and not self._queue:
                self._running += 1
            elif len(self._queue) >= self.queued_max:
                metrics.NEURONS_QUERIES_REJECTED.labels(method).inc()
                raise Busy(
                    f"busy: {self._running} heavy queries running and {len(self._queue)} waiting, the most this "
                    f"service takes (--max-running-queries {self.running_max}, --max-queued-queries "
                    f"{self.queued_max}); try again later"
                )
            else:
                ticket = _Ticket()
                self._queue.append(ticket)
            self._publish()
        if ticket is not None:
            if on_end is not None:
                on_end(ticket.event.set)
            self._wait(ticket, is_active)
        try:
            yield
        finally:
            self._release()

    def _wait(self, ticket: _Ticket, is_active: Callable[[], bool]) -> None:
        while True:
            ticket.event.wait(POLL_SECONDS)
            with self._lock:
                if ticket.granted:
                    break
                ticket.event.clear()
                if is_active():
                    continue
                self._queue.remove(ticket)
                self._publish()
            raise cancel.Cancelled("the caller is gone (its deadline passed or it cancelled) while queued")
        if not is_active():  # handed a slot just as its caller left: pass it on
            self._release()
            raise cancel.Cancelled("the caller is gone (its deadline passed or it cancelled) while queued")
