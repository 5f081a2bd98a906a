"""PNG figures for the evaluation reports (matplotlib, no display needed)."""

from __future__ import annotations

import numpy as np


def _plt():
    # matplotlib is optional (only the eval reports draw); Agg must be chosen before pyplot loads
    import matplotlib  # noqa: PLC0415 - see above

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after use("Agg")

    return plt


def _show(img_chw: np.ndarray) -> tuple[np.ndarray, str | None]:
    a = np.asarray(img_chw, np.float64)
    lo, hi = a.min(), a.max()
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return (a[0], "gray") if a.shape[0] == 1 else (np.moveaxis(a[:3], 0, -1), None)


def image_grid(path: str, images: np.ndarray, labels: list[str], title: str, cols: int = 8, scale: float = 1.6) -> None:
    """(N, C, H, W) images, each min-max scaled, in a grid with a label under each."""
    plt = _plt()
    n = len(images)
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * scale * 0.9 + 0.4, rows * scale + 0.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, lab in zip(axes.ravel(), images, labels):
        a, cmap = _show(img)
        ax.imshow(a, cmap=cmap, interpolation="nearest")
        ax.set_title(lab, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curves(path: str, data: dict, threshold: float, title: str) -> None:
    """One panel per transformation: mean activation and the fraction above the face threshold."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(data), figsize=(4 * len(data), 3.2), squeeze=False)
    for ax, (name, d) in zip(axes[0], data.items()):
        ax.plot(d["x"], d["mean_activation"], "o-", label="mean activation")
        ax.axhline(threshold, color="grey", ls="--", lw=0.8, label="face threshold")
        ax.set_xlabel(name)
        ax2 = ax.twinx()
        ax2.plot(d["x"], d["fraction_above_threshold"], "s:", color="tab:red", label="fraction called face")
        ax2.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("activation")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table_png(path: str, rows: list[dict], caption: str) -> None:
    """The results table as a bar chart with the numbers written on it."""
    plt = _plt()
    names = [r["row"] for r in rows]
    acc = [100 * r["accuracy"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.4))
    ax.barh(range(len(rows)), acc, color=["grey"] + ["tab:blue"] * (len(rows) - 1))
    for i, a in enumerate(acc):
        ax.text(a + 0.5, i, f"{a:.1f}%", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 105)
    ax.set_xlabel("accuracy (%)")
    ax.set_title(caption, fontsize=7, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def label_curve(path: str, results: dict, caption: str) -> None:
    """``downpour eval supervised``: test accuracy against the number of labels, one line per row,
    the mean over seeds with the spread as error bars."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    by_row: dict[str, list[tuple[int, float, float]]] = {}
    for r in results["rows"]:
        by_row.setdefault(r["row"], []).append((r["labels"], 100 * r["mean"], 100 * r["spread"]))
    for name, pts in by_row.items():
        n, m, s = zip(*sorted(pts))
        ax.errorbar(n, m, yerr=s, marker="o", capsize=3, label=name, ls=":" if name.startswith("chance") else "-")
    ax.set_xscale("log")
    ax.set_xlabel("labeled training images")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(caption, fontsize=7, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
