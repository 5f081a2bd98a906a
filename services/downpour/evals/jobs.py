"""Training for the evaluations through the distributed system.

Each training is a ``downpour up`` cluster of local processes, as a user would
run it: parameter shards applying Adagrad, the data feeder, the coordinator and
model replicas running asynchronous Downpour SGD. The examples (already
preprocessed by the evaluation) go to the feeder as an .npz in the run folder,
served as they are (``normalize: none``); the result is the job's last
committed checkpoint. A fine-tuning job starts from an earlier job's
checkpoint through ``init_from``: the stages it shares with the pretrained
network come from there, its softmax head starts fresh.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import numpy as np

from downpour import checkpoint as cks
from downpour import config as jobconfig
from downpour.evals.common import DEFAULT_EPS, DEFAULT_LR, TrainResult
from downpour.nn.spec import NetworkSpec, to_dict
from downpour.up import run


def job_losses(run_dir: str) -> list[float]:
    """The mean training losses the replicas reported, in time order (from the run's metrics.json)."""
    with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
        history = json.load(f)["history"]
    seen, out = set(), []
    for h in history:
        for r, rep in enumerate(h["replicas"]):
            key = (r, rep["step"])
            if rep["step"] > 0 and not math.isnan(rep["loss"]) and key not in seen:
                seen.add(key)
                out.append(float(rep["loss"]))
    return out


def train_job(
    run_dir: str,
    spec: NetworkSpec,
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    steps: int,
    replicas: int = 2,
    shards: int = 2,
    batch_size: int = 32,
    lr: float = DEFAULT_LR,
    eps: float = DEFAULT_EPS,
    seed: int = 0,
    init_from: str = "",
    max_seconds: float = 0.0,
    settings: dict | None = None,
    log=None,
) -> TrainResult:
    """Train ``spec`` on ``x`` (TICA) or on ``x, y`` (supervised, ``spec.classes`` > 0) with a
    ``downpour up`` cluster; ``steps`` per replica, or fewer when ``max_seconds`` (> 0: a
    wall-clock training budget, as the job setting) runs out first; ``settings``: further job
    settings (e.g. ``head_only_steps``). Returns the last checkpoint's parameters, with its step
    (the job's step at its end, ``steps`` or where the budget stopped it)."""
    os.makedirs(run_dir, exist_ok=True)
    data = os.path.join(run_dir, "data.npz")
    arrays: dict[str, Any] = {"x": np.ascontiguousarray(x, np.float32)}
    if y is not None:
        arrays["y"] = np.asarray(y, np.int64)
    np.savez(data, **arrays)
    cfg = jobconfig.load(
        env={},
        overrides={
            "model": to_dict(spec),
            "supervised": y is not None,
            "data": data,
            "normalize": "none",
            "replicas": replicas,
            "shards": shards,
            "steps": steps,
            "max_seconds": max_seconds,
            "batch_size": batch_size,
            "seed": seed,
            "checkpoint_every": steps,
            "init_from": init_from or None,
            "optimizer": {"kind": "adagrad", "lr": lr, "eps": eps},
            **(settings or {}),
        },
    )
    if log is not None:
        log(
            f"  downpour up: {replicas} replicas x {steps} steps"
            + (f" or {max_seconds:g} s of training" if max_seconds else "")
            + f", {shards} shards"
            + (f", starting from {init_from}" if init_from else "")
            + f"; run folder {run_dir}"
        )
    t0 = time.perf_counter()
    code = run(cfg, run_dir, quiet=True, neurons=False)
    seconds = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"the training job in {run_dir} failed (exit code {code}); see {run_dir}/logs")
    ck_dir = os.path.join(run_dir, "checkpoints")
    manifest = cks.newest_valid(ck_dir)
    if manifest is None:
        raise RuntimeError(f"the training job in {run_dir} left no valid checkpoint")
    _, params = cks.load_params(ck_dir, manifest)
    losses = job_losses(run_dir)
    if log is not None and losses:
        log(f"  done in {seconds:.0f}s: loss {np.mean(losses[:3]):.4g} -> {np.mean(losses[-3:]):.4g}")
    return TrainResult(params, int(manifest["step"]), seconds, losses)
