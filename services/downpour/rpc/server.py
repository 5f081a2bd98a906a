"""The one server skeleton of every downpour service.

    cfg = ServerConfig(port=7000, metrics_port=9100)
    srv = Server("paramserver", cfg)
    srv.add(lambda s: my_pb2_grpc.add_MyServicer_to_server(servicer, s), "downpour.v1.My")
    srv.start()          # health NOT_SERVING, reflection, /metrics, SIGTERM
    ...load state...
    srv.set_serving()    # health SERVING: probes and clients may come in
    srv.wait()           # until SIGTERM/SIGINT, then a graceful stop

Provides: grpc.health.v1 (NOT_SERVING until the service says it is ready,
NOT_SERVING again while draining), server reflection, a metrics interceptor
(``grpc_server_handled_total``, ``grpc_server_handling_seconds``), an optional
bearer-token interceptor, TLS or mutual TLS, message-size and concurrency
limits, and a Prometheus ``/metrics`` port.
"""

from __future__ import annotations

import hmac
import logging
import os
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from downpour import metrics

log = logging.getLogger("downpour.rpc")

HEALTH_SERVICE = "grpc.health.v1.Health"


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 0  # 0: pick a free port (see Server.port)
    metrics_port: int = 0  # 0: no /metrics endpoint
    max_message_bytes: int = 64 << 20
    max_concurrent_rpcs: int = 64
    max_workers: int = 16
    tls_cert: str = ""  # PEM server certificate chain; with tls_key enables TLS
    tls_key: str = ""
    tls_client_ca: str = ""  # PEM CA; when set, clients must present a certificate (mTLS)
    token: str = ""  # when set, every RPC but health needs "authorization: Bearer <token>"
    grace_seconds: float = 10.0
    tls_ca: str = ""  # PEM CA that signed the *servers* this service calls (its client side)
    tls_client_names: tuple[str, ...] = ()  # mTLS: client certificate names (CN or DNS SAN) allowed in

    def channel_config(self) -> "Any":
        """How this service calls its peers: the same CA, certificate (as a client) and token."""
        from downpour.rpc.channel import ChannelConfig

        ca = self.tls_ca or (self.tls_client_ca if self.tls_cert else "")
        return ChannelConfig(max_message_bytes=self.max_message_bytes, ca=ca,
                             cert=self.tls_cert if ca else "", key=self.tls_key if ca else "", token=self.token)

    @classmethod
    def add_arguments(cls, ap: Any, port: int) -> None:
        """Add the common flags to an argparse parser."""
        ap.add_argument("--host", default=cls.host, help="address to bind")
        ap.add_argument("--port", type=int, default=port, help="gRPC port (0: any free port)")
        ap.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: off)")
        ap.add_argument("--max-message-bytes", type=int, default=cls.max_message_bytes)
        ap.add_argument("--max-concurrent-rpcs", type=int, default=cls.max_concurrent_rpcs)
        # Security comes from flags or, for every service at once, from DOWNPOUR_* variables.
        env = os.environ.get
        ap.add_argument("--tls-cert", default=env("DOWNPOUR_TLS_CERT", ""),
                        help="PEM certificate chain (enables TLS; also this service's client certificate)")
        ap.add_argument("--tls-key", default=env("DOWNPOUR_TLS_KEY", ""), help="PEM private key")
        ap.add_argument("--tls-client-ca", default=env("DOWNPOUR_TLS_CLIENT_CA", ""),
                        help="PEM CA for client certificates (mutual TLS)")
        ap.add_argument("--tls-ca", default=env("DOWNPOUR_TLS_CA", ""),
                        help="PEM CA of the servers this service calls (default: --tls-client-ca when TLS is on)")
        ap.add_argument("--tls-client-names", default=env("DOWNPOUR_TLS_CLIENT_NAMES", ""),
                        help="comma-separated client certificate names (CN or DNS SAN) let in under mTLS")
        ap.add_argument("--token-file", default=env("DOWNPOUR_TOKEN_FILE", ""),
                        help="file holding the bearer token clients must send (and this service sends)")
        ap.add_argument("--grace-seconds", type=float, default=cls.grace_seconds)

    @classmethod
    def from_args(cls, args: Any) -> "ServerConfig":
        token = Path(args.token_file).read_text().strip() if args.token_file else ""
        return cls(
            host=args.host, port=args.port, metrics_port=args.metrics_port,
            max_message_bytes=args.max_message_bytes, max_concurrent_rpcs=args.max_concurrent_rpcs,
            max_workers=max(4, args.max_concurrent_rpcs), tls_cert=args.tls_cert, tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca, token=token, grace_seconds=args.grace_seconds,
            tls_ca=getattr(args, "tls_ca", ""),
            tls_client_names=tuple(n.strip() for n in getattr(args, "tls_client_names", "").split(",") if n.strip()),
        )


KEEPALIVE_MS = 5000
KEEPALIVE_TIMEOUT_MS = 5000


def grpc_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Channel/server options shared by both ends."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
        # A restarted peer (same address) is found again within a couple of
        # seconds, not after gRPC's default reconnect backoff of up to 120 s.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        # Keepalive: an HTTP/2 ping every KEEPALIVE_MS, answered within KEEPALIVE_TIMEOUT_MS or the
        # connection is closed and its calls fail UNAVAILABLE. A half-open connection (a peer that
        # is stopped, or a link that silently drops everything) is noticed in seconds, not when a
        # call's own deadline runs out. Both ends send and accept these pings, with or without calls.
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Accept the peer's pings at this rate (the default, 5 min, would answer ours with GOAWAY).
        ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
    ]


# -- interceptors ----------------------------------------------------------------

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


def _rewrap(h: grpc.RpcMethodHandler, wrap: Callable[[Callable], Callable],
            request_deserializer: Callable | None = None) -> grpc.RpcMethodHandler:
    kw = dict(request_deserializer=request_deserializer or h.request_deserializer,
              response_serializer=h.response_serializer)
    if h.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(h.unary_unary), **kw)
    if h.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap(h.unary_stream), **kw)
    if h.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap(h.stream_unary), **kw)
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

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
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

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
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


def _deny(handler: grpc.RpcMethodHandler, method: str, reason: str, message: str) -> grpc.RpcMethodHandler:
    """A handler that answers UNAUTHENTICATED (and counts it) instead of running the RPC."""
    service, name = _split(method)

    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        metrics.GRPC_UNAUTHENTICATED.labels(service, name, reason).inc()
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return _rewrap(handler, lambda fn: deny)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Rejects RPCs without ``authorization: Bearer <token>`` (health is exempt,
    so that orchestrators' probes need no secret). Every rejection is counted
    in ``downpour_grpc_unauthenticated_total``."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        if handler_call_details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return continuation(handler_call_details)
        got, present = b"", False
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                got, present = (value.encode() if isinstance(value, str) else value), True
        # compare_digest: the time taken must not reveal how much of the token matched.
        if hmac.compare_digest(got, self._expected):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        reason = "bad_token" if present else "missing_token"
        return _deny(handler, handler_call_details.method, reason, "missing or invalid bearer token")


class ClientNameInterceptor(grpc.ServerInterceptor):
    """Under mutual TLS, lets in only client certificates issued to one of ``names``.

    The TLS handshake already refused certificates that the client CA did not
    sign (the client sees UNAVAILABLE: there is no call to answer); this
    answers UNAUTHENTICATED, counted, to a validly signed certificate issued to
    a name that is not allowed (e.g. another cluster's, from a shared CA).
    """

    def __init__(self, names: Iterable[str]) -> None:
        self._names = {n.encode() for n in names}

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return handler
        allowed, method = self._names, handler_call_details.method
        service, name = _split(method)

        def wrap(fn: Callable) -> Callable:
            def guarded(request: Any, context: grpc.ServicerContext) -> Any:
                auth = context.auth_context() or {}
                got = set(auth.get("x509_common_name", ())) | set(auth.get("x509_subject_alternative_name", ()))
                if not got & allowed:
                    metrics.GRPC_UNAUTHENTICATED.labels(service, name, "client_certificate").inc()
                    context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                  "client certificate is not issued to an allowed name")
                return fn(request, context)
            return guarded

        return _rewrap(handler, wrap)


# -- the server -------------------------------------------------------------------

class Server:
    """A gRPC server with everything every downpour service needs."""

    def __init__(self, name: str, config: ServerConfig,
                 interceptors: Iterable[grpc.ServerInterceptor] = ()) -> None:
        self.name = name
        self.config = config
        chain: list[grpc.ServerInterceptor] = [MetricsInterceptor()]
        if config.token:
            chain.insert(0, TokenAuthInterceptor(config.token))
        if config.tls_client_names and config.tls_client_ca:
            chain.insert(0, ClientNameInterceptor(config.tls_client_names))
        chain.extend(interceptors)
        chain.append(DecodeGuardInterceptor())  # innermost: wraps the service's own deserialisers
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max(config.max_workers, 4), thread_name_prefix=name),
            interceptors=chain,
            options=grpc_options(config.max_message_bytes),
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        self._health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        self._service_names: list[str] = [HEALTH_SERVICE, reflection.SERVICE_NAME]
        self._stopped = threading.Event()
        self.port = 0

    @property
    def grpc_server(self) -> grpc.Server:
        return self._grpc

    def add(self, register: Callable[[grpc.Server], None], *service_names: str) -> None:
        """Register servicers: ``register(grpc_server)``; names are for health and reflection."""
        register(self._grpc)
        self._service_names.extend(service_names)

    def _credentials(self) -> grpc.ServerCredentials | None:
        c = self.config
        if not (c.tls_cert and c.tls_key):
            return None
        key, cert = Path(c.tls_key).read_bytes(), Path(c.tls_cert).read_bytes()
        ca = Path(c.tls_client_ca).read_bytes() if c.tls_client_ca else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    def start(self, install_signal_handlers: bool = True) -> int:
        """Bind, start serving (health NOT_SERVING) and return the bound port."""
        reflection.enable_server_reflection(self._service_names, self._grpc)
        self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        addr = f"{self.config.host}:{self.config.port}"
        creds = self._credentials()
        try:  # older grpcio returns 0 on a failed bind, newer raises
            self.port = self._grpc.add_secure_port(addr, creds) if creds else self._grpc.add_insecure_port(addr)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise RuntimeError(f"{self.name}: cannot bind {addr} (address already in use?)")
        self._grpc.start()
        if self.config.metrics_port:
            from prometheus_client import start_http_server
            try:
                start_http_server(self.config.metrics_port)
            except OSError as e:
                raise RuntimeError(f"{self.name}: cannot bind metrics port {self.config.metrics_port}: {e}") from None
        if install_signal_handlers and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        log.info("%s listening on %s:%d (tls=%s)", self.name, self.config.host, self.port, creds is not None)
        return self.port

    def _set_status(self, status: int) -> None:
        for svc in ["", *self._service_names]:
            self._health.set(svc, status)
        metrics.SERVICE_READY.labels(self.name).set(1 if status == health_pb2.HealthCheckResponse.SERVING else 0)

    def set_serving(self) -> None:
        self._set_status(health_pb2.HealthCheckResponse.SERVING)
        log.info("%s ready", self.name)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Handlers must return fast: do the draining on another thread.
        threading.Thread(target=self.stop, name="graceful-stop", daemon=True).start()

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight RPCs finish for ``grace`` seconds, stop."""
        if self._stopped.is_set():
            return
        log.info("%s stopping", self.name)
        self._health.enter_graceful_shutdown()
        metrics.SERVICE_READY.labels(self.name).set(0)
        self._grpc.stop(self.config.grace_seconds if grace is None else grace).wait()
        self._stopped.set()

    def wait(self) -> None:
        """Block until stopped (by SIGTERM/SIGINT or stop())."""
        while not self._stopped.wait(0.5):
            pass
