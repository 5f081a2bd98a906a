"""The networks and data of one fold of ``downpour eval faces``.

``Prep`` turns raw images into a network's input (the job's per-example
normalisation, then ZCA if asked); ``fold_data`` builds a fold's pool, its
no-objects control and both tests (selection and held-out sides);
``trainer`` trains a network for a wall-clock budget, through a
``downpour up`` cluster (2 replicas, 2 shards) or in this process;
``train_networks`` trains the fold's networks; ``fold_activations`` gives
every source's units (the networks, k-means, the autoencoder, the training
frames as linear templates) on every test image; ``invariance`` follows one
neuron's response as the test faces are shifted, scaled and rotated.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from downpour.evals import common as C
from downpour.evals import facedata as D
from downpour.evals import faceviews as V
from downpour.evals.facebaselines import AutoencoderFeatures, KMeansFeatures
from downpour.evals.jobs import train_job
from downpour.feeder import preprocess
from downpour.feeder.datasets import ArrayDataset
from downpour.neurons.model import NeuronModel
from downpour.neurons.sources import list_manifests, load_checkpoint
from downpour.nn import Network
from downpour.nn.spec import NetworkSpec

# (name, spec, examples, seed) -> the trained parameters
Trainer = Callable[[str, NetworkSpec, np.ndarray, int], C.TrainResult]


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


def trainer(up: bool, out: str, batch_size: int, lr: float, budget: float, steps: int, log) -> Trainer:
    """How the eval trains a network: ``budget`` seconds of training (at most ``steps`` per replica),
    through a ``downpour up`` cluster of 2 replicas and 2 shards (``up``) or in this process."""

    def train(name: str, spec: NetworkSpec, x: np.ndarray, seed: int) -> C.TrainResult:
        if up:
            return train_job(
                os.path.join(out, "runs", name),
                spec,
                x,
                steps=steps,
                replicas=2,
                shards=2,
                batch_size=batch_size,
                lr=lr,
                seed=seed,
                max_seconds=budget,
                log=log,
            )
        return C.train(
            Network(spec),
            ArrayDataset(x),
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            time_budget=budget,
            log=log,
        )

    return train


@dataclass
class FoldData:
    """One fold's training pools and tests: ``tests[t]`` = (selection side, held-out side)."""

    pool: D.Pool
    control: D.Pool
    tests: dict[str, tuple[V.Labelled, V.Labelled]]
    identities: tuple[np.ndarray, np.ndarray]  # (training, held-out) positives

    def info(self, fold: int) -> dict:
        """What results.json says about this fold's data."""

        b_sel, b_held = self.tests["B"]
        a_sel, a_held = self.tests["A"]
        return {
            "fold": fold,
            "training_identities": [int(i) for i in self.identities[0]],
            "heldout_identities": [int(i) for i in self.identities[1]],
            "pool_frames": len(self.pool.x),
            "pool_object_frames": int(self.pool.has_face.sum()),
            "pool_object_fraction": self.pool.face_fraction,
            "control_frames": len(self.control.x),
            "test_B": {
                "selection": b_sel.sizes(),
                "heldout": b_held.sizes(),
                "notes": {"selection": _brief(b_sel.notes), "heldout": _brief(b_held.notes)},
            },
            "test_A": {"selection": a_sel.sizes(), "heldout": a_held.sizes()},
        }


def _brief(notes: dict) -> dict:
    """A test's notes without its per-crop boxes (results.json stays readable)."""
    return {k: v for k, v in notes.items() if not k.endswith("_boxes")}


def _ids(ids) -> np.ndarray:
    return np.zeros(0, np.int64) if ids is None else np.asarray(ids)


def fold_data(category, ids, neg_ids, size, c, per_face: int, per_nonface: int, seed: int) -> FoldData:
    """The pools (with and without the object) and both tests of one fold of identities."""
    (tr, ho), (trn, hon) = ids, (_ids(neg_ids[0]), _ids(neg_ids[1]))
    kw: dict[str, Any] = {"per_positive": per_face, "per_negative": per_nonface, "seed": D.POOL_SEED + seed}
    pool = V.fold_pool(category, tr, trn, size, c, **kw)
    control = V.fold_pool(category, tr, trn, size, c, with_positives=False, **kw)
    tests = {
        "B": (
            V.test_b(category, tr, trn, size, c, heldout=False, seed=seed),
            V.test_b(category, ho, hon, size, c, heldout=True, seed=seed),
        ),
        "A": (V.test_a(category, tr, trn, size, c, heldout=False), V.test_a(category, ho, hon, size, c, heldout=True)),
    }
    return FoldData(pool, control, tests, (np.asarray(tr), np.asarray(ho)))


def user_test(path: str, size, c) -> V.Labelled:
    """A user's aligned test folder (``faces/``, ``other/``) as test A's held-out side: each image
    its own cluster."""
    x, y, names = D.load_test_dir(path, size, c)
    group = np.where(y == 1, 0, 1)  # V.GROUPS_A: "aligned objects", "non-object photos"
    return V.Labelled(x, y, group, np.arange(len(y)), np.full(len(y), -1), V.GROUPS_A, {"source": path, "names": names})


def train_networks(train: Trainer, spec, data: FoldData, normalize: str, whiten: str, seed: int, ck_params, fold):
    """The fold's networks, name -> (spec, params, prep), and what results.json says of their training."""
    prep = Prep(normalize, whiten, data.pool.x)
    prep_c = Prep(normalize, whiten, data.control.x)
    xp = prep(data.pool.x)
    nets: dict[str, tuple[NetworkSpec, dict, Prep]] = {}
    info = {}
    nolcn = C.without_lcn(spec)
    todo = [("no_lcn", nolcn, xp, prep), ("no_faces", spec, prep_c(data.control.x), prep_c)]
    if ck_params is None:
        todo.insert(0, ("trained", spec, xp, prep))
    else:
        nets["trained"] = (spec, ck_params, prep)
    for name, sp, x, pr in todo:
        tr = train(f"{name}-fold{fold}", sp, x, seed)
        nets[name] = (sp, tr.params, pr)
        info[f"{name}/fold{fold}"] = train_info(tr)
    nets["random"] = (spec, Network(spec).init_params(seed), prep)
    return nets, info


def fold_activations(nets: dict, data: FoldData, baselines: dict, seed: int, log) -> dict:
    """acts[source][test] = (selection side, held-out side), each layer -> (images, units)."""
    acts: dict[str, dict] = {}

    def both(fn) -> dict:
        return {t: (fn(data.tests[t][0].x), fn(data.tests[t][1].x)) for t in data.tests}

    for name, (sp, params, pr) in nets.items():
        acts[name] = both(lambda x, sp=sp, params=params, pr=pr: C.activations(Network(sp), params, pr(x)))
    prep = nets["trained"][2]
    xp = prep(data.pool.x)
    templates = xp.reshape(len(xp), -1).T
    acts["linear"] = both(lambda x: {"template": (prep(x).reshape(len(x), -1) @ templates).astype(np.float32)})
    for name, cls in (("kmeans", KMeansFeatures), ("autoencoder", AutoencoderFeatures)):
        learner = cls(seed=seed, **baselines.get(name, {})).fit(xp)
        log(f"  {name}: {learner.info()}")
        acts[name] = both(lambda x, m=learner: m.activations(prep(x)))
    return acts


def train_info(tr: C.TrainResult) -> dict:
    """What results.json says about one training."""
    return {
        "steps": tr.steps,
        "seconds": tr.seconds,
        "loss_first": tr.first_loss,
        "loss_last": tr.last_loss,
        "objective": tr.objective,  # per-stage terms, norms and units every OBJECTIVE_EVERY steps
    }
