"""/metrics under TLS: HTTPS with the service's certificate, and a client certificate under mTLS.

``/metrics`` used to answer in plaintext, to anyone, even when the service's gRPC port took only
mutual TLS and a token.
"""

from __future__ import annotations

import ssl
import urllib.request

import pytest

pytest.importorskip("cryptography")

from downpour.rpc import certs
from downpour.rpc.channel import ChannelConfig
from downpour.up.scrape import fetch_metrics

pytestmark = pytest.mark.slow


@pytest.fixture
def pki(tmp_path):
    return certs.make_cluster_pki(tmp_path / "tls")


def _tls_flags(pki, mutual: bool) -> list[str]:
    flags = ["--tls-cert", pki["cert"], "--tls-key", pki["key"], "--token-file", pki["token_file"]]
    return [*flags, "--tls-client-ca", pki["ca"]] if mutual else flags


def test_under_mutual_tls_metrics_need_https_and_a_client_certificate(pki, procs):
    good = ChannelConfig(ca=pki["ca"], cert=pki["cert"], key=pki["key"], token=pki["token"])
    p = procs.serve("paramserver", *_tls_flags(pki, mutual=True), metrics=True, channel_config=good)
    with pytest.raises(OSError):  # plaintext: the TLS server drops it
        fetch_metrics(p.metrics_port)
    with pytest.raises(OSError):  # HTTPS without a client certificate: the handshake fails
        fetch_metrics(p.metrics_port, ChannelConfig(ca=pki["ca"]))
    assert "downpour_service_ready" in fetch_metrics(p.metrics_port, good)
    assert p.metric("downpour_service_ready") == 1  # the harness scrapes it the same way


def test_with_tls_alone_metrics_are_https_without_a_client_certificate(pki, procs):
    p = procs.serve(
        "paramserver",
        *_tls_flags(pki, mutual=False),
        metrics=True,
        channel_config=ChannelConfig(ca=pki["ca"], token=pki["token"]),
    )
    with pytest.raises(OSError):
        fetch_metrics(p.metrics_port)
    ctx = ssl.create_default_context(cafile=pki["ca"])
    with urllib.request.urlopen(f"https://127.0.0.1:{p.metrics_port}/metrics", timeout=5, context=ctx) as r:
        assert b"downpour_service_ready" in r.read()


def test_a_client_that_never_finishes_its_handshake_does_not_stall_metrics(pki, procs):
    """The TLS handshake of /metrics used to run in the HTTP server's one accept loop: a client that
    connected and sent nothing held every later scrape until it went away."""
    import socket

    good = ChannelConfig(ca=pki["ca"], cert=pki["cert"], key=pki["key"], token=pki["token"])
    p = procs.serve("paramserver", *_tls_flags(pki, mutual=True), metrics=True, channel_config=good)
    silent = [socket.create_connection(("127.0.0.1", p.metrics_port), timeout=5) for _ in range(3)]
    try:
        assert "downpour_service_ready" in fetch_metrics(p.metrics_port, good)
    finally:
        for s in silent:
            s.close()
