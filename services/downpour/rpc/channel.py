"""Client channels with the same limits and security as the servers.

    ch = open_channel("127.0.0.1:7000", ChannelConfig(max_message_bytes=64 << 20))
    wait_ready(ch, timeout=10)

TLS when ``ca`` is given (mutual TLS with ``cert`` and ``key`` too); a bearer
token, if set, is sent as ``authorization`` metadata on every call.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from downpour.rpc.options import grpc_options


@dataclass
class ChannelConfig:
    max_message_bytes: int = 64 << 20
    ca: str = ""  # PEM CA of the servers; enables TLS
    cert: str = ""  # PEM client certificate chain (mutual TLS)
    key: str = ""
    token: str = ""
    server_name_override: str = ""  # for certificates issued to a name other than the address


class _TokenAuth(grpc.AuthMetadataPlugin):
    def __init__(self, token: str) -> None:
        self._md = (("authorization", f"Bearer {token}"),)

    def __call__(self, context: Any, callback: Any) -> None:
        callback(self._md, None)


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the token on plaintext channels (call credentials need TLS)."""

    def __init__(self, token: str) -> None:
        self._md = ("authorization", f"Bearer {token}")

    def _details(self, d: Any) -> Any:
        md = (*tuple(d.metadata or ()), self._md)
        return d._replace(metadata=md) if hasattr(d, "_replace") else _Details(d, md)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, d: Any, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.method, self.timeout, self.credentials = d.method, d.timeout, d.credentials
        self.wait_for_ready, self.compression = getattr(d, "wait_for_ready", None), getattr(d, "compression", None)
        self.metadata = metadata


def open_channel(address: str, config: ChannelConfig | None = None) -> grpc.Channel:
    c = config or ChannelConfig()
    options = grpc_options(c.max_message_bytes)
    if c.server_name_override:
        options.append(("grpc.ssl_target_name_override", c.server_name_override))
    if c.ca:
        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(c.ca).read_bytes(),
            private_key=Path(c.key).read_bytes() if c.key else None,
            certificate_chain=Path(c.cert).read_bytes() if c.cert else None,
        )
        if c.token:
            creds = grpc.composite_channel_credentials(creds, grpc.metadata_call_credentials(_TokenAuth(c.token)))
        return grpc.secure_channel(address, creds, options=options)
    ch = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(ch, _TokenInterceptor(c.token)) if c.token else ch


def wait_ready(
    channel: grpc.Channel, timeout: float = 30.0, service: str = "", alive: Callable[[], bool] | None = None
) -> None:
    """Block until the server's health check answers SERVING (TimeoutError otherwise).

    ``alive``, when given, is asked before every try: a server process that
    exited raises RuntimeError at once instead of waiting out the timeout.
    """
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError("the server process exited before it was SERVING")
        try:
            r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0, wait_for_ready=True)
            if r.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        except grpc.RpcError as e:
            last = f"{e.code().name}: {e.details()}"
        time.sleep(0.05)
    raise TimeoutError(f"server not SERVING after {timeout:.0f}s ({last})")


def add_channel_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags of a command that calls a service: its CA (TLS), a client certificate and key
    (mutual TLS) and its bearer token; ``channel_config_from_args`` reads them back."""
    ap.add_argument("--ca", default="", help="PEM CA of the service (TLS)")
    ap.add_argument("--cert", default="", help="PEM client certificate (mutual TLS)")
    ap.add_argument("--key", default="", help="PEM client key (mutual TLS)")
    ap.add_argument("--token-file", default="", help="file holding the service's bearer token")


MIN_TOKEN_CHARS = 16  # downpour up --secure and compose write 43 (secrets.token_urlsafe(32))


def read_token(path: str) -> str:
    """The bearer token in ``path``, refused when it is empty or short: an empty token file would
    otherwise turn authentication off without a word."""
    token = Path(path).read_text(encoding="utf-8").strip()
    if len(token) < MIN_TOKEN_CHARS:
        what = "empty" if not token else f"{len(token)} characters long"
        raise SystemExit(
            f"--token-file {path}: the token is {what}; a token needs at least {MIN_TOKEN_CHARS} characters "
            "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


def channel_config_from_args(args: argparse.Namespace) -> ChannelConfig:
    """The ChannelConfig of the flags ``add_channel_arguments`` added (the token read from its file)."""
    token = read_token(args.token_file) if args.token_file else ""
    return ChannelConfig(ca=args.ca, cert=args.cert, key=args.key, token=token)
