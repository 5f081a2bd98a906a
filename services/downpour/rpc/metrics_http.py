"""The ``/metrics`` endpoint of a service: prometheus_client's handler, in plaintext or over HTTPS.

prometheus_client's own ``start_http_server`` wraps its listening socket in TLS, so every
handshake runs in its one accept loop: a client that connected and sent nothing held every later
scrape until it went away. Here each connection's handshake runs in that connection's own thread,
with a deadline (``HANDSHAKE_SECONDS``).
"""

from __future__ import annotations

import socket
import ssl
import threading
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.exposition import MetricsHandler

HANDSHAKE_SECONDS = 10.0  # a client that has not finished its TLS handshake by then is dropped


def tls_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext:
    """The server side of TLS with ``cert``/``key``; with ``client_ca``, a client certificate signed
    by it is required (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile=cert, keyfile=key)
    if client_ca:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _TLSServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET  # read by the bind
        super().__init__(address, MetricsHandler.factory(REGISTRY))
        self.context = context

    def finish_request(self, request: Any, client_address: Any) -> None:
        # in the connection's own thread (ThreadingMixIn): a slow or silent handshake holds only it
        request.settimeout(HANDSHAKE_SECONDS)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return  # no certificate, plaintext, or silent: shutdown_request closes the socket
        try:
            tls.settimeout(None)
            super().finish_request(tls, client_address)
        finally:
            tls.close()


def serve_metrics(host: str, port: int, context: ssl.SSLContext | None = None) -> None:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread; over HTTPS with ``context``.
    OSError when the port cannot be bound."""
    if context is None:
        start_http_server(port, addr=host)
        return
    httpd = _TLSServer((host, port), context)
    threading.Thread(target=httpd.serve_forever, name="metrics-https", daemon=True).start()
