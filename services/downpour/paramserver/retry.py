"""Retrying a call to a shard: which failures are worth another try, and how long to keep trying.

With a deadline (what a worker uses), a call that fails because a shard is
down, restarting or not yet refilled (UNAVAILABLE, DEADLINE_EXCEEDED,
NOT_FOUND, CANCELLED), or because the connection broke mid-call (INTERNAL),
is tried again with exponential backoff until it succeeds or the deadline has
passed. Without one, only UNAVAILABLE and
DEADLINE_EXCEEDED are retried, a fixed number of times, at once. A refusal
(INVALID_ARGUMENT, ...) is never retried: the same request would be refused
again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from downpour import metrics

T = TypeVar("T")

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# A shard that restarted answers NOT_FOUND until the coordinator has refilled it. gRPC reports a
# connection corrupted mid-call (a proxy or a NAT cutting it inside an HTTP/2 frame: "Failed
# parsing HTTP/2") as INTERNAL: whether the shard applied the push is unknown, and only a retry
# with the same (worker_id, seq) settles it exactly once. Given up on, the worker would take its
# slot again and redo the step, applying that push twice where the first attempt had landed.
RETRYABLE_UNDER_DEADLINE = RETRYABLE + (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL)

log = logging.getLogger("downpour.paramserver.client")


@dataclass
class RetryPolicy:
    """``deadline`` > 0: retry with backoff until then; else ``retries`` immediate retries."""

    retries: int = 3
    deadline: float = 0.0  # seconds
    backoff_initial: float = 0.1
    backoff_max: float = 2.0

    def under_deadline(self, op: str, where: str, call: Callable[[], T], closed: threading.Event) -> T:
        """``call()`` retried with exponential backoff until ``deadline`` (when set) or ``closed``."""
        if self.deadline <= 0:
            return call()
        give_up = time.monotonic() + self.deadline
        delay, cap = self.backoff_initial, self.backoff_max
        while True:
            try:
                return call()
            except grpc.RpcError as e:
                code = e.code()
                if code not in RETRYABLE_UNDER_DEADLINE or time.monotonic() + delay > give_up or closed.is_set():
                    raise
                metrics.PARAM_CLIENT_RETRIES.labels(op, code.name).inc()
                log.warning("%s on %s failed: %s; retrying in %.1fs", op, where, code.name, delay)
                if closed.wait(delay):
                    raise
                delay = min(cap, delay * 2)

    def at_once(self, call: Callable[[], T]) -> T:
        """``call()`` retried up to ``retries`` times, at once, on UNAVAILABLE or DEADLINE_EXCEEDED."""
        for attempt in range(self.retries + 1):
            try:
                return call()
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or attempt == self.retries:
                    raise
        raise AssertionError("unreachable: the last attempt returns or raises")
