"""A trained network in this process: ``downpour.load(path)``, no services needed.

    import downpour
    net = downpour.load("runs/a")                    # a run folder, a checkpoint directory or folder,
                                                     # or an exported .safetensors / .npz file
    net.describe()                                   # layers and shapes, input, source, normalisation
    a = net.activations(["photo.jpg"], "stage3.pool")          # any size or mode: fitted to the input
    a = net.activations(batch_bhwc, "stage3.pool", neurons=[5, 17])
    top = net.top_inputs("stage3.pool", (2, 4, 4), dataset="heldout", k=9)
    h = net.activation_histogram("stage3.pool", (2, 4, 4), dataset="heldout")
    s = net.optimal_stimulus("stage3.pool", (2, 4, 4))         # unit-norm [H, W, C]

``downpour.client.NeuronsClient`` has the same methods with the same
arguments and results (``downpour.neurons.results``) against the remote
service: both are ``downpour.neurons.api.NeuronQueries``. The service itself
answers through a ``TrainedNetwork`` over its live parameters. The math is ``downpour.neurons.model`` on NumPy, or on CuPy
with ``backend="cupy"``. Images are turned into the model's input by
``downpour.neurons.images`` and normalised as the feeder normalised the
training data unless ``raw`` is set.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from downpour import export
from downpour.feeder import bundled, preprocess
from downpour.feeder.datasets import open_dataset
from downpour.feeder.preprocess import PreprocessSpec
from downpour.neurons import cancel, sources
from downpour.neurons import images as imagelib
from downpour.neurons.api import NeuronQueries, NeuronSpec, Probe, Scan, StimulusSettings
from downpour.neurons.images import png_bytes
from downpour.neurons.limits import NO_BUDGETS, Budgets
from downpour.neurons.model import NeuronModel, QueryError, Unit
from downpour.neurons.results import Activations, Histogram, LayerInfo, ModelInfo, Stimulus, TopInput
from downpour.nn import backend as nnbackend

MAX_K = 1000
MAX_STEPS = 5000
MAX_RESTARTS = 64
MAX_BINS = 1000
SCAN_BATCH = 512


class TrainedNetwork(NeuronQueries):
    """Questions about the units of a network whose parameters come from ``source``.

    ``allow_paths`` lets ``top_inputs`` scan any dataset path (in process: the
    user's own files); a service leaves it off and scans only named datasets.
    """

    def __init__(
        self,
        source: sources.Source,
        *,
        max_scan: int = 20000,
        datasets: dict[str, str] | None = None,
        allow_paths: bool = False,
        max_images: int = 0,
        budgets: Budgets = NO_BUDGETS,
        decode: imagelib.DecodeLimits = imagelib.DEFAULT_LIMITS,
    ) -> None:
        self.source = source
        self.max_scan, self.max_images = max_scan, max_images
        self.budgets, self.decode = budgets, decode
        self.extra_datasets = dict(datasets or {})
        self.allow_paths = allow_paths
        self._ds_cache: dict[tuple, Any] = {}
        self._ck_cache: dict[str, NeuronModel] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<TrainedNetwork {self.source.description}>"

    # -- parameters -----------------------------------------------------------------
    def model(self, checkpoint_id: str = "") -> NeuronModel:
        """The live (or only) model, or that of a named committed checkpoint (the last two are cached)."""
        if not checkpoint_id:
            return self.source.model
        with self._lock:
            m = self._ck_cache.get(checkpoint_id)
        if m is None:
            m = self.source.checkpoint(checkpoint_id)
            with self._lock:
                if len(self._ck_cache) >= 2:
                    self._ck_cache.pop(next(iter(self._ck_cache)))
                self._ck_cache[checkpoint_id] = m
        return m

    def describe(self, checkpoint_id: str = "") -> ModelInfo:
        model = self.model(checkpoint_id)
        c, h, w = model.spec.input
        return ModelInfo(
            layers=[LayerInfo(n, (s[0], s[1], s[2])) for n, s in model.layers.items()],
            input_shape=(h, w, c),
            source=self.source.description,
            parameters_version=model.version,
            checkpoint_id=checkpoint_id or self.source.checkpoint_id,
            step=self.source.step,
            normalize=self.source.normalize,
            datasets=[d for d in self.dataset_names() if d],
            max_images=self.max_images,
        )

    # -- activations ------------------------------------------------------------------
    def prepare(
        self,
        items: Iterable[np.ndarray],
        names: Sequence[str],
        *,
        raw: bool = False,
        resize: bool = True,
        checkpoint_id: str = "",
    ) -> np.ndarray:
        """(C, H, W) images in [0, 1] -> the model's normalised (B, C, H, W) input."""
        x = imagelib.to_input(items, self.model(checkpoint_id).spec.input, resize=resize, names=names)
        return x if raw else preprocess.normalize(x, self.source.normalize)

    def probe(self, probe: Probe) -> Activations:
        """The probe's images loaded, fitted and normalised, then shown to the model."""
        images, checkpoint_id = probe.images, probe.checkpoint_id
        if self.max_images and isinstance(images, (list, tuple)) and len(images) > self.max_images:
            raise QueryError(f"too many images: {len(images)}; at most {self.max_images} per request")
        _, h, w = self.model(checkpoint_id).spec.input
        items, names = imagelib.load(images, self.decode, (int(h), int(w)) if probe.resize else None)
        return self.activations_of(
            self.prepare(items, names, raw=probe.raw, resize=probe.resize, checkpoint_id=checkpoint_id),
            probe.layer,
            probe.neurons,
            checkpoint_id=checkpoint_id,
        )

    def activations_of(
        self, x: np.ndarray, layer: str, neurons: Sequence[NeuronSpec] | None = None, *, checkpoint_id: str = ""
    ) -> Activations:
        """Activations for an input already in the model's form (``prepare``)."""
        model = self.model(checkpoint_id)
        neurons = list(neurons or [])
        if neurons and all(isinstance(n, (tuple, list)) for n in neurons):
            units = [self.unit(model, layer, n) for n in neurons]
            return Activations(model.activations(x, units), [], (), model.version)
        if any(isinstance(n, (tuple, list)) for n in neurons):
            raise QueryError("neurons: use either flat ids or (map, y, x) triples, not both")
        shape = model.layer_shape(layer)
        n = int(np.prod(shape))
        ids = np.asarray(neurons, np.int64) if neurons else np.arange(n)
        bad = ids[(ids < 0) | (ids >= n)]
        if bad.size:
            raise QueryError(
                f"neuron id {int(bad[0])} is outside layer {layer!r} of {n} units "
                f"([maps={shape[0]}, height={shape[1]}, width={shape[2]}])"
            )
        acts = model.layer_activations(x, layer)[:, ids]
        return Activations(np.ascontiguousarray(acts, np.float32), [int(i) for i in ids], tuple(shape), model.version)

    @staticmethod
    def unit(model: NeuronModel, layer: str, neuron: NeuronSpec) -> Unit:
        if not layer:
            raise QueryError(f"a neuron needs a layer; layers: {', '.join(model.layers)}")
        if isinstance(neuron, (tuple, list)):
            if len(neuron) != 3:
                raise QueryError(f"a neuron is a flat id or (map, y, x), got {tuple(neuron)}")
            u = Unit(layer, *(int(v) for v in neuron))
            model.flat_index(u)
            return u
        return model.unit(layer, int(neuron))

    # -- datasets -----------------------------------------------------------------------
    def dataset_names(self) -> list[str]:
        return ["", *bundled.SPLITS, *self.extra_datasets]

    def dataset(self, name: str, model: NeuronModel):
        """A dataset preprocessed as the feeder gives it to this model."""
        if name in self.extra_datasets:
            uri = self.extra_datasets[name]
        elif name == "":
            uri = self.source.data
        elif name in bundled.SPLITS:
            uri = f"default:{name}"
        elif name.startswith("default:") and name.partition(":")[2] in bundled.SPLITS:
            uri = name
        elif self.allow_paths and os.path.exists(name):
            uri = name
        else:
            allowed = ", ".join(repr(n) for n in self.dataset_names())
            extra = " or a path" if self.allow_paths else ""
            raise QueryError(f"unknown dataset {name!r}; allowed: {allowed}{extra} (empty: the job's data)")
        spec = PreprocessSpec.for_input(model.spec.input, self.source.normalize)
        key = (uri, spec)
        with self._lock:
            ds = self._ds_cache.get(key)
        if ds is None:
            try:
                ds = open_dataset(uri, spec)
            except (OSError, ValueError) as e:
                raise QueryError(f"dataset {name or uri!r}: {e}") from None
            with self._lock:
                self._ds_cache[key] = ds
        return ds

    def scan_size(self, scan: Scan) -> int:
        """How many examples ``scan`` runs through the network: the dataset, ``max_examples``,
        ``max_scan`` and the budget (``OverBudget`` if an explicit ``max_examples`` is over it).
        Checked before any example is read."""
        model = self.model(scan.checkpoint_id)
        u = self.unit(model, scan.layer, scan.neuron)
        if not 1 <= scan.k <= MAX_K:
            raise QueryError(f"k={scan.k} is out of range; allowed: 1..{MAX_K}")
        if not 0 <= scan.bins <= MAX_BINS:
            raise QueryError(f"histogram_bins={scan.bins} is out of range; allowed: 0..{MAX_BINS}")
        if scan.max_examples < 0:
            raise QueryError(f"max_examples={scan.max_examples} must be >= 0 (0: all)")
        ds = self.dataset(scan.dataset, model)
        n = min(len(ds), scan.max_examples or len(ds), self.max_scan)
        return self.budgets.scan_examples(model.spec, u.layer, n, scan.max_examples)

    def _scan(self, model: NeuronModel, u: Unit, scan: Scan):
        ds = self.dataset(scan.dataset, model)
        n = self.scan_size(scan)
        acts, idx = [np.zeros(0, np.float32)], [np.zeros(0, np.int64)]
        for start in range(0, n, SCAN_BATCH):
            cancel.check()
            i = np.arange(start, min(n, start + SCAN_BATCH))
            x, _ = ds.get(i)
            acts.append(model.activations(x, [u])[:, 0])
            idx.append(i)
        return ds, n, np.concatenate(acts), np.concatenate(idx)

    def top_and_histogram(self, scan: Scan) -> tuple[list[TopInput], Histogram]:
        """One scan of ``scan.dataset``: the k best inputs and (with ``bins``) the histogram of the activations."""
        model = self.model(scan.checkpoint_id)
        u = self.unit(model, scan.layer, scan.neuron)
        k, bins = scan.k, scan.bins
        ds, n, a, idx = self._scan(model, u, scan)
        order = np.argsort(-a, kind="stable")[:k]
        out: list[TopInput] = []
        if len(order):
            xs, ys = ds.get(idx[order])
            for j, o in enumerate(order):
                out.append(
                    TopInput(
                        int(idx[o]),
                        float(a[o]),
                        int(ys[j]) if ys is not None else -1,
                        np.ascontiguousarray(np.moveaxis(xs[j], 0, -1)) if scan.images else None,
                        png_bytes(xs[j]) if scan.thumbnails else b"",
                    )
                )
        if bins and len(a):
            counts, edges = np.histogram(a.astype(np.float64), bins=bins)
        else:
            counts, edges = np.zeros(0, np.int64), np.zeros(0, np.float64)
        return out, Histogram(edges, counts.astype(np.int64), n, model.version)

    # -- optimal stimulus ------------------------------------------------------------------
    def stimulus(
        self, layer: str, neuron: NeuronSpec, settings: StimulusSettings, *, checkpoint_id: str = ""
    ) -> Stimulus:
        """The input of L2 norm ``settings.norm`` that excites the unit most (projected gradient ascent)."""
        model, u = self.check_stimulus(layer, neuron, settings, checkpoint_id=checkpoint_id)
        r = model.optimal_stimulus(u, settings)
        return Stimulus(
            np.ascontiguousarray(np.moveaxis(r["stimulus"], 0, -1)),
            r["activation"],
            r["random_mean"],
            r["random_max"],
            model.version,
            png_bytes(r["stimulus"]),
        )

    def check_stimulus(
        self, layer: str, neuron: NeuronSpec, settings: StimulusSettings, *, checkpoint_id: str = ""
    ) -> tuple[NeuronModel, Unit]:
        """The model and unit of a stimulus search, once its settings and cost are checked
        (QueryError, ``OverBudget``): before any work starts."""
        model = self.model(checkpoint_id)
        u = self.unit(model, layer, neuron)
        st = settings
        if not 1 <= st.steps <= MAX_STEPS:
            raise QueryError(f"steps={st.steps} is out of range; allowed: 1..{MAX_STEPS}")
        if not (np.isfinite(st.learning_rate) and st.learning_rate > 0):
            raise QueryError(f"learning_rate={st.learning_rate} must be a positive number")
        if not 1 <= st.restarts <= MAX_RESTARTS:
            raise QueryError(f"restarts={st.restarts} is out of range; allowed: 1..{MAX_RESTARTS}")
        if not (np.isfinite(st.norm) and st.norm > 0):
            raise QueryError(f"norm={st.norm} must be a positive number")
        if st.seed < 0:
            raise QueryError(f"seed={st.seed} must be >= 0")
        self.budgets.check_stimulus(model.spec, u.layer, st.steps, st.restarts)
        return model, u


# -- downpour.load ---------------------------------------------------------------------------


def load(path: str | os.PathLike, *, backend: str = "numpy") -> TrainedNetwork:
    """A trained network from a run folder (``runs/a``), a checkpoint directory (its newest valid
    checkpoint), one checkpoint folder, or a file written by ``downpour export`` (.safetensors, .npz).

    ``backend="cupy"`` computes on the GPU.
    """
    nnbackend.get(backend)  # fail early and clearly when CuPy is missing
    p = Path(path).expanduser()
    src: sources.Source
    if p.is_file():
        spec, params, meta = export.read(p)
        src = sources.StaticSource(
            spec,
            params,
            f"exported file {p}",
            normalize=meta.get("normalize", "standardize"),
            data=meta.get("data", "default"),
            backend=backend,
        )
        src.checkpoint_id, src.step = meta.get("checkpoint_id", ""), int(meta.get("step", 0))
        return TrainedNetwork(src, allow_paths=True)
    if not p.is_dir():
        raise FileNotFoundError(
            f"{path}: no such file or directory (give a run folder, a checkpoint directory "
            f"or an exported .safetensors / .npz file)"
        )
    ckdir, ck_id = export.checkpoint_dir_of(p)
    if ck_id:
        m = next((m for m in sources.list_manifests(ckdir) if m["checkpoint_id"] == ck_id), None)
        if m is None:
            raise ValueError(f"{path}: its {sources.MANIFEST} is not a readable committed checkpoint")
        cfg, params = sources.load_checkpoint(str(ckdir), m)
        src = sources.StaticSource(
            cfg.network_spec(),
            params,
            f"checkpoint {ck_id} (step {m['step']}) in {ckdir}",
            normalize=cfg.normalize,
            data=cfg.data,
            checkpoint_dir=str(ckdir),
            backend=backend,
        )
        src.checkpoint_id, src.step = ck_id, int(m["step"])
        return TrainedNetwork(src, allow_paths=True)
    try:
        src = sources.CheckpointSource(str(ckdir), backend=backend)
    except sources.SourceError as e:
        raise ValueError(f"{path}: {e}") from None
    return TrainedNetwork(src, allow_paths=True)


__all__ = ["TrainedNetwork", "load", "png_bytes", "MAX_K", "MAX_STEPS", "MAX_RESTARTS", "MAX_BINS"]
