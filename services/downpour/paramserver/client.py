"""A ps-lite-sized client for a set of parameter shards.

    ps = ParamClient(["127.0.0.1:7100", "127.0.0.1:7101"], worker_id="r0p1")
    ps.init({"stage1.W1": w1, "stage1.W2": w2})   # places blocks (size-balanced) and creates them
    params = ps.pull()                             # {name: array}, all shards in parallel
    t = ps.push({"stage1.W1": g1})                 # returns at once with a ticket
    ps.wait(t)                                     # raises grpc.RpcError if a shard refused it

Blocks go to shards by size-balanced placement (largest first onto the least
loaded shard), or by a placement the coordinator hands out (``placement=``).
Every push carries (worker_id, seq); a push that fails in transit is retried
with the same seq, and the shards apply it at most once. The client remembers
the version of each block it pulled and sends it with the gradient, so the
shards can measure staleness.

With ``retry_deadline`` > 0 (what a worker uses), a pull or push that fails
because a shard is down, restarting or not yet refilled is retried with
exponential backoff until ``retry_deadline`` seconds have passed; without it,
only UNAVAILABLE and DEADLINE_EXCEEDED are retried, ``retries`` times, at once
(``retry.py``). Each attempt has its own ``timeout``.

With ``shared=True`` the client maps a shared-memory file with each shard on
its host after its first pull of a set of blocks (``shared_client.py``); from
then on pulls and pushes of that set move no tensor bytes through gRPC, and
``push_pull`` pushes and pulls in one round trip. A shard elsewhere refuses
the file and the client keeps to Pull and Push, block for block the same
results.

A push a shard refuses raises its ``grpc.RpcError``; ``refusal(error)`` reads
what the shard applied of it and why it refused the rest (errors.py).
"""

from __future__ import annotations

import itertools
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

import grpc
import numpy as np

from downpour.paramserver import shared as shm
from downpour.paramserver.errors import refusal
from downpour.paramserver.retry import RETRYABLE, RETRYABLE_UNDER_DEADLINE, RetryPolicy
from downpour.paramserver.server import CREATE_PAYLOAD, PULL_PAYLOAD, PUSH_PAYLOAD, SERVICE, UNARY
from downpour.paramserver.shared_client import SharedCall, SharedLinks
from downpour.rpc import codec, lowp
from downpour.rpc.channel import ChannelConfig, open_channel, wait_ready
from downpour.v1 import common_pb2
from downpour.v1 import paramserver_pb2 as pb

__all__ = ["RETRYABLE", "RETRYABLE_UNDER_DEADLINE", "ParamClient", "balanced_placement", "refusal"]

T = TypeVar("T")


def balanced_placement(block_sizes: Mapping[str, int], num_shards: int) -> dict[str, int]:
    """Greedy size balancing: largest block first, onto the least-loaded shard."""
    load = [0] * num_shards
    out: dict[str, int] = {}
    for name, size in sorted(block_sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        shard = min(range(num_shards), key=lambda s: (load[s], s))
        out[name] = shard
        load[shard] += size
    return out


class _Shard:
    """One shard's channel and a callable per RPC, the unary ones named after it in snake case."""

    list_blocks: Any
    checkpoint: Any
    restore: Any
    set_optimizer: Any
    init_blocks: Any
    attach_shared: Any
    push_pull_shared: Any

    def __init__(self, address: str, config: ChannelConfig) -> None:
        self.address = address
        self.channel = open_channel(address, config)
        self.create: Any = self.channel.stream_unary(
            f"/{SERVICE}/CreateBlocks",
            request_serializer=None,
            response_deserializer=pb.CreateBlocksResponse.FromString,
        )
        self.pull: Any = self.channel.unary_stream(
            f"/{SERVICE}/Pull",
            request_serializer=pb.PullRequest.SerializeToString,
            response_deserializer=lambda b: codec.decode(pb.PullResponse, b, PULL_PAYLOAD),
        )
        self.push: Any = self.channel.stream_unary(
            f"/{SERVICE}/Push", request_serializer=None, response_deserializer=pb.PushResponse.FromString
        )
        for name in UNARY:
            stub = self.channel.unary_unary(
                f"/{SERVICE}/{name}",
                request_serializer=getattr(pb, f"{name}Request").SerializeToString,
                response_deserializer=getattr(pb, f"{name}Response").FromString,
            )
            setattr(self, re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower(), stub)  # ListBlocks -> list_blocks


def _flat(name: str, a: np.ndarray) -> np.ndarray:
    """Flat little-endian float32 (float16/float64 are converted, others refused)."""
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"block {name!r}: cannot send dtype {a.dtype} as float32")
    return np.ascontiguousarray(a, dtype="<f4").reshape(-1)


class ParamClient:
    def __init__(
        self,
        shard_addresses: Iterable[str],
        *,
        worker_id: str = "",
        placement: Mapping[str, int] | None = None,
        channel_config: ChannelConfig | None = None,
        chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES,
        timeout: float = 120.0,
        retries: int = 3,
        retry_deadline: float = 0.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 2.0,
        shared: bool = False,
        wire_dtype: str = "float32",
    ) -> None:
        cfg = channel_config or ChannelConfig()
        self.shards = [_Shard(a, cfg) for a in shard_addresses]
        if not self.shards:
            raise ValueError("ParamClient needs at least one shard address")
        self.worker_id = worker_id or f"client-{uuid.uuid4().hex[:12]}"
        self.placement: dict[str, int] = dict(placement or {})
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.versions: dict[str, int] = {}
        self.chunk_bytes = min(chunk_bytes, cfg.max_message_bytes - (64 << 10))
        self.timeout = timeout
        self.retry = RetryPolicy(retries, retry_deadline, backoff_initial, backoff_max)
        self._closed = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=max(2, 2 * len(self.shards)), thread_name_prefix="ps-client")
        # Sequence numbers start from the clock (microseconds), not from 1: a worker that
        # builds a new client under the same worker_id (after taking its slot again) must
        # not reuse numbers the shards remember as applied, or its new pushes would be
        # dropped as repeats.
        self._seq = itertools.count(time.time_ns() // 1000)
        self._tickets: dict[int, list[Future]] = {}
        self._lock = threading.Lock()
        self.shared = shared and shm.usable()
        self.links = SharedLinks(
            self.shards, self.worker_id, timeout, self.shapes, self.versions, self._retrying, enabled=self.shared
        )
        if wire_dtype not in lowp.WIRE_DTYPES:
            raise ValueError(f"wire_dtype={wire_dtype!r} is unknown; allowed: {', '.join(lowp.WIRE_DTYPES)}")
        # How weights and gradients travel through gRPC (the shared-memory path is float32).
        self.wire = lowp.WIRE_DTYPES[wire_dtype]

    # -- placement -----------------------------------------------------------
    def wait_ready(self, timeout: float = 30.0) -> None:
        for s in self.shards:
            wait_ready(s.channel, timeout)

    def assign(self, block_sizes: Mapping[str, int]) -> dict[str, int]:
        self.placement.update(balanced_placement(block_sizes, len(self.shards)))
        return dict(self.placement)

    def _by_shard(self, names: Iterable[str]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for n in names:
            if n not in self.placement:
                raise KeyError(f"block {n!r} is not placed on any shard (call assign or init first)")
            out.setdefault(self.placement[n], []).append(n)
        return out

    def _all_shards(self, fn, groups: Mapping[int, list[str]]) -> list:
        futs = [self._pool.submit(fn, s, names) for s, names in groups.items()]
        return [f.result() for f in futs]

    # -- the API ----------------------------------------------------------------
    def init(self, blocks: Mapping[str, np.ndarray], overwrite: bool = False) -> None:
        """Place (if not placed yet) and create blocks with initial values."""
        flat = {n: _flat(n, a) for n, a in blocks.items()}
        self.assign({n: a.size for n, a in flat.items() if n not in self.placement})

        def create(shard: int, names: list[str]) -> None:
            def reqs() -> Iterator[bytes]:
                for n in names:
                    shape = tuple(np.shape(blocks[n]))
                    for a, b in codec.chunk_spans(flat[n].size, 4, self.chunk_bytes):
                        hdr = common_pb2.TensorChunk(
                            name=n, dtype=common_pb2.DTYPE_FLOAT32, shape=shape, offset=a, last=b >= flat[n].size
                        )
                        yield codec.encode(
                            pb.CreateBlocksRequest(chunk=hdr, overwrite=overwrite), CREATE_PAYLOAD, flat[n][a:b]
                        )
                yield pb.CreateBlocksRequest(commit=True).SerializeToString()

            resp = self.shards[shard].create(reqs(), timeout=self.timeout)
            for info in resp.blocks:
                self.shapes[info.name] = tuple(info.shape)
                self.versions[info.name] = info.version

        self._all_shards(create, self._by_shard(flat))

    def pull(
        self,
        names: Iterable[str] | None = None,
        *,
        out: Mapping[str, np.ndarray] | None = None,
        accumulators: bool = False,
    ) -> dict[str, np.ndarray]:
        """Current values of ``names`` (default: every placed block), from all shards in parallel.

        ``out`` may supply preallocated float32 arrays to fill (no allocation).
        """
        names = list(self.placement if names is None else names)
        result: dict[str, np.ndarray] = {}
        self._all_shards(lambda s, g: self._pull_group(s, g, result, out, accumulators), self._by_shard(names))
        return {n: result[n].reshape(self.shapes[n]) for n in names}

    def _pull_group(
        self,
        shard: int,
        group: list[str],
        result: dict,
        out: Mapping[str, np.ndarray] | None,
        accumulators: bool = False,
    ) -> None:
        link = None if accumulators else self.links.link(shard, group, exact=False)
        if link is not None and self.links.call(shard, link, SharedCall(group, None, 0, result, out)):
            return
        part = pb.BLOCK_PART_ACCUMULATOR if accumulators else pb.BLOCK_PART_WEIGHTS

        def pull_shard(shard: int, group: list[str]) -> None:
            req = pb.PullRequest(
                names=group,
                max_chunk_bytes=self.chunk_bytes,
                part=part,
                dtype=common_pb2.DTYPE_FLOAT32 if accumulators else self.wire,
            )
            for msg, payload in self.shards[shard].pull(req, timeout=self.timeout):
                c = msg.chunk
                dst = result.get(c.name)
                if dst is None:
                    n = int(np.prod(c.shape, dtype=np.int64)) if c.shape else 1
                    given = None if out is None else out.get(c.name)
                    if given is None:
                        dst = np.empty(n, np.float32)
                    elif given.dtype != np.float32 or given.size != n or not given.flags.c_contiguous:
                        raise ValueError(f"out[{c.name!r}] must be a C-contiguous float32 array of {n} values")
                    else:
                        dst = given.reshape(-1)
                    result[c.name] = dst
                    if not accumulators:
                        self.versions[c.name] = msg.version
                    self.shapes[c.name] = tuple(c.shape)
                item = lowp.ITEMSIZE.get(c.dtype)
                if item is None or payload.nbytes % item:
                    raise ValueError(f"block {c.name!r}: shard sent {payload.nbytes} bytes of dtype {c.dtype}")
                lowp.decode(payload, c.dtype, out=dst[c.offset : c.offset + payload.nbytes // item])

        self._retrying("pull", shard, lambda: pull_shard(shard, group))

    def push_pull(self, grads: Mapping[str, np.ndarray], views: bool = False) -> dict[str, np.ndarray]:
        """Push ``grads``, wait until every shard applied them, and return the blocks' new values.

        One round trip per shard over a shared-memory link, else a push and a pull. With
        ``views`` the values of linked blocks are read-only views of the shared weight region,
        not copies: valid until this client's next pull or push_pull (what a synchronous loop
        needs, with no copy and no allocation per step).
        """
        seq = next(self._seq)
        flat = {n: _flat(n, g) for n, g in grads.items()}
        for n, g in grads.items():
            self.shapes.setdefault(n, tuple(np.shape(g)))
        result: dict[str, np.ndarray] = {}

        def shard_push_pull(shard: int, group: list[str]) -> None:
            link = self.links.link(shard, group, exact=True)
            if link is not None and self.links.call(shard, link, SharedCall(group, flat, seq, result, views=views)):
                return
            self._push_shard(shard, group, flat, seq)
            self._pull_group(shard, group, result, None)

        self._all_shards(shard_push_pull, self._by_shard(flat))
        return {n: result[n].reshape(self.shapes[n]) for n in flat}

    def push(self, grads: Mapping[str, np.ndarray]) -> int:
        """Send gradients to their shards in the background; returns a ticket for wait()."""
        seq = next(self._seq)
        flat = {n: _flat(n, g) for n, g in grads.items()}
        for n, g in grads.items():  # the block's shape, as pulled or as given
            self.shapes.setdefault(n, tuple(np.shape(g)))
        futs = [self._pool.submit(self._push_shard, s, names, flat, seq) for s, names in self._by_shard(flat).items()]
        with self._lock:
            self._tickets[seq] = futs
        return seq

    def wait(self, ticket: int) -> list[pb.PushResponse]:
        """Block until every shard has answered the push; raise the first error."""
        with self._lock:
            futs = self._tickets.pop(ticket)
        return [f.result() for f in futs]

    def _push_shard(self, shard: int, names: list[str], flat: Mapping[str, np.ndarray], seq: int) -> pb.PushResponse:
        link = self.links.link(shard, names, exact=True)
        if link is not None:
            got: dict[str, np.ndarray] = {}
            resp = self.links.call(shard, link, SharedCall(names, flat, seq, got, pull=False))
            if resp:
                return pb.PushResponse(
                    duplicate=resp.duplicate,
                    blocks=[pb.BlockInfo(name=n, version=v) for n, v in zip(link.names, resp.versions)],
                )

        def reqs() -> Iterator[bytes]:
            for n in names:
                g = flat[n]
                shape = self.shapes.get(n, (g.size,))
                for a, b in codec.chunk_spans(g.size, lowp.ITEMSIZE[self.wire], self.chunk_bytes):
                    hdr = common_pb2.TensorChunk(name=n, dtype=self.wire, shape=shape, offset=a, last=b >= g.size)
                    yield codec.encode(
                        pb.PushRequest(
                            worker_id=self.worker_id, seq=seq, chunk=hdr, base_version=self.versions.get(n, 0)
                        ),
                        PUSH_PAYLOAD,
                        lowp.encode(g[a:b], self.wire),
                    )
            yield pb.PushRequest(worker_id=self.worker_id, seq=seq, commit=True).SerializeToString()

        # Same (worker_id, seq) on every attempt: the shard applies it at most once.
        def call() -> pb.PushResponse:
            return self.shards[shard].push(reqs(), timeout=self.timeout)

        return self._retrying("push", shard, call) if self.retry.deadline > 0 else self.retry.at_once(call)

    def _retrying(self, op: str, shard: int, call: Callable[[], T]) -> T:
        """``call()`` retried with exponential backoff until ``retry_deadline`` (when set)."""
        where = f"shard {shard} ({self.shards[shard].address})"
        return self.retry.under_deadline(op, where, call, self._closed)

    # -- administration ------------------------------------------------------------
    def list_blocks(self) -> list[pb.ListBlocksResponse]:
        return [s.list_blocks(pb.ListBlocksRequest(), timeout=self.timeout) for s in self.shards]

    def checkpoint(self, checkpoint_id: str) -> list[pb.CheckpointResponse]:
        """Every shard writes its part. Waits for every shard's answer before raising: a caller that
        cleans up a failed attempt must not delete the folder under a shard still writing into it
        (that shard then failed with "No such file or directory", hiding the first one's reason).
        Of several failures, a full disk (RESOURCE_EXHAUSTED) is the one raised."""
        futs = [
            self._pool.submit(s.checkpoint, pb.CheckpointRequest(checkpoint_id=checkpoint_id), timeout=self.timeout)
            for s in self.shards
        ]
        wait(futs)
        errors = [e for e in (f.exception() for f in futs) if e is not None]
        if errors:
            full = [e for e in errors if getattr(e, "code", lambda: None)() == grpc.StatusCode.RESOURCE_EXHAUSTED]
            raise (full or errors)[0]
        return [f.result() for f in futs]

    def restore(self, checkpoint_id: str) -> list[pb.RestoreResponse]:
        futs = [
            self._pool.submit(s.restore, pb.RestoreRequest(checkpoint_id=checkpoint_id), timeout=self.timeout)
            for s in self.shards
        ]
        return [f.result() for f in futs]

    def close(self) -> None:
        self._closed.set()  # ends retries in progress
        self._pool.shutdown(wait=True)
        self.links.close()
        for s in self.shards:
            s.channel.close()

    def __enter__(self) -> ParamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
