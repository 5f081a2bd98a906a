"""Where a query's parameter blocks come from, one stage's worth at a time.

A ``NeuronModel`` never asks for the whole encoder: it asks a ``Blocks``
store for the blocks of one stage (``stage2.W1``; the head's ``head.W`` and
``head.b`` count as one more stage), runs that stage, and lets them go before
it asks for the next. The stores:

* ``HeldBlocks``: parameters already in memory (``downpour.load`` of an
  exported file, tests, and ``--hold-encoder``, the opt-in cache that keeps
  the whole encoder between queries as the service did before).
* ``RandomBlocks``: a seeded initialisation, drawn per parameter on request
  (``nn.init`` draws the same values whatever is asked at once).
* ``NpzBlocks``: named blocks in an .npz file, read member by member.
* ``CheckpointBlocks``: one committed checkpoint; only the asked blocks' bytes
  are read from the shard files (offsets from each file's header), crc32
  checked.
* ``ShardBlocks``: the live parameter shards, pulled at the time of asking.

A model-parallel job keeps one block per partition (``stage1.W1[p=3]``);
``ShardBlocks`` and ``CheckpointBlocks`` join the pieces of one parameter at a
time. ``Meter`` counts the bytes a source's models hold: its high-water mark
is the gauge ``downpour_neurons_param_bytes_peak``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np

from downpour import checkpoint as checkpoints
from downpour import metrics
from downpour.checkpoint import shardfile
from downpour.nn import Network
from downpour.nn import init as nninit
from downpour.nn.spec import NetworkSpec
from downpour.paramserver.client import ParamClient
from downpour.partition import PartitionPlan, join_params


class Meter:
    """Parameter bytes held now and at most, for every model of one source (one lock: one query
    computes at a time, so one stage is resident at a time)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # taken by a model for each whole query
        self.resident = 0
        self.peak = 0
        self._count = threading.Lock()  # the counters themselves (cheap, never held long)

    def hold(self, nbytes: int) -> None:
        with self._count:
            self.resident += int(nbytes)
            self.peak = max(self.peak, self.resident)
            metrics.NEURONS_PARAM_BYTES.set(self.resident)
            metrics.NEURONS_PARAM_BYTES_PEAK.set(self.peak)

    def drop(self, nbytes: int) -> None:
        with self._count:
            self.resident -= int(nbytes)
            metrics.NEURONS_PARAM_BYTES.set(self.resident)


def nbytes(params: Mapping[str, np.ndarray]) -> int:
    return int(sum(int(getattr(a, "nbytes", 0)) for a in params.values()))


class Blocks:
    """A store of named parameters (flat float32), read a few at a time."""

    # True when ``fetch`` returns new memory (counted while a model holds it); False when the
    # store keeps its arrays anyway (counted once, for as long as the store lives).
    copies = True

    @property
    def version(self) -> int:
        return 0

    def fetch(self, names: list[str], meter: Meter | None = None) -> dict[str, np.ndarray]:
        """The named parameters, whole (a partitioned job's pieces joined). Transient bytes
        (pieces being joined) are counted on ``meter`` while they exist."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class HeldBlocks(Blocks):
    copies = False

    def __init__(self, params: Mapping[str, np.ndarray], version: int = 0) -> None:
        self.params = dict(params)
        self._version = int(version)

    @property
    def version(self) -> int:
        return self._version

    def fetch(self, names: list[str], meter: Meter | None = None) -> dict[str, np.ndarray]:
        missing = [n for n in names if n not in self.params]
        if missing:
            raise KeyError(f"missing parameter block(s): {', '.join(missing)}")
        return {n: self.params[n] for n in names}


class RandomBlocks(Blocks):
    def __init__(self, spec: NetworkSpec, seed: int) -> None:
        self.layouts = nninit.layouts(Network(spec))
        self.seed = int(seed)

    def fetch(self, names: list[str], meter: Meter | None = None) -> dict[str, np.ndarray]:
        return {n: np.asarray(nninit.values(self.layouts[n], self.seed), np.float32).reshape(-1) for n in names}


class NpzBlocks(Blocks):
    def __init__(self, path: str) -> None:
        self.path = path
        with np.load(path, allow_pickle=False) as z:  # names only: members are read when asked for
            self.names = set(z.files)

    def fetch(self, names: list[str], meter: Meter | None = None) -> dict[str, np.ndarray]:
        missing = [n for n in names if n not in self.names]
        if missing:
            raise KeyError(f"missing parameter block(s) in {self.path}: {', '.join(missing)}")
        with np.load(self.path, allow_pickle=False) as z:
            return {n: np.asarray(z[n], np.float32).reshape(-1) for n in names}


class _Pieces(Blocks):
    """A store whose blocks may be a partitioned job's pieces: ``_read`` gets blocks as stored,
    ``fetch`` joins each parameter's pieces into the whole one, one parameter at a time."""

    def __init__(self, grid: PartitionPlan | None) -> None:
        self.grid = grid

    def _read(self, blocks: list[str]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def pieces(self, name: str) -> list[str]:
        pl = self.grid
        if pl is None or pl._tied(name):
            return [name]
        return [pl.block(name, p) for p in range(pl.partitions)]

    def fetch(self, names: list[str], meter: Meter | None = None) -> dict[str, np.ndarray]:
        if self.grid is None:
            return {n: a.reshape(-1) for n, a in self._read(names).items()}
        out = {}
        for n in names:
            parts = self._read(self.pieces(n))
            held = 2 * nbytes(parts)  # the pieces and the whole parameter exist together while joined
            if meter is not None:
                meter.hold(held)
            try:
                out[n] = join_params(self.grid, parts, partial=True)[n]
            finally:
                del parts
                if meter is not None:
                    meter.drop(held)
        return out


class CheckpointBlocks(_Pieces):
    """The blocks of one committed checkpoint, read from the shard files as they are asked for."""

    def __init__(self, checkpoint_dir: str, manifest: dict, grid: PartitionPlan | None) -> None:
        super().__init__(grid)
        self.checkpoint_dir, self.manifest = checkpoint_dir, manifest
        self.step = int(manifest.get("step", 0))
        # name -> (file, offset of its weights, values, crc32 of its weights), from the headers only
        self.index: dict[str, tuple[str, int, int, int]] = {}
        for part in manifest["shards"]:
            path = checkpoints.shard_file(checkpoint_dir, manifest, part)
            for name, (offset, crc, n) in shardfile.block_offsets(path).items():  # the header only
                self.index[name] = (str(path), offset, n, crc)

    @property
    def version(self) -> int:
        return self.step

    def _read(self, blocks: list[str]) -> dict[str, np.ndarray]:
        ck = self.manifest.get("checkpoint_id")
        out = {}
        for name in blocks:
            if name not in self.index:
                raise KeyError(f"checkpoint {ck} has no block {name!r}")
            path, pos, n, crc = self.index[name]
            w = shardfile.read_weights(path, pos, crc, n)
            if w is None:
                raise checkpoints.CheckpointInvalid(f"checkpoint {ck}: {path}: block {name!r} is truncated or corrupt")
            out[name] = w.astype(np.float32, copy=True)
        return out


class ShardBlocks(_Pieces):
    """The live blocks on the parameter shards, pulled when asked for."""

    def __init__(self, client: ParamClient, names: list[str], grid: PartitionPlan | None) -> None:
        super().__init__(grid)
        self.client = client
        self.names = names  # every block (piece) queries may read: the version is over these

    @property
    def version(self) -> int:
        return int(sum(self.client.versions.get(n, 0) for n in self.names))

    def poll(self) -> int:
        """Learn the blocks' versions from the shards without pulling a value; the new version."""
        wanted = set(self.names)
        for resp in self.client.list_blocks():
            for b in resp.blocks:
                if b.name in wanted:
                    self.client.versions[b.name] = int(b.version)
        return self.version

    def _read(self, blocks: list[str]) -> dict[str, np.ndarray]:
        return self.client.pull(blocks)

    def close(self) -> None:
        self.client.close()


__all__ = ["Meter", "Blocks", "HeldBlocks", "RandomBlocks", "NpzBlocks", "CheckpointBlocks", "ShardBlocks", "nbytes"]
