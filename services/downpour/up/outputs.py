"""What a run leaves behind besides checkpoints and logs: metrics.json (and, through ``plot``,
loss.png), and the steady examples/s read back from that history by the benchmarks."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from downpour import config as jobconfig
from downpour.up.plot import plot_loss


def _finite_or_null(obj: Any) -> Any:
    """``obj`` with every NaN or infinity replaced by None: strict JSON has no NaN (a replica
    that has not reported yet has no loss)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def write_outputs(
    out: str, history: list[dict[str, Any]], cfg: jobconfig.JobConfig, shards: dict[str, Any] | None = None
) -> None:
    """metrics.json and loss.png from the progress seen while training."""
    summary: dict[str, Any] = {"config": cfg.to_dict(), "history": history, "shards": shards or {}}
    if history:
        last = history[-1]
        summary["final"] = {"step": last["step"], "replicas": last["replicas"]}
        rates = [h["examples_per_second"] for h in history if h["examples_per_second"] > 0]
        summary["examples_per_second_mean"] = sum(rates) / len(rates) if rates else 0.0
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(_finite_or_null(summary), f, indent=1, allow_nan=False)
    plot_loss(out, history, cfg)


def steady_rate(history: list[dict[str, Any]], steps: int, batch_size: int, skip: float = 0.2) -> float:
    """Examples/s over the steady part of a run: past ``skip`` of the steps, before the first replica ends."""

    def total(h: dict[str, Any]) -> int:
        return sum(r["step"] for r in h["replicas"])

    warm = [h for h in history if h["replicas"] and min(r["step"] for r in h["replicas"]) >= steps * skip]
    end = [h for h in warm if max(r["step"] for r in h["replicas"]) < steps] or warm
    if len(end) < 2 or end[-1]["time"] <= warm[0]["time"]:
        raise ValueError("the run was too short to measure a steady rate; give it more steps")
    return float((total(end[-1]) - total(warm[0])) * batch_size / (end[-1]["time"] - warm[0]["time"]))
