"""The networks of ``downpour eval faces`` and how each is measured.

``Prep`` turns raw images into a network's input (the job's per-example
normalisation, then ZCA if asked); ``trainer`` trains a network in this
process or through a ``downpour up`` cluster; ``measure`` scores every neuron
of every network of one seed on the evaluation set (``neuronscore``), and
the template-matching baseline beside them; ``invariance`` follows one
neuron's response as the test faces are shifted, scaled and rotated.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from downpour.evals import common as C
from downpour.evals import facedata as D
from downpour.evals import neuronscore as S
from downpour.evals.jobs import train_job
from downpour.feeder import preprocess
from downpour.feeder.datasets import ArrayDataset
from downpour.neurons.model import NeuronModel
from downpour.neurons.sources import list_manifests, load_checkpoint
from downpour.nn import Network
from downpour.nn.spec import NetworkSpec

# (name, spec, examples, steps, seed) -> the trained parameters
Trainer = Callable[[str, NetworkSpec, np.ndarray, int, int], C.TrainResult]


def load_checkpoint_dir(checkpoint_dir: str):
    """(network spec, normalize, blocks, manifest) of the newest committed checkpoint."""
    found = list_manifests(checkpoint_dir)
    if not found:
        raise ValueError(f"--checkpoint {checkpoint_dir}: no committed checkpoint (no MANIFEST.json) there")
    m = found[-1]
    cfg, blocks = load_checkpoint(checkpoint_dir, m)
    return cfg.network_spec(), cfg.normalize, blocks, m


def transform(imgs: np.ndarray, *, shift=(0.0, 0.0), scale: float = 1.0, angle: float = 0.0) -> np.ndarray:
    """Shift (dy, dx pixels), scale and rotate (degrees) (N, C, H, W) images about their centre."""
    n, c, h, w = imgs.shape
    t = preprocess.similarity((h, w), scale, angle, (shift[1], shift[0]))
    out = np.empty_like(imgs)
    for i in range(n):
        for j in range(c):
            out[i, j] = preprocess.warp(imgs[i, j], t, mode="edge")
    return out


def invariance(model: NeuronModel, unit, faces_raw: np.ndarray, prep, threshold: float) -> dict:
    """Mean activation and fraction above threshold of the faces under each transformation."""
    h = faces_raw.shape[2]
    curves: dict[str, list[tuple[str, Any]]] = {
        "horizontal shift (pixels)": [("shift", (0.0, float(d))) for d in np.linspace(-h / 4, h / 4, 9)],
        "vertical shift (pixels)": [("shift", (float(d), 0.0)) for d in np.linspace(-h / 4, h / 4, 9)],
        "scale (factor)": [("scale", float(s)) for s in np.linspace(0.5, 1.5, 11)],
        "in-plane rotation (degrees)": [("angle", float(a)) for a in np.linspace(-90, 90, 13)],
    }
    out = {}
    for name, points in curves.items():
        xs, mean, frac = [], [], []
        for kind, v in points:
            a = model.activations(prep(transform(faces_raw, **{kind: v})), [unit])[:, 0]
            xs.append(v[0] + v[1] if kind == "shift" else v)
            mean.append(float(a.mean()))
            frac.append(float((a > threshold).mean()))
        out[name] = {"x": xs, "mean_activation": mean, "fraction_above_threshold": frac}
    return out


class Prep:
    """Raw [0, 1] images -> network input: per-example normalisation, then ZCA if fitted."""

    def __init__(self, normalize: str, whiten: str = "none", pool_raw: np.ndarray | None = None):
        self.normalize, self.whiten = normalize, whiten
        self.zca = None
        if whiten == "zca":
            if pool_raw is None:
                raise ValueError("--whiten zca is fitted on the pool: give pool_raw")
            self.zca = D.ZCA(preprocess.normalize(pool_raw, normalize))
        elif whiten != "none":
            raise ValueError(f"--whiten {whiten!r} is unknown; allowed: none, zca")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = preprocess.normalize(np.asarray(x, np.float32), self.normalize)
        return self.zca(x) if self.zca is not None else x


def trainer(up: bool, out: str, batch_size: int, lr: float, time_budget, log) -> Trainer:
    """How the eval trains a network: in this process, or through a ``downpour up`` cluster (``up``)."""

    def train(name: str, spec: NetworkSpec, x: np.ndarray, steps: int, seed: int) -> C.TrainResult:
        if up:
            # one replica: the in-process run's examples and steps, through the system
            return train_job(
                os.path.join(out, "runs", f"{name}-seed{seed}"),
                spec,
                x,
                steps=steps,
                replicas=1,
                shards=2,
                batch_size=batch_size,
                lr=lr,
                seed=seed,
                log=log,
            )
        return C.train(
            Network(spec),
            ArrayDataset(x),
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            time_budget=time_budget,
            log=log,
        )

    return train


def scores(acts: dict, y, val) -> dict:
    """Every measure's choice overall and restricted to each stage."""
    out = {"all": S.as_dict(S.choose_and_test(acts, y, val))}
    stages = sorted({k.split(".")[0] for k in acts if k.startswith("stage")})
    for s in stages:
        out[s] = S.as_dict(S.choose_and_test({k: v for k, v in acts.items() if k.startswith(s + ".")}, y, val))
    higher = {k: v for k, v in acts.items() if k.split(".")[0] in stages[1:]}
    if higher:
        out["higher"] = S.as_dict(S.choose_and_test(higher, y, val))
    return out


def measure(nets: dict, prep: Prep, x_pool: np.ndarray, ev: D.EvalSet) -> dict:
    """One seed's scores: every network's (``nets``: name -> (spec, params, prep)) best neurons
    overall and per stage, the trained network's best first-stage neuron, and the best
    training frame used as a linear template (``x_pool``, already prepared)."""
    res = {}
    for name, (sp, params, pr) in nets.items():
        res[name] = scores(C.activations(Network(sp), params, pr(ev.x)), ev.y, ev.val)
    res["first_stage"] = res["trained"]["stage1"]
    xe = prep(ev.x)
    templates = x_pool.reshape(len(x_pool), -1)
    res["linear"] = {
        "all": S.as_dict(
            S.choose_and_test({"template": (xe.reshape(len(xe), -1) @ templates.T).astype(np.float32)}, ev.y, ev.val)
        )
    }
    return res


def train_info(tr: C.TrainResult) -> dict:
    """What results.json says about one training."""
    return {
        "steps": tr.steps,
        "seconds": tr.seconds,
        "loss_first": tr.first_loss,
        "loss_last": tr.last_loss,
        "objective": tr.objective,  # per-stage terms, norms and units every OBJECTIVE_EVERY steps
    }
