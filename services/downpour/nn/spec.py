"""The typed network spec: what a model is, checked before anything is built.

A spec is plain data (frozen dataclasses) so that it can travel inside a job
spec, be written to YAML and be compared. ``from_dict`` is strict: unknown
keys, wrong types and impossible geometry are rejected with a message naming
the setting and what is allowed. Shapes are (channels, height, width).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

POOL_KINDS = ("l2", "max", "avg")
# How the stages' TICA objectives train: ``joint`` differentiates their sum as one function
# (a stage's reconstruction error also reaches the stages below, through its input and its
# target); ``layerwise`` stops the gradient at each stage's input, so each stage learns
# from its own objective alone (greedy layer-wise training, run for every stage at once).
TRAINING = ("joint", "layerwise")
CONSTRAINTS = ("free", "unit_decoder", "unit_encoder", "tied_decoder")  # see nn.constraint


@dataclass(frozen=True)
class FilterSpec:
    """Local filtering: ``maps`` outputs per location over a ``field`` x ``field`` window."""

    maps: int = 8
    field: int = 18
    stride: int = 1
    tied: bool = False  # True: one weight set shared by all locations (a convolution)


@dataclass(frozen=True)
class PoolSpec:
    """Pooling per map over ``size`` x ``size`` neighbourhoods (L2 by default)."""

    size: int = 5
    stride: int = 1
    kind: str = "l2"
    eps: float = 1e-2  # L2 pooling: sqrt(eps + sum of squares), smooth at zero


@dataclass(frozen=True)
class LCNSpec:
    """Local contrast normalisation (Jarrett et al. 2009) over ``size`` x ``size`` x all maps."""

    size: int = 5
    sigma: float = 0.0  # Gaussian std in pixels; 0 picks size / 4
    eps: float = 1e-4  # floor on the divisor so that flat inputs stay finite


@dataclass(frozen=True)
class StageSpec:
    """One stage: filter -> pool -> LCN, each optional, plus its TICA weight."""

    filter: FilterSpec | None = field(default_factory=FilterSpec)
    pool: PoolSpec | None = field(default_factory=PoolSpec)
    lcn: LCNSpec | None = field(default_factory=LCNSpec)
    lam: float = 0.1  # TICA sparsity weight (Le et al. 2012 use 0.1)
    # What holds the encoder's and decoder's scale (``nn.constraint``): free (the paper's
    # equation as written, which admits (a W1, W2 / a)), unit_decoder, unit_encoder or
    # tied_decoder (W2 = W1^T, RICA's form: the default, chosen by the measurements in
    # docs/experiments.md).
    constraint: str = "tied_decoder"


@dataclass(frozen=True)
class NetworkSpec:
    """A whole network: input shape, stages, and an optional softmax head."""

    input: tuple[int, int, int] = (1, 32, 32)
    stages: tuple[StageSpec, ...] = (StageSpec(),)
    classes: int = 0  # > 0 adds a linear softmax head over the last stage
    training: str = (
        "layerwise"  # the TICA objective: layerwise or joint (see TRAINING; measured in docs/experiments.md)
    )

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# ---------------------------------------------------------------- geometry


def filter_out(hw: tuple[int, int], f: FilterSpec) -> tuple[int, int]:
    return ((hw[0] - f.field) // f.stride + 1, (hw[1] - f.field) // f.stride + 1)


def pool_out(hw: tuple[int, int], p: PoolSpec) -> tuple[int, int]:
    return ((hw[0] - p.size) // p.stride + 1, (hw[1] - p.size) // p.stride + 1)


def stage_shapes(spec: NetworkSpec) -> list[dict[str, tuple[int, int, int]]]:
    """Per stage: the (C, H, W) shape of its input, filter, pool and LCN outputs."""
    out = []
    c, h, w = spec.input
    for st in spec.stages:
        shapes = {"input": (c, h, w)}
        if st.filter is not None:
            h, w = filter_out((h, w), st.filter)
            c = st.filter.maps
            shapes["filter"] = (c, h, w)
        if st.pool is not None:
            h, w = pool_out((h, w), st.pool)
            shapes["pool"] = (c, h, w)
        if st.lcn is not None:
            shapes["lcn"] = (c, h, w)
        shapes["output"] = (c, h, w)
        out.append(shapes)
    return out


# ---------------------------------------------------------------- validation


def _check_int(where: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} must be an integer, got {type(value).__name__} {value!r}")
    if value < lo or (hi is not None and value > hi):
        allowed = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{where}={value} is out of range; allowed: {allowed}")


def _check_float(where: str, value: Any, lo: float, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, got {type(value).__name__} {value!r}")
    if value < lo or (strict and value == lo) or value != value:
        raise ValueError(f"{where}={value} is out of range; allowed: {'>' if strict else '>='} {lo}")


def validate(spec: NetworkSpec) -> None:
    """Raise ValueError naming the first impossible setting in ``spec``."""
    if not isinstance(spec.input, tuple) or len(spec.input) != 3:
        raise ValueError(f"input must be [channels, height, width], got {spec.input!r}")
    for name, v in zip(("channels", "height", "width"), spec.input):
        _check_int(f"input.{name}", v, 1)
    if not spec.stages:
        raise ValueError("stages must list at least one stage")
    _check_int("classes", spec.classes, 0)
    if spec.training not in TRAINING:
        raise ValueError(f"training={spec.training!r} is unknown; allowed: {', '.join(TRAINING)}")
    _, h, w = spec.input
    for i, st in enumerate(spec.stages, 1):
        at = f"stages[{i}]"
        if not isinstance(st, StageSpec):
            raise ValueError(f"{at} must be a stage, got {type(st).__name__}")
        _check_float(f"{at}.lam", st.lam, 0.0)
        if st.constraint not in CONSTRAINTS:
            raise ValueError(f"{at}.constraint={st.constraint!r} is unknown; allowed: {', '.join(CONSTRAINTS)}")
        if st.filter is not None:
            f = st.filter
            _check_int(f"{at}.filter.maps", f.maps, 1)
            _check_int(f"{at}.filter.field", f.field, 1, min(h, w))
            _check_int(f"{at}.filter.stride", f.stride, 1, f.field)
            if not isinstance(f.tied, bool):
                raise ValueError(f"{at}.filter.tied must be true or false, got {f.tied!r}")
            h, w = filter_out((h, w), f)
        if st.pool is not None:
            p = st.pool
            if p.kind not in POOL_KINDS:
                raise ValueError(f"{at}.pool.kind={p.kind!r} is unknown; allowed: {', '.join(POOL_KINDS)}")
            _check_int(f"{at}.pool.size", p.size, 1, min(h, w))
            _check_int(f"{at}.pool.stride", p.stride, 1, p.size)
            _check_float(f"{at}.pool.eps", p.eps, 0.0, strict=True)
            h, w = pool_out((h, w), p)
        if st.lcn is not None:
            n = st.lcn
            _check_int(f"{at}.lcn.size", n.size, 1)
            if n.size % 2 == 0:
                raise ValueError(f"{at}.lcn.size={n.size} must be odd (the window is centred); allowed: 1, 3, 5, ...")
            _check_float(f"{at}.lcn.sigma", n.sigma, 0.0)
            _check_float(f"{at}.lcn.eps", n.eps, 0.0, strict=True)
        if st.filter is None and st.pool is None and st.lcn is None:
            raise ValueError(f"{at} has no filter, pool or lcn; a stage must have at least one")


# ---------------------------------------------------------------- dict <-> spec


def _from_fields(cls, d: Any, where: str):
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping, got {type(d).__name__} {d!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(names)}")
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        default = getattr(cls(), f.name) if cls is not NetworkSpec else None
        if isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)  # YAML writes 1 for 1.0
        if isinstance(default, float) and not isinstance(v, float):
            raise ValueError(f"{where}.{f.name} must be a number, got {type(v).__name__} {v!r}")
        if isinstance(default, bool) and not isinstance(v, bool):
            raise ValueError(f"{where}.{f.name} must be true or false, got {v!r}")
        if isinstance(default, str) and not isinstance(v, str):
            raise ValueError(f"{where}.{f.name} must be a string, got {v!r}")
        kw[f.name] = v
    return kw


def from_dict(d: Any) -> NetworkSpec:
    """Build a NetworkSpec from plain data (parsed YAML/JSON), strictly."""
    kw = _from_fields(NetworkSpec, d, "model")
    if "input" in kw:
        inp = kw["input"]
        if not isinstance(inp, (list, tuple)) or len(inp) != 3:
            raise ValueError(f"model.input must be [channels, height, width], got {inp!r}")
        kw["input"] = tuple(inp)
    if "stages" in kw:
        stages = kw["stages"]
        if not isinstance(stages, (list, tuple)):
            raise ValueError(f"model.stages must be a list, got {type(stages).__name__}")
        built = []
        for i, sd in enumerate(stages, 1):
            at = f"model.stages[{i}]"
            skw = _from_fields(StageSpec, sd, at)
            for key, cls in (("filter", FilterSpec), ("pool", PoolSpec), ("lcn", LCNSpec)):
                if key in skw:
                    sub = _from_fields(cls, skw[key], f"{at}.{key}")
                    skw[key] = None if sub is None else cls(**sub)
            built.append(StageSpec(**skw))
        kw["stages"] = tuple(built)
    return NetworkSpec(**kw)


def to_dict(spec: NetworkSpec) -> dict[str, Any]:
    d = dataclasses.asdict(spec)
    d["input"] = list(spec.input)
    d["stages"] = list(d["stages"])
    return d
