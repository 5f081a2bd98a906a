"""The parameter shards' own metrics, read from their Prometheus /metrics endpoints at the end
of a run (they go into metrics.json beside the training progress)."""

from __future__ import annotations

import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from downpour.up.children import Child


def scrape_shards(children: list[Child]) -> dict[str, list[dict[str, Any]]]:
    """The running parameter shards' downpour_paramserver_* samples, by child name."""
    out = {}
    for c in children:
        if c.role != "paramserver" or not c.alive():
            continue
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{c.metrics_port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            continue
        samples = []
        for fam in text_string_to_metric_families(text):
            if fam.name.startswith("downpour_paramserver"):
                samples += [{"name": sm.name, "labels": sm.labels, "value": sm.value} for sm in fam.samples]
        out[c.name] = samples
    return out
