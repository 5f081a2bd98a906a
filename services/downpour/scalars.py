"""Named training scalars: what a worker reports beside its loss, and the views of them we show.

A step's objective returns ``info``, a dict of float scalars: per stage N
``stageN.reconstruction`` and ``stageN.sparsity`` (the two TICA terms),
``stageN.dead`` and ``stageN.dense`` (fractions of pooled units never or
almost always active), ``stageN.W1.norm_mean|norm_min|norm_max`` and
``stageN.W2.*`` (the effective encoder rows' and decoder columns' norms),
``stageN.W1.rms`` and ``stageN.W2.rms``; a supervised step ``accuracy``.

* ``Means`` (worker): running sums per key since the last report, one dict
  add per key and step; ``take`` gives the means and starts over.
* ``clean`` (coordinator): keys matching ``KEY`` with finite values, at most
  ``MAX_KEYS``; anything else is ignored.
* ``combine``: one replica's value from its partitions' (a model-parallel
  replica's tiles report their shares): the objective terms add up, norm
  minima and maxima take the min and max, the rest the mean.
* ``with_ratios`` adds the derived ``stageN.ratio`` (sparsity / reconstruction),
  ``by_stage`` groups keys per stage for tables and plots.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

KEY = re.compile(r"^stage\d+\.[A-Za-z0-9_.]+$|^accuracy$")
MAX_KEYS = 256
MAX_KEY_LENGTH = 64
STAGE = re.compile(r"^(stage\d+)\.(.+)$")
# The objective's terms, and the fractions of units, exported as downpour_objective_term.
TERMS = ("reconstruction", "sparsity", "ratio", "dead", "dense")
# stageN.W1.norm_mean -> (W1, mean); stageN.W2.rms -> (W2, rms): downpour_weight_norm.
NORM = re.compile(r"^(W\d+)\.(?:norm_(mean|min|max)|(rms))$")
_SUMMED = (".reconstruction", ".sparsity")  # a tile's share of the replica's term


def valid(key: str) -> bool:
    return len(key) <= MAX_KEY_LENGTH and KEY.match(key) is not None


def clean(scalars: Mapping[str, float], stages: int | None = None) -> dict[str, float]:
    """The scalars worth keeping: valid keys (of stages 1..``stages`` when given), finite values,
    at most ``MAX_KEYS`` (by key order)."""
    out: dict[str, float] = {}
    for k in sorted(scalars):
        if len(out) >= MAX_KEYS:
            break
        v = scalars[k]
        if not (valid(k) and isinstance(v, (int, float)) and math.isfinite(v)):
            continue
        if stages is not None and k.startswith("stage") and not 1 <= int(k[5 : k.index(".")]) <= stages:
            continue
        out[k] = float(v)
    return out


class Means:
    """Each scalar's mean over the steps since the last ``take`` (the loss's treatment, for the rest)."""

    __slots__ = ("_n", "_sum")

    def __init__(self) -> None:
        self._sum: dict[str, float] = {}
        self._n: dict[str, int] = {}

    def add(self, info: Mapping[str, Any] | None) -> None:
        """One step's scalars; a non-finite or non-scalar value is left out of its mean."""
        if not info:
            return
        s, n = self._sum, self._n
        for k, v in info.items():
            try:
                f = float(v)  # numpy and cupy scalars convert; an array or a string is skipped
            except (TypeError, ValueError):
                continue
            if math.isfinite(f):
                s[k] = s.get(k, 0.0) + f
                n[k] = n.get(k, 0) + 1

    def take(self) -> dict[str, float]:
        """The means since the last take, valid keys only (``clean``); starts over."""
        out = clean({k: v / self._n[k] for k, v in self._sum.items()})
        self._sum, self._n = {}, {}
        return out


def combine(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """One replica's scalars from its partitions' (one partition: a copy of its own)."""
    parts = [p for p in parts if p]
    if len(parts) == 1:
        return dict(parts[0])
    keys = sorted({k for p in parts for k in p})
    out: dict[str, float] = {}
    for k in keys:
        vals = [p[k] for p in parts if k in p]
        if k.endswith(_SUMMED):
            out[k] = sum(vals)
        elif k.endswith(".norm_min"):
            out[k] = min(vals)
        elif k.endswith(".norm_max"):
            out[k] = max(vals)
        else:
            out[k] = sum(vals) / len(vals)
    return out


def with_ratios(scalars: Mapping[str, float]) -> dict[str, float]:
    """``scalars`` and, for each stage with both terms, ``stageN.ratio`` = sparsity / reconstruction
    (a zero reconstruction gives no ratio)."""
    out = dict(scalars)
    for k, rec in scalars.items():
        if k.endswith(".reconstruction"):
            stage = k[: -len(".reconstruction")]
            sp = scalars.get(f"{stage}.sparsity")
            if sp is not None and rec > 0:
                out[f"{stage}.ratio"] = sp / rec
    return out


def by_stage(scalars: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """{"stage1": {"reconstruction": .., "W1.norm_mean": ..}, ...}, stages in numeric order."""
    out: dict[str, dict[str, float]] = {}
    for k, v in scalars.items():
        m = STAGE.match(k)
        if m:
            out.setdefault(m.group(1), {})[m.group(2)] = v
    return dict(sorted(out.items(), key=lambda kv: int(kv[0][5:])))


def gauges(scalars: Mapping[str, float]) -> tuple[list[tuple[str, str, float]], list[tuple[str, str, str, float]]]:
    """The Prometheus series of one replica's scalars: [(stage, term, value)] for the objective terms
    (``TERMS``, ratio derived) and [(stage, block, stat, value)] for the weight norms."""
    terms, norms = [], []
    for stage, d in by_stage(with_ratios(scalars)).items():
        for name, v in d.items():
            if name in TERMS:
                terms.append((stage, name, v))
                continue
            m = NORM.match(name)
            if m:
                norms.append((stage, m.group(1), m.group(2) or m.group(3), v))
    return terms, norms
