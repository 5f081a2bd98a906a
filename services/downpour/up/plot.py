"""loss.png: each replica's training loss against its step."""

from __future__ import annotations

import os
from typing import Any

from downpour import config as jobconfig


def plot_loss(out: str, history: list[dict[str, Any]], cfg: jobconfig.JobConfig) -> None:
    """Write ``<out>/loss.png`` from the progress seen while training."""
    try:
        import matplotlib  # noqa: PLC0415 - ~0.5 s to import: only a finished run plots

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415 - after use("Agg"): no display is needed
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for r in range(cfg.replicas):
        # loss == loss: NaN (a replica that has not reported yet) is left out
        pts = [
            (h["replicas"][r]["step"], h["replicas"][r]["loss"])
            for h in history
            if r < len(h["replicas"]) and h["replicas"][r]["loss"] == h["replicas"][r]["loss"]
        ]
        if pts:
            xs, ys = zip(*sorted(set(pts)))
            ax.plot(xs, ys, label=f"replica {r}")
    ax.set_xlabel("step (per replica)")
    ax.set_ylabel("training loss" + (" (TICA)" if not cfg.supervised else " (cross-entropy)"))
    ax.set_title(
        f"downpour: {cfg.preset if cfg.model is None else 'custom'}, {cfg.replicas} replicas, {cfg.shards} shards"
    )
    if ax.lines:  # no progress seen (a failed start): an empty plot, without a legend warning
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"))
    plt.close(fig)
