"""What a run leaves behind besides checkpoints and logs: metrics.json (and, through ``plot``,
loss.png; through ``filters``, filters.png), and the steady examples/s read back from that
history by the benchmarks."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from downpour import config as jobconfig
from downpour import scalars
from downpour.up.filters import write_filters
from downpour.up.plot import plot_loss

log = logging.getLogger("downpour.up")


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


def final_objective(history: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per stage, its named scalars (reconstruction, sparsity, ratio, dead, dense, the W1/W2 norm
    statistics) at the last row that has any, each the mean over the replicas that reported it."""
    for h in reversed(history):
        reps = [r.get("scalars") or {} for r in h["replicas"]]
        if any(reps):
            sums: dict[str, list[float]] = {}
            for r in reps:
                for k, v in r.items():
                    sums.setdefault(k, []).append(v)
            mean = scalars.with_ratios({k: sum(v) / len(v) for k, v in sums.items() if k != "accuracy"})
            order = {t: i for i, t in enumerate(scalars.TERMS)}
            return {
                stage: dict(sorted(d.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
                for stage, d in scalars.by_stage(mean).items()
            }
    return {}


def write_outputs(
    out: str,
    history: list[dict[str, Any]],
    cfg: jobconfig.JobConfig,
    shards: dict[str, Any] | None = None,
    checkpoint_dir: str | None = None,
) -> None:
    """metrics.json and loss.png from the progress seen while training; filters.png from the last
    checkpoint in ``checkpoint_dir`` (when given and there is one)."""
    summary: dict[str, Any] = {"config": cfg.to_dict(), "history": history, "shards": shards or {}}
    if history:
        last = history[-1]
        summary["final"] = {
            "step": last["step"],
            "replicas": last["replicas"],
            "ended_by": last.get("ended_by", ""),
            "end_step": last.get("end_step", 0),
            "training_seconds": last.get("training_seconds", 0.0),
        }
        summary["final_objective"] = final_objective(history)
        rates = [h["examples_per_second"] for h in history if h["examples_per_second"] > 0]
        summary["examples_per_second_mean"] = sum(rates) / len(rates) if rates else 0.0
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(_finite_or_null(summary), f, indent=1, allow_nan=False)
    plot_loss(out, history, cfg)
    if checkpoint_dir:
        try:
            write_filters(out, checkpoint_dir)
        except Exception as e:  # noqa: BLE001 - a picture must not fail a run whose training is done
            log.warning("filters.png not written: %s", e)


def steady_rate(history: list[dict[str, Any]], steps: int, batch_size: int, skip: float = 0.2) -> float:
    """Examples/s over the steady part of a run: past ``skip`` of the steps, before the first replica ends."""

    def total(h: dict[str, Any]) -> int:
        return sum(r["step"] for r in h["replicas"])

    warm = [h for h in history if h["replicas"] and min(r["step"] for r in h["replicas"]) >= steps * skip]
    end = [h for h in warm if max(r["step"] for r in h["replicas"]) < steps] or warm
    if len(end) < 2 or end[-1]["time"] <= warm[0]["time"]:
        raise ValueError("the run was too short to measure a steady rate; give it more steps")
    return float((total(end[-1]) - total(warm[0])) * batch_size / (end[-1]["time"] - warm[0]["time"]))
