"""filters.png: what stage 1 learned, read from a run's last checkpoint.

Stage 1's encoder W1 is (L, M, K): per output location (one in all when the
filter is tied, a convolution), M maps, each a row of K = field x field x C
weights in (kh, kw, C) order (``nn.filtering``). The figure shows up to 64
maps' rows as field x field patches (grey for one channel, RGB for three, the
channels' mean otherwise) at the location nearest the image centre (untied)
or of the single weight set (tied).

The rows are the effective weights the stage computes with
(``nn.constraint.encoder`` under the stage's ``constraint``: unit encoder
rows are normalised, the other constraints use the stored block as it is).
Each patch is then scaled by its own largest absolute weight, mid grey
being zero.
"""

from __future__ import annotations

import os

import numpy as np

from downpour import checkpoint as cks
from downpour.nn import constraint
from downpour.nn.spec import NetworkSpec, filter_out

MAX_MAPS = 64
COLUMNS = 8


def stage1_patches(spec: NetworkSpec, w1: np.ndarray, max_maps: int = MAX_MAPS) -> tuple[np.ndarray, str]:
    """((N, field, field, 1 or 3) patches in [0, 1], where they come from) for stage 1's W1 block."""
    st = spec.stages[0]
    f = st.filter
    if f is None:
        raise ValueError("stage 1 has no filter: no encoder weights to show")
    c, h, w = spec.input
    ho, wo = filter_out((h, w), f)
    locations = 1 if f.tied else ho * wo
    k = f.field * f.field * c
    w3 = constraint.encoder(st.constraint, np, np.asarray(w1, np.float64), (locations, f.maps, k)).w1
    if f.tied:
        where = "tied: one weight set"
        rows = w3[0]
    else:
        i, j = ho // 2, wo // 2
        where = f"location ({i}, {j}) of {ho} x {wo}"
        rows = w3[i * wo + j]
    rows = rows[:max_maps].reshape(-1, f.field, f.field, c)
    if c != 3:
        rows = rows.mean(axis=-1, keepdims=True)
    scale = np.abs(rows).reshape(len(rows), -1).max(axis=1)
    scale[scale == 0] = 1.0
    return 0.5 + 0.5 * rows / scale[:, None, None, None], where


def mosaic(patches: np.ndarray, columns: int = COLUMNS, gap: int = 1) -> np.ndarray:
    """(N, k, k, C) patches laid out in rows of ``columns``, ``gap`` pixels of white between them."""
    n, k, _, c = patches.shape
    cols = max(1, min(columns, n))
    rows = -(-n // cols)
    out = np.ones((rows * (k + gap) + gap, cols * (k + gap) + gap, c))
    for idx in range(n):
        r, q = divmod(idx, cols)
        y, x = gap + r * (k + gap), gap + q * (k + gap)
        out[y : y + k, x : x + k] = patches[idx]
    return out


def write_filters(out: str, checkpoint_dir: str) -> str | None:
    """Write ``<out>/filters.png`` from the newest valid checkpoint in ``checkpoint_dir``; returns its
    path, or None when there is no checkpoint or stage 1 has no filter."""
    m = cks.newest_valid(checkpoint_dir) if os.path.isdir(checkpoint_dir) else None
    if m is None:
        return None
    cfg, params = cks.load_params(checkpoint_dir, m)
    spec = cfg.network_spec()
    if spec.stages[0].filter is None or "stage1.W1" not in params:
        return None
    patches, where = stage1_patches(spec, params["stage1.W1"])
    import matplotlib  # noqa: PLC0415 - ~0.5 s to import: only a finished run draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after use("Agg"): no display is needed

    img = mosaic(patches)
    aspect = img.shape[0] / img.shape[1]
    fig, ax = plt.subplots(figsize=(6, 6 * aspect + 0.6), dpi=100)
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(
        f"stage 1 encoder filters: {len(patches)} of {spec.stages[0].filter.maps} maps, {where}\n"
        f"checkpoint {m.get('checkpoint_id', '?')} (step {m.get('step', '?')})",
        fontsize=8,
    )
    fig.tight_layout()
    path = os.path.join(out, "filters.png")
    fig.savefig(path)
    plt.close(fig)
    return path
