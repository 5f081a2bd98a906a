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
bearer-token interceptor (one shared token, or a token per role with the
rights of ``downpour.rpc.rights``), TLS or mutual TLS, message-size and concurrency
limits, and a Prometheus ``/metrics`` port (HTTPS with the service's certificate
when it serves TLS; a client certificate required under mutual TLS).
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import threading
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from downpour import metrics
from downpour.rpc import rights
from downpour.rpc.channel import ChannelConfig, read_token
from downpour.rpc.interceptors import (
    HEALTH_SERVICE,
    ClientNameInterceptor,
    ConnectionCapInterceptor,
    DecodeGuardInterceptor,
    MetricsInterceptor,
    TokenAuthInterceptor,
)
from downpour.rpc.metrics_http import serve_metrics, tls_context
from downpour.rpc.options import grpc_options

log = logging.getLogger("downpour.rpc")


# The security flags of every service: flag, the DOWNPOUR_* variable that gives its default, help.
_SECURITY_FLAGS = (
    (
        "--tls-cert",
        "DOWNPOUR_TLS_CERT",
        "PEM certificate chain (enables TLS; also this service's client certificate)",
    ),
    ("--tls-key", "DOWNPOUR_TLS_KEY", "PEM private key"),
    ("--tls-client-ca", "DOWNPOUR_TLS_CLIENT_CA", "PEM CA for client certificates (mutual TLS)"),
    (
        "--tls-ca",
        "DOWNPOUR_TLS_CA",
        "PEM CA of the servers this service calls (default: --tls-client-ca when TLS is on)",
    ),
    (
        "--tls-client-names",
        "DOWNPOUR_TLS_CLIENT_NAMES",
        "comma-separated client certificate names (CN or DNS SAN) let in under mTLS",
    ),
    (
        "--token-file",
        "DOWNPOUR_TOKEN_FILE",
        "file holding the bearer token this service sends (and, without --roles-file, the one clients must send)",
    ),
    (
        "--roles-file",
        "DOWNPOUR_ROLES_FILE",
        "file of '<role> <sha256 of its token>' lines: each client's token is a role, "
        "allowed what downpour.rpc.rights says",
    ),
)


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 0  # 0: pick a free port (see Server.port)
    metrics_port: int = 0  # 0: no /metrics endpoint
    max_message_bytes: int = 64 << 20
    max_concurrent_rpcs: int = 64
    max_streams_per_connection: int = 0  # calls one connection may have in the service (0: default)
    max_workers: int = 16
    tls_cert: str = ""  # PEM server certificate chain; with tls_key enables TLS
    tls_key: str = ""
    tls_client_ca: str = ""  # PEM CA; when set, clients must present a certificate (mTLS)
    token: str = ""  # this service's token; without roles, every RPC but Health/Check needs it
    roles: tuple[tuple[bytes, str], ...] = ()  # (sha256 of a token, its role): per-role rights
    grace_seconds: float = 10.0
    tls_ca: str = ""  # PEM CA that signed the *servers* this service calls (its client side)
    tls_client_names: tuple[str, ...] = ()  # mTLS: client certificate names (CN or DNS SAN) allowed in

    def channel_config(self) -> ChannelConfig:
        """How this service calls its peers: the same CA, certificate (as a client) and token."""
        ca = self.tls_ca or (self.tls_client_ca if self.tls_cert else "")
        return ChannelConfig(
            max_message_bytes=self.max_message_bytes,
            ca=ca,
            cert=self.tls_cert if ca else "",
            key=self.tls_key if ca else "",
            token=self.token,
        )

    @classmethod
    def add_arguments(cls, ap: Any, port: int) -> None:
        """Add the common flags to an argparse parser."""
        ap.add_argument("--host", default=cls.host, help="address to bind")
        ap.add_argument("--port", type=int, default=port, help="gRPC port (0: any free port)")
        ap.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: off)")
        ap.add_argument("--max-message-bytes", type=int, default=cls.max_message_bytes)
        ap.add_argument("--max-concurrent-rpcs", type=int, default=cls.max_concurrent_rpcs)
        ap.add_argument(
            "--max-streams-per-connection",
            type=int,
            default=0,
            help="calls one client connection may have in the service at once; one more is refused "
            "RESOURCE_EXHAUSTED; below --max-concurrent-rpcs, so one connection cannot take every slot "
            "(0: half of --max-concurrent-rpcs)",
        )
        # Security comes from flags or, for every service at once, from DOWNPOUR_* variables.
        for flag, variable, help_text in _SECURITY_FLAGS:
            ap.add_argument(flag, default=os.environ.get(variable, ""), help=help_text)
        ap.add_argument("--grace-seconds", type=float, default=cls.grace_seconds)

    @classmethod
    def from_args(cls, args: Any) -> ServerConfig:
        token = read_token(args.token_file) if args.token_file else ""
        return cls(
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            max_message_bytes=args.max_message_bytes,
            max_concurrent_rpcs=args.max_concurrent_rpcs,
            max_streams_per_connection=streams_per_connection(
                getattr(args, "max_streams_per_connection", 0), args.max_concurrent_rpcs
            ),
            max_workers=max(4, args.max_concurrent_rpcs),
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            token=token,
            roles=rights.read_roles_file(args.roles_file) if getattr(args, "roles_file", "") else (),
            grace_seconds=args.grace_seconds,
            tls_ca=getattr(args, "tls_ca", ""),
            tls_client_names=tuple(n.strip() for n in getattr(args, "tls_client_names", "").split(",") if n.strip()),
        )


def streams_per_connection(given: int, max_concurrent_rpcs: int) -> int:
    """The calls one connection may have in the service (``ConnectionCapInterceptor``): ``given``, or
    by default half of the server's concurrent-RPC slots; it must stay below them, or one connection
    could hold them all."""
    most = max(1, max_concurrent_rpcs - 1)
    if given == 0:
        return max(1, max_concurrent_rpcs // 2)
    if not 1 <= given <= most:
        raise SystemExit(
            f"--max-streams-per-connection {given}: must be between 1 and {most} "
            f"(below --max-concurrent-rpcs {max_concurrent_rpcs}, so that one connection cannot take every slot)"
        )
    return given


# -- the server -------------------------------------------------------------------


class Server:
    """A gRPC server with everything every downpour service needs."""

    def __init__(self, name: str, config: ServerConfig, interceptors: Iterable[grpc.ServerInterceptor] = ()) -> None:
        self.name = name
        self.config = config
        streams = config.max_streams_per_connection or streams_per_connection(0, config.max_concurrent_rpcs)
        # counted (Metrics first), after the token: a caller without one is refused before it holds anything
        chain: list[grpc.ServerInterceptor] = [MetricsInterceptor(), ConnectionCapInterceptor(streams)]
        if config.roles:  # per-role tokens: this service's own token is only what it sends
            chain.insert(0, TokenAuthInterceptor(roles=config.roles))
        elif config.token:  # one shared token with every right
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

    def _metrics_tls(self) -> ssl.SSLContext | None:
        """/metrics over HTTPS with the service's own certificate when it serves TLS, and with a
        client certificate signed by --tls-client-ca required when that is set (mutual TLS)."""
        c = self.config
        if not (c.tls_cert and c.tls_key):
            return None
        return tls_context(c.tls_cert, c.tls_key, c.tls_client_ca)

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
            try:
                # on the service's own address: --host 127.0.0.1 keeps /metrics off other machines too
                serve_metrics(self.config.host, self.config.metrics_port, self._metrics_tls())
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
