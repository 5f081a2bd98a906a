"""Where the Neurons service gets its parameters.

* ``ShardSource``: the live parameter shards. A query pulls the blocks of
  one stage at a time when it runs (``blocks.ShardBlocks``); every
  ``refresh_seconds`` a background thread asks the shards for the blocks'
  versions only, so that neurons can be watched while the job trains. The
  version is the sum of the blocks' versions.
* ``CheckpointSource``: a checkpoint directory of committed checkpoints
  (``<dir>/<id>/MANIFEST.json`` naming each shard's file); the newest one is
  served, read block by block from its files as queries need them, and a
  newer one is picked up on the refresh interval.
* ``NpzSource``: named blocks in an .npz file (what ``downpour eval`` saves).
* ``RandomSource``: a seeded initialisation (demos and tests).

Every source yields a ``NeuronModel`` over a ``Blocks`` store, and all the
models of one source share one ``Meter``: one query computes at a time and
holds one stage's blocks at a time. ``hold=True`` (``--hold-encoder``) is the
opt-in cache: the whole encoder and head are kept between queries and
replaced on refresh (faster queries, about half the model in memory). A job
config (YAML) gives the network spec and the normalisation the feeder used (a
checkpoint carries its own).
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from downpour import checkpoint as checkpoints
from downpour import config as jobconfig
from downpour import metrics
from downpour.neurons.blocks import Blocks, CheckpointBlocks, HeldBlocks, Meter, NpzBlocks, RandomBlocks, ShardBlocks
from downpour.neurons.model import NeuronModel
from downpour.nn import Network
from downpour.nn.spec import NetworkSpec
from downpour.paramserver.client import ParamClient, balanced_placement
from downpour.partition import PartitionPlan
from downpour.partition import plan as partition_plan

log = logging.getLogger("downpour.neurons")
MANIFEST = "MANIFEST.json"


class SourceError(RuntimeError):
    pass


# Committed checkpoints are read (and verified) in one place for every service.
list_manifests = checkpoints.list_manifests


# How a job's blocks are laid out on the shards (partitioned or not), in one place.
block_layout = checkpoints.block_layout


def load_checkpoint(checkpoint_dir: str, manifest: dict) -> tuple[jobconfig.JobConfig, dict[str, np.ndarray]]:
    """The job config and every block of one committed checkpoint (crc32s verified)."""
    try:
        return checkpoints.load_params(checkpoint_dir, manifest)
    except checkpoints.CheckpointInvalid as e:
        raise SourceError(str(e)) from None


def grid_of(cfg: jobconfig.JobConfig) -> PartitionPlan | None:
    """The partition grid a job's blocks are cut by (None: one block per parameter)."""
    rows, cols = cfg.grid()
    return partition_plan(cfg.network_spec(), rows, cols) if rows * cols > 1 else None


def checkpoint_blocks(checkpoint_dir: str, manifest: dict) -> tuple[jobconfig.JobConfig, CheckpointBlocks]:
    """The job config of a committed checkpoint and its blocks, read only when asked for."""
    try:
        cfg = jobconfig.from_yaml(manifest["config"])
        return cfg, CheckpointBlocks(checkpoint_dir, manifest, grid_of(cfg))
    except (checkpoints.CheckpointInvalid, OSError, KeyError, ValueError) as e:
        raise SourceError(f"checkpoint {manifest.get('checkpoint_id')}: {e}") from None


def held(model: NeuronModel) -> NeuronModel:
    """The same model with its whole encoder and head fetched and kept (``--hold-encoder``)."""
    return NeuronModel(model.spec, model.params, version=model.version, backend=model.net.xp, meter=model.meter)


class Source:
    """Holds the current model; ``refresh()`` replaces it when the parameters changed."""

    description = ""
    checkpoint_dir = ""

    def __init__(self, backend: str = "numpy", hold: bool = False) -> None:
        self.backend = backend  # "numpy" or "cupy": where the model computes
        self.hold = hold  # keep the whole encoder between queries (opt-in cache)
        self.meter = Meter()  # shared by every model of this source
        self._model: NeuronModel | None = None
        self.checkpoint_id = ""
        self.step = 0
        self.normalize = "standardize"
        self.data = "default"
        self.refreshed_at = 0.0
        self._lock = threading.Lock()

    @property
    def model(self) -> NeuronModel:
        if self._model is None:
            raise SourceError(f"no parameters loaded yet from {self.description}")
        return self._model

    def _new_model(self, spec: NetworkSpec, store: Blocks | dict, version: int = 0) -> NeuronModel:
        m = NeuronModel(spec, store, version=version, backend=self.backend, meter=self.meter)
        return held(m) if self.hold and not isinstance(m.store, HeldBlocks) else m

    def _set(self, model: NeuronModel) -> None:
        with self._lock:
            old, self._model = self._model, model
            self.refreshed_at = time.time()
        if old is not None and old is not model:
            old.let_go()  # a held copy is no longer counted (freed once no query uses it)

    def refresh(self) -> bool:
        return False

    def checkpoint(self, checkpoint_id: str) -> NeuronModel:
        """The model of a named committed checkpoint in ``checkpoint_dir`` (its blocks read when asked for)."""
        if not self.checkpoint_dir:
            raise SourceError("this server has no checkpoint directory; start it with --checkpoint-dir")
        for m in list_manifests(self.checkpoint_dir):
            if m["checkpoint_id"] == checkpoint_id:
                cfg, store = checkpoint_blocks(self.checkpoint_dir, m)
                return NeuronModel(cfg.network_spec(), store, backend=self.backend, meter=self.meter)
        raise KeyError(f"no committed checkpoint {checkpoint_id!r} in {self.checkpoint_dir}")

    def close(self) -> None:
        pass


class StaticSource(Source):
    def __init__(
        self,
        spec: NetworkSpec,
        params: Blocks | dict,
        description: str,
        normalize: str = "standardize",
        data: str = "default",
        checkpoint_dir: str = "",
        backend: str = "numpy",
        hold: bool = False,
    ) -> None:
        super().__init__(backend, hold)
        self.description, self.normalize, self.data = description, normalize, data
        self.checkpoint_dir = checkpoint_dir
        self._set(self._new_model(spec, params))


def random_source(spec: NetworkSpec, seed: int, **kw) -> StaticSource:
    """A seeded initialisation, drawn one stage at a time as queries need it."""
    return StaticSource(spec, RandomBlocks(spec, seed), f"random initialisation (seed {seed})", **kw)


def npz_source(path: str, spec: NetworkSpec, **kw) -> StaticSource:
    """Named blocks in an .npz file, read one stage at a time as queries need them."""
    src = StaticSource(spec, NpzBlocks(path), f"parameters file {path}", **kw)
    model = src.model
    for g in range(len(model.groups)):  # every block present and of its size, checked now, a stage at a time
        model._release(model._swap(g, None))
    return src


class CheckpointSource(Source):
    def __init__(self, checkpoint_dir: str, backend: str = "numpy", hold: bool = False) -> None:
        super().__init__(backend, hold)
        self.checkpoint_dir = checkpoint_dir
        self.description = f"checkpoints in {checkpoint_dir}"
        if not self.refresh():
            raise SourceError(f"no committed checkpoint (no {MANIFEST}) under {checkpoint_dir}")

    def refresh(self) -> bool:
        m = checkpoints.newest_valid(self.checkpoint_dir)  # past a corrupt or partial newest one
        if m is None or m["checkpoint_id"] == self.checkpoint_id:
            return False
        cfg, store = checkpoint_blocks(self.checkpoint_dir, m)
        self._set(self._new_model(cfg.network_spec(), store))
        self.checkpoint_id, self.step = m["checkpoint_id"], int(m["step"])
        self.normalize, self.data = cfg.normalize, cfg.data
        self.description = f"checkpoint {self.checkpoint_id} (step {self.step}) in {self.checkpoint_dir}"
        log.info("serving %s", self.description)
        return True


class ShardSource(Source):
    def __init__(
        self,
        shards: list[str],
        cfg: jobconfig.JobConfig,
        checkpoint_dir: str = "",
        channel_config=None,
        timeout: float = 60.0,
        backend: str = "numpy",
        hold: bool = False,
    ) -> None:
        super().__init__(backend, hold)
        self.spec = cfg.network_spec()
        self.normalize, self.data = cfg.normalize, cfg.data
        self.checkpoint_dir = checkpoint_dir
        sizes, _ = block_layout(cfg)
        # the coordinator places blocks the same way (size-balanced over the shards)
        self.client = ParamClient(
            shards,
            worker_id="neurons",
            placement=balanced_placement(sizes, len(shards)),
            channel_config=channel_config,
            timeout=timeout,
        )
        # Queries read the encoders and the head only: the decoders (half the parameters) are never pulled.
        wanted = set(Network(self.spec).encoder_names())
        self.names = [n for n in sizes if n.split("[")[0] in wanted]
        self.blocks = ShardBlocks(self.client, self.names, grid_of(cfg))
        self.description = "shards " + ",".join(shards)
        self._version = -1

    def refresh(self) -> bool:
        """Ask the shards for the blocks' versions (no values; with ``hold``, pull all when they changed)."""
        version = self.blocks.poll()
        if version == self._version and self._model is not None:
            self.refreshed_at = time.time()
            return False
        self._set(self._new_model(self.spec, self.blocks))
        self._version = version
        return True

    def close(self) -> None:
        self.client.close()


class Refresher:
    """Calls ``source.refresh()`` every ``interval`` seconds in a daemon thread; errors are logged."""

    def __init__(self, source: Source, interval: float) -> None:
        self.source, self.interval = source, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="neurons-refresh", daemon=True)

    def start(self) -> Refresher:
        if self.interval > 0:
            self._thread.start()
        return self

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.interval):
            try:
                changed = self.source.refresh()
                if failing:
                    log.info("refresh from %s works again", self.source.description)
                failing = False
                metrics.NEURONS_REFRESHES.labels("changed" if changed else "unchanged").inc()
                if changed:
                    metrics.NEURONS_PARAMETERS_VERSION.set(self.source.model.version)
                    log.info(
                        "parameters refreshed from %s (version %d)", self.source.description, self.source.model.version
                    )
            except Exception as e:  # noqa: BLE001 - keep serving the last good parameters, whatever went wrong
                metrics.NEURONS_REFRESHES.labels("failed").inc()
                msg = e.details() if hasattr(e, "details") else str(e)
                (log.debug if failing else log.warning)(
                    "refresh from %s failed (serving the last parameters): %s", self.source.description, msg
                )
                failing = True

    def stop(self) -> None:
        self._stop.set()


def wait_for_first(source: Source, timeout: float) -> None:
    """Retry ``refresh()`` until the source has parameters (shards may still be starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            source.refresh()
            _ = source.model  # raises SourceError until there are parameters
            return
        except Exception as e:
            if time.monotonic() > deadline:
                raise SourceError(f"no parameters from {source.description} after {timeout:.0f}s: {e}") from e
            time.sleep(0.5)


def job_config_from(path: str = "", preset: str = "") -> jobconfig.JobConfig:
    if path:
        return jobconfig.load(path, env={})
    return jobconfig.load(None, env={}, overrides={"preset": preset or "small"})


__all__ = [
    "Source",
    "StaticSource",
    "checkpoint_blocks",
    "grid_of",
    "held",
    "CheckpointSource",
    "ShardSource",
    "Refresher",
    "random_source",
    "npz_source",
    "load_checkpoint",
    "list_manifests",
    "job_config_from",
    "wait_for_first",
    "SourceError",
]
