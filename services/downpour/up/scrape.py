"""The parameter shards' own metrics, read from their Prometheus /metrics endpoints at the end
of a run (they go into metrics.json beside the training progress). Under ``--secure`` the
endpoints serve HTTPS and ask for a client certificate: the launcher presents its own."""

from __future__ import annotations

import ssl
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from downpour.rpc.channel import ChannelConfig
from downpour.up.children import Child


def fetch_metrics(port: int, chcfg: ChannelConfig | None = None, host: str = "127.0.0.1", timeout: float = 5) -> str:
    """The exposition text of ``host:port``/metrics: plain HTTP, or HTTPS when ``chcfg`` has a CA
    (with its certificate and key as the client's, for mutual TLS)."""
    if chcfg is None or not chcfg.ca:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as r:
            return str(r.read().decode())
    ctx = ssl.create_default_context(cafile=chcfg.ca)
    if chcfg.cert:
        ctx.load_cert_chain(chcfg.cert, chcfg.key or None)
    with urllib.request.urlopen(f"https://{host}:{port}/metrics", timeout=timeout, context=ctx) as r:
        return str(r.read().decode())


def scrape_shards(children: list[Child], chcfg: ChannelConfig | None = None) -> dict[str, list[dict[str, Any]]]:
    """The running parameter shards' downpour_paramserver_* samples, by child name."""
    out = {}
    for c in children:
        if c.role != "paramserver" or not c.alive():
            continue
        try:
            text = fetch_metrics(c.metrics_port, chcfg)
        except OSError:
            continue
        samples = []
        for fam in text_string_to_metric_families(text):
            if fam.name.startswith("downpour_paramserver"):
                samples += [{"name": sm.name, "labels": sm.labels, "value": sm.value} for sm in fam.samples]
        out[c.name] = samples
    return out
