"""The client side of the shared-memory data plane (see shared.py for the design and the region).

After a client's first pull of a set of blocks, it asks each shard on its
host for a shared region for them (``AttachShared``; the shard makes the
region and sends it over a Unix socket the client listens on); from then on a pull or push of that set is one
``PushPullShared`` call carrying only control. A shard that cannot reach the
socket (another host or container) keeps the client on Pull and Push for good; a
shard that is away or being refilled is asked again on the next call.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grpc
import numpy as np

from downpour.paramserver import shared as shm
from downpour.v1 import paramserver_pb2 as pb

# An AttachShared that fails with these is asked again later (the shard is away or being
# refilled); any other answer (FAILED_PRECONDITION: it cannot reach our socket) means gRPC for good.
NOT_YET = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.CANCELLED,
)

log = logging.getLogger("downpour.paramserver.client")

# (op, shard, call) -> call(), retried as the client's policy says
Retrying = Callable[[str, int, Callable[[], Any]], Any]


@dataclass
class SharedCall:
    """One pull and/or push through a link: what to send, what to read back and where to."""

    group: list[str]  # the blocks to read back (with pull)
    flat: Mapping[str, np.ndarray] | None  # gradients to push, by block; None: no push
    seq: int  # the push's sequence number
    result: dict  # filled with the blocks read back
    out: Mapping[str, np.ndarray] | None = None  # preallocated arrays to read into
    pull: bool = True
    views: bool = False  # read back read-only views of the weight region, not copies


class Link:
    """A shared-memory region mapped by this client and one shard."""

    def __init__(self, region: shm.Region, names: list[str], sizes: list[int]) -> None:
        self.region, self.names = region, names
        self.index = dict(zip(names, shm.layout(sizes)))
        self.lock = threading.Lock()  # the regions hold one call's data at a time


class SharedLinks:
    """A client's links, one per shard: mapped on demand, used for pulls and pushes that fit them."""

    def __init__(
        self,
        shards: Sequence[Any],
        worker_id: str,
        timeout: float,
        shapes: dict[str, tuple[int, ...]],
        versions: dict[str, int],
        retrying: Retrying,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled  # False: every pull and push goes through gRPC
        self.shards, self.worker_id, self.timeout = shards, worker_id, timeout
        # The client's own dicts: shapes decide what can be mapped, versions are kept up to date.
        self.shapes, self.versions = shapes, versions
        self.retrying = retrying
        self.lock = threading.Lock()
        self.links: dict[int, Link | Literal[False]] = {}  # False: this shard cannot share memory with us

    def link(self, shard: int, names: list[str], exact: bool) -> Link | None:
        """This shard's link if it covers ``names`` (exactly, for a push); maps one if none yet."""
        if not self.enabled:
            return None
        with self.lock:
            link = self.links.get(shard)
            if link is None and all(n in self.shapes for n in names):
                made = self.attach(shard, names)
                if made is not None:
                    link = self.links[shard] = made
        if not isinstance(link, Link):
            return None
        if (set(names) != set(link.names)) if exact else not set(names) <= set(link.index):
            return None
        return link

    def attach(self, shard: int, names: list[str]) -> Link | Literal[False] | None:
        """A new link for ``names``; False if the shard cannot map it (gRPC for good), None to ask again later."""
        sizes = [int(np.prod(self.shapes[n], dtype=np.int64)) for n in names]
        address = self.shards[shard].address
        token = secrets.token_bytes(shm.TOKEN_BYTES)
        try:
            listener, path = shm.listen()
        except OSError as e:
            log.info("cannot listen for shard %d (%s) in %s (%s): gRPC for good", shard, address, shm.SHM_DIR, e)
            return False
        try:
            try:
                self.shards[shard].attach_shared(
                    pb.AttachSharedRequest(worker_id=self.worker_id, path=path, token=token, names=names),
                    timeout=self.timeout,
                )
            except grpc.RpcError as e:
                if e.code() in NOT_YET:
                    # A shard that restarted and is still being refilled (or is away): ask again on the
                    # next call rather than keep to gRPC for good.
                    log.info(
                        "shard %d (%s) cannot map shared memory yet (%s: %s); asking again on the next call",
                        shard, address, e.code().name, e.details(),
                    )  # fmt: skip
                    return None
                log.info(
                    "shard %d (%s) does not map shared memory (%s: %s): pulls and pushes go through gRPC",
                    shard, address, e.code().name, e.details(),
                )  # fmt: skip
                return False
            try:
                region = shm.receive(listener, token, int(sum(sizes)))
            except (OSError, ValueError) as e:
                log.warning("shard %d (%s): no shared region (%s): pulls and pushes go through gRPC", shard, address, e)
                return False
        finally:
            listener.close()
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        log.info("shard %d (%s): %d blocks through shared memory", shard, address, len(names))
        return Link(region, names, sizes)

    def call(self, shard: int, link: Link, job: SharedCall) -> pb.PushPullSharedResponse | None:
        """Push ``job.flat`` (if given) and/or pull ``job.group`` through the link; None to fall back to gRPC.

        A shard that lost our mapping (it restarted) gets a fresh region; one that
        cannot map it any more sends us back to Pull and Push.
        """
        now = link
        for _ in range(2):
            try:
                op = "push" if job.flat is not None else "pull"
                return self.retrying(op, shard, functools.partial(self._once, shard, now, job))
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                with self.lock:
                    fresh = self.attach(shard, now.names)
                    if fresh is None:  # no link now; the next call attaches again
                        self.links.pop(shard, None)
                    else:
                        self.links[shard] = fresh
                now.region.close()
                if not isinstance(fresh, Link):
                    return None
                now = fresh
        return None

    def _once(self, shard: int, link: Link, job: SharedCall) -> pb.PushPullSharedResponse:
        flat, group, result, out, pull, views = job.flat, job.group, job.result, job.out, job.pull, job.views
        seq = job.seq
        with link.lock:
            if flat is not None:
                for n in link.names:
                    a, b = link.index[n]
                    link.region.grads[a:b] = flat[n]
            bases = [self.versions.get(n, 0) for n in link.names] if flat is not None else []
            resp = self.shards[shard].push_pull_shared(
                pb.PushPullSharedRequest(
                    worker_id=self.worker_id, seq=seq, push=flat is not None, pull=pull, base_versions=bases
                ),
                timeout=self.timeout,
            )
            if pull:
                for n, v in zip(link.names, resp.versions):
                    self.versions[n] = v
                for n in group:
                    a, b = link.index[n]
                    if views:
                        v = link.region.weights[a:b]
                        v.flags.writeable = False
                        result[n] = v
                        continue
                    given = None if out is None else out.get(n)
                    dst = np.empty(b - a, np.float32) if given is None else given.reshape(-1)
                    if dst.size != b - a or dst.dtype != np.float32:
                        raise ValueError(f"out[{n!r}] must be a C-contiguous float32 array of {b - a} values")
                    dst[:] = link.region.weights[a:b]
                    result[n] = dst
        return resp

    def close(self) -> None:
        for link in self.links.values():
            if isinstance(link, Link):
                link.region.close()
        self.links = {}
