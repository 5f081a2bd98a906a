"""loss.png: each replica's training loss against its step and, when the workers reported the
objective's scalars (``downpour.scalars``), two more panels of replica 0's: each stage's
sparsity/reconstruction ratio (log scale) and its encoder (W1) and decoder (W2) mean norms."""

from __future__ import annotations

import os
from typing import Any

from downpour import config as jobconfig

WIDTH, HEIGHT, PANEL_HEIGHT, DPI = 7, 4, 2.6, 100  # inches: the loss panel, and each panel below it


def series(history: list[dict[str, Any]], replica: int, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one replica's ``key`` (a field of its row, or one of its scalars) over the
    history: each step once, NaN and missing values left out."""
    pts = set()
    for h in history:
        if replica >= len(h["replicas"]):
            continue
        rep = h["replicas"][replica]
        v = rep.get(key, (rep.get("scalars") or {}).get(key))
        if isinstance(v, (int, float)) and v == v:  # v == v: NaN (no report yet) is left out
            pts.add((rep["step"], float(v)))
    if not pts:
        return [], []
    xs, ys = zip(*sorted(pts))
    return list(xs), list(ys)


def _stages(history: list[dict[str, Any]]) -> list[str]:
    names = {k.split(".", 1)[0] for h in history for r in h["replicas"][:1] for k in (r.get("scalars") or {})}
    return sorted((n for n in names if n.startswith("stage")), key=lambda n: int(n[5:]))


def plot_loss(out: str, history: list[dict[str, Any]], cfg: jobconfig.JobConfig) -> None:
    """Write ``<out>/loss.png`` from the progress seen while training."""
    try:
        import matplotlib  # noqa: PLC0415 - ~0.5 s to import: only a finished run plots

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415 - after use("Agg"): no display is needed
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return
    stages = _stages(history)
    extra = 2 if stages else 0
    fig, axes = plt.subplots(
        1 + extra,
        1,
        figsize=(WIDTH, HEIGHT + extra * PANEL_HEIGHT),
        dpi=DPI,
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": [HEIGHT] + [PANEL_HEIGHT] * extra},
    )
    ax = axes[0][0]
    for r in range(cfg.replicas):
        xs, ys = series(history, r, "loss")
        if xs:
            ax.plot(xs, ys, label=f"replica {r}")
    ax.set_ylabel("training loss" + (" (TICA)" if not cfg.supervised else " (cross-entropy)"))
    ax.set_title(
        f"downpour: {cfg.preset if cfg.model is None else 'custom'}, {cfg.replicas} replicas, {cfg.shards} shards"
    )
    if ax.lines:  # no progress seen (a failed start): an empty plot, without a legend warning
        ax.legend()
    if stages:
        _objective_panels(axes[1][0], axes[2][0], history, stages)
    for a in axes[:, 0]:
        a.grid(alpha=0.3)
    axes[-1][0].set_xlabel("step (per replica)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"))
    plt.close(fig)


def _objective_panels(ratio_ax: Any, norm_ax: Any, history: list[dict[str, Any]], stages: list[str]) -> None:
    """Replica 0's ratio per stage (log scale) and its W1 (solid) and W2 (dashed) mean norms."""
    colors = [f"C{i % 10}" for i in range(len(stages))]
    for st, c in zip(stages, colors):
        xs, ys = series(history, 0, f"{st}.ratio")
        pos = [(x, y) for x, y in zip(xs, ys) if y > 0]
        if pos:
            ratio_ax.plot(*zip(*pos), color=c, label=st)
        for block, style in (("W1", "-"), ("W2", "--")):
            xs, ys = series(history, 0, f"{st}.{block}.norm_mean")
            if xs:
                norm_ax.plot(xs, ys, style, color=c, label=f"{st} {block}")
    ratio_ax.set_ylabel("sparsity / reconstruction\n(replica 0)", fontsize=9)
    if ratio_ax.lines:
        ratio_ax.set_yscale("log")
        ratio_ax.legend(fontsize=7, ncol=min(4, len(stages)))
    norm_ax.set_ylabel("mean norm: W1 rows (-),\nW2 columns (--)", fontsize=9)
    if norm_ax.lines:
        norm_ax.legend(fontsize=7, ncol=min(4, 2 * len(stages)))
