"""Which failed shard calls a worker tries again, and for how long (paramserver/retry.py)."""

from __future__ import annotations

import threading

import grpc
import pytest

from downpour.paramserver.retry import RetryPolicy


class Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._code.name


def flaky(*codes: grpc.StatusCode):
    """A call that fails with ``codes`` in turn, then answers how many times it was made."""
    calls = []

    def call() -> int:
        calls.append(1)
        if len(calls) <= len(codes):
            raise Failed(codes[len(calls) - 1])
        return len(calls)

    return call


FAST = dict(deadline=5.0, backoff_initial=0.001, backoff_max=0.002)


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.NOT_FOUND,  # a restarted shard before its refill
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,  # a connection cut inside an HTTP/2 frame: outcome unknown
    ],
)
def test_a_worker_retries_what_may_succeed_on_another_try(code):
    assert RetryPolicy(**FAST).under_deadline("push", "shard 0", flaky(code, code), threading.Event()) == 3


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION]
)
def test_a_refusal_is_never_retried(code):
    call = flaky(code)
    with pytest.raises(Failed):
        RetryPolicy(**FAST).under_deadline("push", "shard 0", call, threading.Event())


def test_retries_stop_at_the_deadline_and_when_the_client_closes():
    forever = flaky(*([grpc.StatusCode.UNAVAILABLE] * 10_000))
    with pytest.raises(Failed):
        RetryPolicy(deadline=0.05, backoff_initial=0.01, backoff_max=0.01).under_deadline(
            "pull", "shard 0", forever, threading.Event()
        )
    closed = threading.Event()
    closed.set()
    with pytest.raises(Failed):
        RetryPolicy(**FAST).under_deadline("pull", "shard 0", flaky(grpc.StatusCode.UNAVAILABLE), closed)


def test_without_a_deadline_only_transport_failures_are_retried_at_once():
    assert RetryPolicy(retries=2).at_once(flaky(grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE)) == 3
    with pytest.raises(Failed):
        RetryPolicy(retries=2).at_once(flaky(grpc.StatusCode.INTERNAL))
