"""The Downpour SGD loop of one model replica (Dean et al. 2012), transport-free.

Every step the replica takes a minibatch and computes gradients; every
``n_push`` steps it pushes the gradients accumulated since the last push. Two
schedules decide which parameters a step computes with:

``pushpull`` (the default): the push and the next pull are one round trip
    (``store.push_pull``): the shards apply the replica's gradients and send
    back the result, so a replica never computes on parameters that lack its
    own updates. With one replica this is exactly synchronous SGD; with R
    replicas a gradient misses only the updates the other R - 1 made during
    its step. The wait is short where the data plane is shared memory.
``overlap``: Downpour's background fetch and push, as in Algorithm 7.1 run
    asynchronously: every ``n_fetch`` steps a pull starts in the background
    and is used from the next step; at most one push is in flight (the next
    one waits for it: backpressure). Transfers hide behind compute, but a
    step computes on parameters that lack the replica's last one or two
    updates, which early in training, while Adagrad's steps are large, costs
    a lot of loss (docs/benchmarks.md).

The parameter store is anything with ``pull(names) -> {name: array}``,
``push(grads) -> ticket``, ``wait(ticket)`` and ``push_pull(grads) -> {name:
array}``: the parameter-server client in a worker, an in-memory store
(``LocalStore``) for the no-RPC baseline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from downpour import optim
from downpour.config import SCHEDULES
from downpour.optim import OptimizerConfig


class ParamStore(Protocol):
    """What the loop needs of a parameter store (``ParamClient``, ``LocalStore``)."""

    def pull(self, names: list[str]) -> dict[str, np.ndarray]: ...

    def push(self, grads: dict[str, np.ndarray]) -> Any: ...  # a ticket for ``wait``

    def wait(self, ticket: Any) -> object: ...

    def push_pull(self, grads: dict[str, np.ndarray], views: bool = False) -> dict[str, np.ndarray]: ...


# (params, x, y) -> (loss, grads) or (loss, grads, info): info is the objective's named float
# scalars (``downpour.scalars``), handed on to the caller in the step's result.
Compute = Callable[[dict, Any, Any], tuple]

NO_INFO: dict[str, float] = {}  # shared, never written: a step without scalars allocates nothing


@dataclass
class StepResult:
    step: int
    loss: float
    examples: int
    seconds: float
    info: dict = field(default_factory=lambda: NO_INFO)


class LocalStore:
    """Parameters and optimizer state in this process: the baseline without RPC.

    Updates go through ``downpour.optim``, the shards' own rule and kernels, so
    a replica trained here takes bit for bit the steps a shard would apply.
    """

    def __init__(self, params: dict[str, np.ndarray], optimizer: OptimizerConfig) -> None:
        optim.check(optimizer)
        self.optimizer, self._rule = optimizer, optim.get(optimizer.kind)
        self.w = {k: np.array(v, dtype=np.float32).reshape(-1) for k, v in params.items()}
        self.acc = {k: self._rule.init(v.size, optimizer) for k, v in self.w.items()}
        self._scratch = optim.Scratch()

    def pull(self, names):
        return {k: self.w[k].copy() for k in names}

    def push(self, grads):
        for k, g in grads.items():
            g = np.ascontiguousarray(g, dtype=np.float32).reshape(-1)
            self._rule.update(self.w[k], self.acc[k], g, self.optimizer, self._scratch)
        return None

    def wait(self, ticket) -> None:
        return None

    def push_pull(self, grads, views: bool = False):
        self.push(grads)
        return self.pull(list(grads))


class DownpourLoop:
    """Runs steps of one replica against a parameter store and a batch source."""

    def __init__(
        self,
        compute: Compute,
        store: ParamStore,
        names: list[str],
        batches: Iterator,
        n_fetch: int = 1,
        n_push: int = 1,
        overlap: bool = True,
        schedule: str = "overlap",
        to_host: Callable[[dict], dict] | None = None,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is unknown; allowed: {', '.join(SCHEDULES)}")
        self.compute = compute  # (params, x, y) -> (loss, grads[, info])
        # Gradients on a GPU stay there while they accumulate; to_host copies them once per push.
        self.to_host = to_host
        self.store, self.names, self.batches = store, list(names), batches
        self.n_fetch, self.n_push, self.schedule = n_fetch, n_push, schedule
        # Background threads only where the schedule overlaps transfers with compute.
        self.overlap = overlap and schedule == "overlap"
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="downpour-io") if self.overlap else None
        self._pull: Future[dict[str, np.ndarray]] | None = None
        self._push: Future[None] | None = None
        self._acc: dict[str, np.ndarray] | None = None
        self._nacc = 0
        self.params: dict | None = None
        # Seconds this loop spent blocked, by cause: what overlap did not hide.
        self.waited = {"pull": 0.0, "push": 0.0, "batch": 0.0}

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        if self._pool is None:
            f: Future[Any] = Future()
            f.set_result(fn(*args))
            return f
        return self._pool.submit(fn, *args)

    def _host(self, grads: dict) -> dict:
        return grads if self.to_host is None else self.to_host(grads)

    def _do_push(self, grads: dict) -> None:
        self.store.wait(self.store.push(self._host(grads)))

    def flush(self) -> None:
        """Push what has been accumulated and wait for every push in flight."""
        if self.schedule == "pushpull":
            if self._acc is not None and self._nacc:
                self.params = {**(self.params or {}), **self.store.push_pull(self._host(self._acc), views=True)}
                self._acc, self._nacc = None, 0
            return
        if self._acc is not None and self._nacc:
            if self._push is not None:
                self._push.result()
            self._do_push(self._acc)
            self._acc, self._nacc = None, 0
        if self._push is not None:
            self._push.result()
            self._push = None

    def step(self, step: int, first: bool = False) -> StepResult:
        if self.schedule == "pushpull":
            return self._step_pushpull(step, first)
        t0 = time.perf_counter()
        if first or self.params is None:
            self.params = self.store.pull(self.names)
            self.waited["pull"] += time.perf_counter() - t0
        elif self._pull is not None:
            t = time.perf_counter()
            self.params = self._pull.result()
            self.waited["pull"] += time.perf_counter() - t
            self._pull = None
        # Start the next fetch now so that it overlaps this step's compute.
        if (step + 1) % self.n_fetch == 0:
            self._pull = self._submit(self.store.pull, self.names)
        x, loss, info = self._compute()
        if self._nacc >= self.n_push:
            if self._push is not None:
                t = time.perf_counter()
                self._push.result()  # at most one push in flight
                self.waited["push"] += time.perf_counter() - t
            self._push = self._submit(self._do_push, self._acc)
            self._acc, self._nacc = None, 0
        return StepResult(step, float(loss), int(x.shape[0]), time.perf_counter() - t0, info)

    def _step_pushpull(self, step: int, first: bool) -> StepResult:
        t0 = time.perf_counter()
        if first or self.params is None:
            self.params = self.store.pull(self.names)
            self.waited["pull"] += time.perf_counter() - t0
        x, loss, info = self._compute()
        if self._nacc >= self.n_push and self._acc is not None:
            t = time.perf_counter()
            # The shards apply our gradients and hand back the result: the next
            # step computes on parameters that include this replica's own updates.
            # Nothing else pulls meanwhile, so views of the shared region will do.
            self.params = {**(self.params or {}), **self.store.push_pull(self._host(self._acc), views=True)}
            self.waited["push"] += time.perf_counter() - t
            self._acc, self._nacc = None, 0
        return StepResult(step, float(loss), int(x.shape[0]), time.perf_counter() - t0, info)

    def _compute(self) -> tuple[Any, float, dict]:
        """Take a batch, compute the step's gradients and add them to what is pending."""
        t = time.perf_counter()
        x, y = next(self.batches)
        self.waited["batch"] += time.perf_counter() - t
        assert self.params is not None, "a step pulls before it computes"
        out = self.compute(self.params, x, y)
        loss, grads = out[0], out[1]
        self._accumulate(grads)
        return x, loss, (out[2] if len(out) > 2 else NO_INFO)

    def _accumulate(self, grads: dict) -> None:
        if self._acc is None:
            # The gradients are fresh arrays each step: take them over instead of copying.
            self._acc = {k: v if self.to_host else np.asarray(v, dtype=np.float32) for k, v in grads.items()}
        else:
            for k, v in grads.items():
                self._acc[k] += v
        self._nacc += 1

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._pull is not None:
                self._pull.cancel()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
