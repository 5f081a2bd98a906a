"""The job configuration: one typed spec, from YAML, environment and flags.

Precedence, lowest first: the defaults below, a YAML file (``--config``),
environment variables ``DOWNPOUR_<FIELD>`` (``DOWNPOUR_REPLICAS=4``,
``DOWNPOUR_OPTIMIZER__LR=0.1`` for nested fields), then command-line flags.
Unknown keys and wrong types are rejected with the setting's name and what is
allowed, so a typo never silently trains the wrong job.

The model is a preset name, optionally replaced by a full ``model:`` mapping
(see ``downpour.nn.spec``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from downpour import optim
from downpour.nn import presets
from downpour.nn.spec import CONSTRAINTS, TRAINING, NetworkSpec, from_dict
from downpour.optim import OptimizerConfig

OPTIMIZERS = optim.KINDS
DEVICES = ("cpu", "gpu")
NORMALIZE = ("none", "standardize", "minmax")
SCHEDULES = ("pushpull", "overlap")
WIRE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class JobConfig:
    preset: str = "small"
    model: dict | None = None  # a full network spec; replaces the preset when given
    replicas: int = 2
    shards: int = 2
    partitions: str = "1x1"  # RxC spatial grid per replica
    steps: int = 300  # minibatch steps per replica
    # A wall-clock budget for training, in seconds (0: none): counted from the job's first reported
    # step (the cluster's start-up does not count), the job ends when it runs out as when every
    # replica reaches ``steps``, which stays the upper bound.
    max_seconds: float = 0.0
    batch_size: int = 32
    n_fetch: int = 1  # pull parameters every n_fetch steps
    n_push: int = 1  # push accumulated gradients every n_push steps
    # pushpull: each push returns the updated parameters (one round trip), so a replica never
    # computes without its own last update; overlap: Downpour's background fetch and push
    # (n_fetch applies), which hides transfers but computes on parameters a step or two old.
    schedule: str = "pushpull"
    # Workers and shards on one host move tensors through shared memory (gRPC for control only);
    # elsewhere, or with false, through gRPC.
    shared_memory: bool = True
    # How parameters and gradients travel through gRPC: float32, or bfloat16 / float16 for half
    # the bytes (the shards keep float32 master weights); shared memory is always float32.
    wire_dtype: str = "float32"
    # Replica 0 trains this many steps alone before the others join (DistBelief's warm start): the
    # first steps, while Adagrad's accumulators are small, are where staleness costs most.
    warm_start: int = 30
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: str = "default"
    # Feeder preprocessing beyond what the model fixes (channels and size come
    # from the model's input): normalize (none | standardize | minmax), crop.
    normalize: str = "standardize"
    supervised: bool = False
    # A checkpoint directory to start from instead of fresh values: every block of its newest
    # valid checkpoint that this model has under the same name (unsupervised stages under a
    # new supervised head); the rest start fresh.
    init_from: str = ""
    # Supervised jobs: the first head_only_steps steps of every replica train the softmax head
    # alone (the stages' gradients are zero), then every layer: fine-tuning's warm-up, so that a
    # fresh head's first, large gradients do not wash out stages taken from init_from.
    head_only_steps: int = 0
    checkpoint_every: int = 100  # steps of the slowest replica between checkpoints
    keep_checkpoints: int = 3
    lease_seconds: float = 6.0  # a worker silent this long loses its slot
    # A process that is alive but has not answered a health check for this long is hung: its
    # supervisor (downpour up, compose's healthcheck) kills and replaces it. Kubernetes' liveness
    # probes wait about a minute instead (deploy/k8s: a busy node's slow answer is not a hang).
    hang_seconds: float = 5.0
    seed: int = 0
    device: str = "cpu"
    # The TICA objective, over the preset's (or model's) own settings when not empty: every
    # stage's scale constraint (nn.constraint: free | unit_decoder | unit_encoder | tied_decoder)
    # and joint or layerwise training. Per-stage values (and per-stage lam) go in ``model:``.
    constraint: str = ""
    training: str = ""

    def network_spec(self) -> NetworkSpec:
        spec = from_dict(self.model) if self.model is not None else presets.get(self.preset)
        if self.constraint:
            spec = dataclasses.replace(
                spec, stages=tuple(dataclasses.replace(st, constraint=self.constraint) for st in spec.stages)
            )
        if self.training:
            spec = dataclasses.replace(spec, training=self.training)
        return spec

    def grid(self) -> tuple[int, int]:
        return parse_grid(self.partitions)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        d = self.to_dict()
        if d["model"] is None:
            d.pop("model")
        return yaml.safe_dump(d, sort_keys=False)


def parse_grid(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"partitions={text!r} must look like RxC with R, C >= 1, e.g. 2x2")
    return int(m.group(1)), int(m.group(2))


def _coerce(where: str, default: Any, value: Any, from_text: bool) -> Any:
    """Check (and, for environment strings, parse) one value against its default's type."""
    if from_text and isinstance(value, str) and not isinstance(default, str):
        value = yaml.safe_load(value)
    if isinstance(default, float) and isinstance(value, str):
        # YAML 1.1 reads "1e-7" (no dot) as a string; it is a number to anyone writing it
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise ValueError(f"{where} must be a string, got {value!r}")
        value = str(value)
    return value


def _apply(obj: Any, data: Mapping[str, Any], prefix: str, from_text: bool = False) -> None:
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise ValueError(f"unknown setting {where!r}; allowed: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ValueError(
                    f"{where} must be a mapping of {', '.join(f.name for f in dataclasses.fields(current))}"
                )
            _apply(current, value, where + ".", from_text)
        elif key == "model":
            if from_text and isinstance(value, str):
                value = yaml.safe_load(value)
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"{where} must be a mapping (a network spec), got {value!r}")
            setattr(obj, key, None if value is None else dict(value))
        else:
            setattr(obj, key, _coerce(where, current, value, from_text))


# DOWNPOUR_* variables that are not job settings: security and deployment
# knobs read elsewhere. Every other DOWNPOUR_* name must be a job setting.
NOT_JOB_SETTINGS = (
    "DOWNPOUR_CONFIG",
    "DOWNPOUR_JOB",
    "DOWNPOUR_TLS_",
    "DOWNPOUR_TOKEN",
    "DOWNPOUR_E2E",
    "DOWNPOUR_FASHION_MNIST",
    "DOWNPOUR_IMAGE",
    "DOWNPOUR_GPU_IMAGE",
    "DOWNPOUR_FUZZ_",
    "DOWNPOUR_CHAOS_",
    "DOWNPOUR_LAUNCHER_PID",
)


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith("DOWNPOUR_") or name.startswith(NOT_JOB_SETTINGS):
            continue
        path = name[len("DOWNPOUR_") :].lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def validate(cfg: JobConfig) -> None:
    if cfg.model is None and cfg.preset not in presets.names():
        raise ValueError(f"preset={cfg.preset!r} is unknown; allowed: {', '.join(presets.names())}")
    cfg.network_spec()  # raises with the offending model setting
    for name in (
        "replicas",
        "shards",
        "steps",
        "batch_size",
        "n_fetch",
        "n_push",
        "checkpoint_every",
        "keep_checkpoints",
    ):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be >= 1")
    if not (cfg.max_seconds >= 0 and math.isfinite(cfg.max_seconds)):
        raise ValueError(f"max_seconds={cfg.max_seconds} must be a finite number of seconds >= 0 (0: no time budget)")
    if cfg.warm_start < 0:
        raise ValueError(f"warm_start={cfg.warm_start} must be >= 0")
    if cfg.head_only_steps < 0:
        raise ValueError(f"head_only_steps={cfg.head_only_steps} must be >= 0")
    if cfg.head_only_steps and not cfg.supervised:
        raise ValueError(
            f"head_only_steps={cfg.head_only_steps} needs a supervised job (supervised: true): "
            "an unsupervised network has no head"
        )
    if cfg.lease_seconds <= 0:
        raise ValueError(f"lease_seconds={cfg.lease_seconds} must be > 0")
    if not cfg.hang_seconds > 0:
        raise ValueError(f"hang_seconds={cfg.hang_seconds} must be > 0")
    optim.check(cfg.optimizer)
    if not cfg.optimizer.eps > 0:  # a shard takes eps = 0 (exact arithmetic in tests); a job does not
        raise ValueError(f"optimizer.eps={cfg.optimizer.eps} must be > 0")
    if cfg.wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype={cfg.wire_dtype!r} is unknown; allowed: {', '.join(WIRE_DTYPES)}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"schedule={cfg.schedule!r} is unknown; allowed: {', '.join(SCHEDULES)}")
    if cfg.normalize not in NORMALIZE:
        raise ValueError(f"normalize={cfg.normalize!r} is unknown; allowed: {', '.join(NORMALIZE)}")
    if cfg.device not in DEVICES:
        raise ValueError(f"device={cfg.device!r} is unknown; allowed: {', '.join(DEVICES)}")
    parse_grid(cfg.partitions)
    if cfg.constraint and cfg.constraint not in CONSTRAINTS:
        raise ValueError(f"constraint={cfg.constraint!r} is unknown; allowed: {', '.join(CONSTRAINTS)}")
    if cfg.training and cfg.training not in TRAINING:
        raise ValueError(f"training={cfg.training!r} is unknown; allowed: {', '.join(TRAINING)}")
    if cfg.supervised and not cfg.network_spec().classes:
        raise ValueError("supervised=true needs a model with classes > 0")


def load(
    path: str | None = None, env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> JobConfig:
    """Defaults <- YAML file <- DOWNPOUR_* environment <- explicit overrides (flags)."""
    cfg = JobConfig()
    if path:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: a job config must be a YAML mapping")
        _apply(cfg, data, "")
    _apply(cfg, _env_overrides(os.environ if env is None else env), "", from_text=True)
    if overrides:
        _apply(cfg, {k: v for k, v in overrides.items() if v is not None}, "")
    validate(cfg)
    return cfg


def from_yaml(text: str) -> JobConfig:
    """A config from YAML text alone (what travels in JobSpec.spec_yaml)."""
    cfg = JobConfig()
    data = yaml.safe_load(text) or {}
    _apply(cfg, data, "")
    validate(cfg)
    return cfg
