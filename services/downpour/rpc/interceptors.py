"""The server interceptors every downpour service runs, outermost first in ``Server``:

client certificate names (mTLS), the bearer token (and its role's rights), metrics (counted and timed the way
go-grpc-prometheus names them), the cap on one connection's calls and, innermost, a guard that
answers INVALID_ARGUMENT to request bytes that do not decode.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

from downpour import metrics
from downpour.rpc import rights

HEALTH_SERVICE = "grpc.health.v1.Health"
HEALTH_CHECK = f"/{HEALTH_SERVICE}/Check"  # the one method open without a token (probes)


def _split(method: str) -> tuple[str, str]:
    _, service, name = method.split("/") if method.count("/") == 2 else ("", "unknown", method)
    return service, name


def _rpc_type(h: grpc.RpcMethodHandler) -> str:
    if h.request_streaming and h.response_streaming:
        return "bidi_stream"
    if h.request_streaming:
        return "client_stream"
    if h.response_streaming:
        return "server_stream"
    return "unary"


def _rewrap(
    h: grpc.RpcMethodHandler, wrap: Callable[[Callable], Callable], request_deserializer: Callable | None = None
) -> grpc.RpcMethodHandler:
    kw = dict(
        request_deserializer=request_deserializer or h.request_deserializer, response_serializer=h.response_serializer
    )
    if h.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(h.unary_unary), **kw)
    if h.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap(h.unary_stream), **kw)
    if h.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap(h.stream_unary), **kw)
    assert h.stream_stream is not None  # a handler has exactly one of the four behaviours
    return grpc.stream_stream_rpc_method_handler(wrap(h.stream_stream), **kw)


def _code_of(context: grpc.ServicerContext, exc: BaseException | None) -> str:
    code = getattr(context, "code", lambda: None)()
    if code is None:
        code = grpc.StatusCode.UNKNOWN if exc is not None else grpc.StatusCode.OK
    if isinstance(code, grpc.StatusCode):
        return code.name
    return str(code)


class _Undecodable:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class DecodeGuardInterceptor(grpc.ServerInterceptor):
    """Bytes that are not a valid request message get INVALID_ARGUMENT.

    gRPC's own answer to a request it cannot deserialise is INTERNAL, which
    reads as a server bug; a malformed message is the client's.
    """

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer

        def guarded_decode(data: bytes) -> Any:
            try:
                return decode(data)
            except Exception as e:  # noqa: BLE001 - any decoding failure is the sender's
                return _Undecodable(e)

        def reject(context: grpc.ServicerContext, bad: _Undecodable) -> None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {bad.error}")

        def wrap(fn: Callable) -> Callable:
            if handler.request_streaming:

                def checked_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                    def it() -> Iterator[Any]:
                        for r in requests:
                            if isinstance(r, _Undecodable):
                                reject(context, r)
                            yield r

                    return fn(it(), context)

                return checked_stream

            def checked(request: Any, context: grpc.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    reject(context, request)
                return fn(request, context)

            return checked

        return _rewrap(handler, wrap, guarded_decode)


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every RPC the way go-grpc-prometheus names it."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split(handler_call_details.method)
        kind = _rpc_type(handler)
        labels = (service, method, kind)

        def done(context: grpc.ServicerContext, start: float, exc: BaseException | None) -> None:
            metrics.GRPC_SERVER_HANDLED.labels(*labels, _code_of(context, exc)).inc()
            metrics.GRPC_SERVER_HANDLING_SECONDS.labels(*labels).observe(time.perf_counter() - start)

        def wrap(fn: Callable) -> Callable:
            if handler.response_streaming:

                def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    metrics.GRPC_SERVER_STARTED.labels(*labels).inc()
                    start, exc = time.perf_counter(), None
                    try:
                        yield from fn(request, context)
                    except BaseException as e:
                        exc = e
                        raise
                    finally:
                        done(context, start, exc)

                return streaming

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                metrics.GRPC_SERVER_STARTED.labels(*labels).inc()
                start, exc = time.perf_counter(), None
                try:
                    return fn(request, context)
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    done(context, start, exc)

            return unary

        return _rewrap(handler, wrap)


def _refuse(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str, count: Callable[[], None]
) -> grpc.RpcMethodHandler:
    """A handler that counts (``count``) and answers ``code`` instead of running the RPC."""

    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        count()
        context.abort(code, message)

    return _rewrap(handler, lambda fn: refuse)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Rejects RPCs without ``authorization: Bearer <token>``. Only ``Health/Check`` is exempt, so
    that orchestrators' probes need no secret: ``Health/Watch`` is a stream that stays open, and
    open to anyone it would let a client without the token fill the server's concurrent-RPC slots.
    Every rejection is counted in ``downpour_grpc_unauthenticated_total``.

    With ``roles`` ((sha256 digest, role) pairs of a roles file) each token stands for a role, and
    a role may call only what ``downpour.rpc.rights`` allows it: another method is answered
    PERMISSION_DENIED and counted in ``downpour_grpc_permission_denied_total``. With one ``token``
    and no roles, that token may call everything."""

    def __init__(self, token: str = "", roles: Iterable[tuple[bytes, str]] = ()) -> None:
        self._roles = tuple(roles)
        if not token and not self._roles:
            raise ValueError("TokenAuthInterceptor needs a token or roles")
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method == HEALTH_CHECK:
            return continuation(handler_call_details)
        got, present = b"", False
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                got, present = (value.encode() if isinstance(value, str) else value), True
        if not self._roles:
            # compare_digest: the time taken must not reveal how much of the token matched.
            if hmac.compare_digest(got, self._expected):
                return continuation(handler_call_details)
            role = None
        else:
            bearer = got[len(b"Bearer ") :] if got.startswith(b"Bearer ") else b""
            role = rights.role_of(bearer.decode(errors="replace"), self._roles) if bearer else None
            if role is not None and rights.allowed(role, method):
                return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, name = _split(method)
        if role is not None:  # a valid token of a role the rights table does not let call this
            return _refuse(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"role {role!r} may not call {method}",
                metrics.GRPC_PERMISSION_DENIED.labels(service, name, role).inc,
            )
        reason = "bad_token" if present else "missing_token"
        return _refuse(
            handler,
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or invalid bearer token",
            metrics.GRPC_UNAUTHENTICATED.labels(service, name, reason).inc,
        )


class ClientNameInterceptor(grpc.ServerInterceptor):
    """Under mutual TLS, lets in only client certificates issued to one of ``names``.

    The TLS handshake already refused certificates that the client CA did not
    sign (the client sees UNAVAILABLE: there is no call to answer); this
    answers UNAUTHENTICATED, counted, to a validly signed certificate issued to
    a name that is not allowed (e.g. another cluster's, from a shared CA).
    """

    def __init__(self, names: Iterable[str]) -> None:
        self._names = {n.encode() for n in names}

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method == HEALTH_CHECK:
            return handler
        allowed, method = self._names, handler_call_details.method
        service, name = _split(method)

        def wrap(fn: Callable) -> Callable:
            def guarded(request: Any, context: grpc.ServicerContext) -> Any:
                auth = context.auth_context() or {}
                got = set(auth.get("x509_common_name", ())) | set(auth.get("x509_subject_alternative_name", ()))
                if not got & allowed:
                    metrics.GRPC_UNAUTHENTICATED.labels(service, name, "client_certificate").inc()
                    context.abort(
                        grpc.StatusCode.UNAUTHENTICATED, "client certificate is not issued to an allowed name"
                    )
                return fn(request, context)

            return guarded

        return _rewrap(handler, wrap)


class ConnectionCapInterceptor(grpc.ServerInterceptor):
    """At most ``cap`` calls of one client connection (``context.peer()``: its address and port)
    in the service at once; one more is answered RESOURCE_EXHAUSTED at once and counted.

    So that one connection holding open streams (Health/Watch, say) cannot take every one of
    ``--max-concurrent-rpcs``. HTTP/2's own ``max_concurrent_streams`` does not do this well:
    grpc-python's client sends calls over the advertised limit anyway, and the server refuses them
    as REFUSED_STREAM (UNAVAILABLE), sometimes below the limit too, since a stream stays counted
    for a moment after its call ended. Counting calls while their handler runs never refuses a
    client that has ``cap`` calls or fewer open. ``Health/Check`` (probes) is never refused."""

    def __init__(self, cap: int) -> None:
        if cap < 1:
            raise ValueError(f"the calls of one connection must be capped at 1 or more, not {cap}")
        self._cap, self._open, self._lock = cap, Counter[str](), threading.Lock()

    def _enter(self, peer: str) -> bool:
        with self._lock:
            if self._open[peer] >= self._cap:
                return False
            self._open[peer] += 1
            return True

    def _leave(self, peer: str) -> None:
        with self._lock:
            self._open[peer] -= 1
            if self._open[peer] <= 0:
                del self._open[peer]  # the table holds only connections with calls in the service

    def open_calls(self) -> int:
        with self._lock:
            return sum(self._open.values())

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method == HEALTH_CHECK:
            return handler
        service, method = _split(handler_call_details.method)

        def refuse(context: grpc.ServicerContext) -> None:
            metrics.GRPC_CONNECTION_CAPPED.labels(service, method).inc()
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this connection already has {self._cap} calls in the service (--max-streams-per-connection); "
                "wait for one to end or open another channel",
            )

        def wrap(fn: Callable) -> Callable:
            if handler.response_streaming:

                def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    peer = context.peer()
                    if not self._enter(peer):
                        refuse(context)
                    try:
                        yield from fn(request, context)
                    finally:
                        self._leave(peer)

                return streaming

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                peer = context.peer()
                if not self._enter(peer):
                    refuse(context)
                try:
                    return fn(request, context)
                finally:
                    self._leave(peer)

            return unary

        return _rewrap(handler, wrap)
