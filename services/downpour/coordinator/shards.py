"""The coordinator's view of the parameter shards: a small interface, and its gRPC implementation.

The checkpoint manager, the shard supervisor and the parameter initialiser
speak to shards only through ``Shards``, so each can be tested with a fake
that records calls and fails on demand. ``GrpcShards`` is the real one, over
a ``ParamClient``; it turns gRPC errors into types the callers choose by:
``ShardError`` (with ``disk_full`` when the shard ran out of space), and for a
restore ``CheckpointNotFound`` / ``CheckpointInvalid`` as the shard reported them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import grpc

from downpour.checkpoint.errors import CheckpointInvalid, CheckpointNotFound
from downpour.checkpoint.files import DISK_FULL
from downpour.paramserver.client import ParamClient
from downpour.v1 import common_pb2, paramserver_pb2, paramserver_pb2_grpc

T = TypeVar("T")


class ShardError(Exception):
    """A shard refused or did not answer a call: ``code`` names the status, ``details`` says why."""

    def __init__(self, code: str, details: str, disk_full: bool = False) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details
        self.disk_full = disk_full


def disk_full(e: BaseException) -> bool:
    """Whether a failed checkpoint failed for want of space (a shard's or our own write)."""
    if isinstance(e, ShardError):
        return e.disk_full
    return isinstance(e, OSError) and e.errno in DISK_FULL


class Shards(Protocol):
    """What the coordinator asks of the shards, by shard index."""

    addresses: list[str]

    def wait_ready(self, timeout: float) -> None: ...

    def set_optimizer(self, i: int) -> None:
        """Shard ``i`` applies the job's update rule (the job spec decides, not the shard's flags)."""

    def init_blocks(self, i: int, names: list[str], timeout: float) -> tuple[int, int]:
        """Shard ``i`` creates ``names`` with their initial values; (blocks made, taken from init_from)."""
        ...

    def checkpoint(self, checkpoint_id: str) -> list[dict]:
        """Every shard writes its part; per shard {shard, path, num_bytes, crc32, num_blocks}."""
        ...

    def restore_all(self, checkpoint_id: str) -> None: ...

    def restore(self, i: int, checkpoint_id: str) -> None:
        """Shard ``i`` loads its part; CheckpointNotFound / CheckpointInvalid when it cannot."""

    def blocks(self, i: int) -> set[str]:
        """The blocks shard ``i`` holds; ShardError when it does not answer."""
        ...


def _call(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except grpc.RpcError as e:
        code = e.code()
        raise ShardError(code.name, e.details() or "", code == grpc.StatusCode.RESOURCE_EXHAUSTED) from e


class GrpcShards:
    """``Shards`` over a ``ParamClient``: one stub call per method."""

    def __init__(self, client: ParamClient, optimizer: common_pb2.OptimizerSpec, job_yaml: str) -> None:
        self.client = client
        self.addresses = [s.address for s in client.shards]
        self.optimizer = optimizer
        self.job_yaml = job_yaml

    def _stub(self, i: int) -> Any:
        return paramserver_pb2_grpc.ParameterServerStub(self.client.shards[i].channel)

    def wait_ready(self, timeout: float) -> None:
        self.client.wait_ready(timeout)

    def set_optimizer(self, i: int) -> None:
        req = paramserver_pb2.SetOptimizerRequest(optimizer=self.optimizer)
        _call(lambda: self._stub(i).SetOptimizer(req, timeout=30))

    def init_blocks(self, i: int, names: list[str], timeout: float) -> tuple[int, int]:
        req = paramserver_pb2.InitBlocksRequest(job_yaml=self.job_yaml, names=names, overwrite=True)
        resp = _call(lambda: self._stub(i).InitBlocks(req, timeout=timeout))
        return len(resp.blocks), len(resp.from_checkpoint)

    def checkpoint(self, checkpoint_id: str) -> list[dict]:
        return [
            {"shard": i, "path": r.path, "num_bytes": r.num_bytes, "crc32": r.crc32, "num_blocks": r.num_blocks}
            for i, r in enumerate(_call(lambda: self.client.checkpoint(checkpoint_id)))
        ]

    def restore_all(self, checkpoint_id: str) -> None:
        _call(lambda: self.client.restore(checkpoint_id))

    def restore(self, i: int, checkpoint_id: str) -> None:
        req = paramserver_pb2.RestoreRequest(checkpoint_id=checkpoint_id)
        try:
            self.client.shards[i].restore(req, timeout=60)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise CheckpointNotFound(e.details()) from None
            if e.code() == grpc.StatusCode.DATA_LOSS:
                raise CheckpointInvalid(e.details()) from None
            raise ShardError(e.code().name, e.details() or "") from e

    def blocks(self, i: int) -> set[str]:
        req = paramserver_pb2.ListBlocksRequest()
        return {b.name for b in _call(lambda: self.client.shards[i].list_blocks(req, timeout=2.0)).blocks}


@contextmanager
def connect(
    addresses: list[str], placement: dict[str, int], optimizer: common_pb2.OptimizerSpec, job_yaml: str, **client: Any
) -> Iterator[GrpcShards]:
    """``GrpcShards`` over a new ``ParamClient`` (keyword arguments go to it), closed on exit."""
    with ParamClient(addresses, placement=placement, worker_id="coordinator", **client) as c:
        yield GrpcShards(c, optimizer, job_yaml)
