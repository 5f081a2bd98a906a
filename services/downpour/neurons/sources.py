"""Where the Neurons service gets its parameters.

* ``ShardSource``: the live parameter shards, pulled again every
  ``refresh_seconds`` in a background thread, so that neurons can be watched
  while the job trains. The version is the sum of the blocks' versions.
* ``CheckpointSource``: a checkpoint directory of committed checkpoints
  (``<dir>/<id>/MANIFEST.json`` naming each shard's file); the newest one is
  served and a newer one is picked up on the refresh interval.
* ``NpzSource``: named blocks in an .npz file (what ``downpour eval`` saves).
* ``RandomSource``: a seeded initialisation (demos and tests).

Every source yields a ``NeuronModel``; a job config (YAML) gives the network
spec and the normalisation the feeder used (a checkpoint carries its own).
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from downpour import checkpoint as checkpoints
from downpour import config as jobconfig
from downpour import metrics
from downpour.neurons.model import NeuronModel
from downpour.nn import Network
from downpour.nn.spec import NetworkSpec

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


class Source:
    """Holds the current model; ``refresh()`` replaces it when the parameters changed."""

    description = ""
    checkpoint_dir = ""

    def __init__(self, backend: str = "numpy") -> None:
        self.backend = backend  # "numpy" or "cupy": where the model computes
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

    def _set(self, model: NeuronModel) -> None:
        with self._lock:
            self._model = model
            self.refreshed_at = time.time()

    def refresh(self) -> bool:
        return False

    def checkpoint(self, checkpoint_id: str) -> NeuronModel:
        """The model of a named committed checkpoint in ``checkpoint_dir``."""
        if not self.checkpoint_dir:
            raise SourceError("this server has no checkpoint directory; start it with --checkpoint-dir")
        for m in list_manifests(self.checkpoint_dir):
            if m["checkpoint_id"] == checkpoint_id:
                cfg, blocks = load_checkpoint(self.checkpoint_dir, m)
                return NeuronModel(cfg.network_spec(), blocks, version=int(m["step"]), backend=self.backend)
        raise KeyError(f"no committed checkpoint {checkpoint_id!r} in {self.checkpoint_dir}")

    def close(self) -> None:
        pass


class StaticSource(Source):
    def __init__(self, spec: NetworkSpec, params: dict, description: str, normalize: str = "standardize",
                 data: str = "default", checkpoint_dir: str = "", backend: str = "numpy") -> None:
        super().__init__(backend)
        self.description, self.normalize, self.data = description, normalize, data
        self.checkpoint_dir = checkpoint_dir
        self._set(NeuronModel(spec, params, backend=backend))


def random_source(spec: NetworkSpec, seed: int, **kw) -> StaticSource:
    from downpour.nn import Network

    return StaticSource(spec, Network(spec).init_params(seed), f"random initialisation (seed {seed})", **kw)


def npz_source(path: str, spec: NetworkSpec, **kw) -> StaticSource:
    with np.load(path, allow_pickle=False) as z:
        params = {k: z[k] for k in z.files}
    return StaticSource(spec, params, f"parameters file {path}", **kw)


class CheckpointSource(Source):
    def __init__(self, checkpoint_dir: str, backend: str = "numpy") -> None:
        super().__init__(backend)
        self.checkpoint_dir = checkpoint_dir
        self.description = f"checkpoints in {checkpoint_dir}"
        if not self.refresh():
            raise SourceError(f"no committed checkpoint (no {MANIFEST}) under {checkpoint_dir}")

    def refresh(self) -> bool:
        m = checkpoints.newest_valid(self.checkpoint_dir)  # past a corrupt or partial newest one
        if m is None or m["checkpoint_id"] == self.checkpoint_id:
            return False
        cfg, blocks = load_checkpoint(self.checkpoint_dir, m)
        self._set(NeuronModel(cfg.network_spec(), blocks, version=int(m["step"]), backend=self.backend))
        self.checkpoint_id, self.step = m["checkpoint_id"], int(m["step"])
        self.normalize, self.data = cfg.normalize, cfg.data
        self.description = f"checkpoint {self.checkpoint_id} (step {self.step}) in {self.checkpoint_dir}"
        log.info("serving %s", self.description)
        return True


class ShardSource(Source):
    def __init__(self, shards: list[str], cfg: jobconfig.JobConfig, checkpoint_dir: str = "",
                 channel_config=None, timeout: float = 60.0, backend: str = "numpy") -> None:
        from downpour.paramserver.client import ParamClient, balanced_placement

        super().__init__(backend)
        self.spec = cfg.network_spec()
        self.normalize, self.data = cfg.normalize, cfg.data
        self.checkpoint_dir = checkpoint_dir
        sizes, join = block_layout(cfg)
        # the coordinator places blocks the same way (size-balanced over the shards)
        self.client = ParamClient(shards, worker_id="neurons", placement=balanced_placement(sizes, len(shards)),
                                  channel_config=channel_config, timeout=timeout)
        # Queries read the encoders and the head only: the decoders (half the parameters) are never pulled.
        wanted = set(Network(self.spec).encoder_names())
        self.names = [n for n in sizes if n.split("[")[0] in wanted]
        rows, cols = cfg.grid()
        if rows * cols > 1:
            from downpour.partition import join_params, plan

            pl = plan(self.spec, rows, cols)
            self._join = lambda blocks: join_params(pl, blocks, partial=True)
        else:
            self._join = join
        self.description = "shards " + ",".join(shards)
        self._version = -1

    def refresh(self) -> bool:
        params = self.client.pull(self.names)
        version = int(sum(self.client.versions.get(n, 0) for n in self.names))
        if version == self._version and self._model is not None:
            self.refreshed_at = time.time()
            return False
        params = self._join(params)  # (a partitioned job's blocks: the pulled ones are dropped here)
        self._set(NeuronModel(self.spec, params, version=version, backend=self.backend))
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

    def start(self) -> "Refresher":
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
                    log.info("parameters refreshed from %s (version %d)", self.source.description,
                             self.source.model.version)
            except Exception as e:  # keep serving the last good parameters
                metrics.NEURONS_REFRESHES.labels("failed").inc()
                msg = e.details() if hasattr(e, "details") else str(e)
                (log.debug if failing else log.warning)(
                    "refresh from %s failed (serving the last parameters): %s", self.source.description, msg)
                failing = True

    def stop(self) -> None:
        self._stop.set()


def wait_for_first(source: Source, timeout: float) -> None:
    """Retry ``refresh()`` until the source has parameters (shards may still be starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            source.refresh()
            source.model
            return
        except Exception as e:
            if time.monotonic() > deadline:
                raise SourceError(f"no parameters from {source.description} after {timeout:.0f}s: {e}") from e
            time.sleep(0.5)


def job_config_from(path: str = "", preset: str = "") -> jobconfig.JobConfig:
    if path:
        return jobconfig.load(path, env={})
    return jobconfig.load(None, env={}, overrides={"preset": preset or "small"})


__all__ = ["Source", "StaticSource", "CheckpointSource", "ShardSource", "Refresher", "random_source",
           "npz_source", "load_checkpoint", "list_manifests", "job_config_from", "wait_for_first",
           "SourceError"]
