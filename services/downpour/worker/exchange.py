"""Halo exchange between the partitions of one replica, over ``Exchange`` streams.

``downpour.partition`` computes one partition's share of a step as a
generator that stops at every synchronisation point with the messages it
sends and the partitions it expects messages from. This module carries those
messages between worker processes:

* ``Mailbox``: what peers have sent us, keyed by (generation, step, layer,
  direction, sender); a receive waits with a deadline, so a dead peer turns
  into ``PeerLost`` instead of a hang.
* ``PeerLinks``: one long-lived client stream per peer (the ``Exchange``
  bidi RPC), fed from a queue; the server side puts what arrives into the
  receiver's mailbox.
* ``drive``: runs a partition generator to its result through both.

Messages of an older generation (an assignment before a peer was replaced)
are dropped on arrival: a replica restarts its step after any change.
"""

from __future__ import annotations

import queue
import threading
import time

import grpc
import numpy as np

from downpour import metrics
from downpour.partition import Halo
from downpour.rpc import codec
from downpour.rpc.channel import ChannelConfig, open_channel
from downpour.v1 import worker_pb2, worker_pb2_grpc


class PeerLost(RuntimeError):
    """A peer partition did not answer in time or its stream broke."""


def to_proto(h: Halo) -> worker_pb2.ExchangeRequest:
    return worker_pb2.ExchangeRequest(
        halo=worker_pb2.Halo(
            generation=h.generation,
            replica=h.replica,
            from_partition=h.from_partition,
            to_partition=h.to_partition,
            step=h.step,
            layer=h.layer,
            direction=worker_pb2.HaloDirection.ValueType(h.direction),
            y0=h.y0,
            x0=h.x0,
            y1=h.y1,
            x1=h.x1,
            tensor=codec.tensor_to_proto(np.ascontiguousarray(h.tensor)),
        )
    )


def from_proto(m: worker_pb2.Halo) -> Halo:
    return Halo(
        m.generation,
        m.replica,
        m.from_partition,
        m.to_partition,
        m.step,
        m.layer,
        m.direction,
        m.y0,
        m.x0,
        m.y1,
        m.x1,
        codec.tensor_from_proto(m.tensor),
    )


class Mailbox:
    def __init__(self) -> None:
        self._box: dict[tuple, Halo] = {}
        self._cond = threading.Condition()
        self.generation = -1
        self.replica = -1
        self.partition = -1

    def reset(self, generation: int, replica: int, partition: int) -> None:
        with self._cond:
            self.generation, self.replica, self.partition = generation, replica, partition
            # Keep what a peer already sent in a newer generation, as ``put`` does: a peer that
            # learned of the new generation first may have sent its halos before we start it.
            self._box = {k: v for k, v in self._box.items() if k[0] >= generation}
            self._cond.notify_all()

    def put(self, h: Halo) -> bool:
        """File a message; False (dropped) when it is not for our current assignment."""
        with self._cond:
            if h.generation < self.generation or (self.replica >= 0 and h.replica != self.replica):
                return False
            self._box[(h.generation, h.step, h.layer, h.direction, h.from_partition)] = h
            self._cond.notify_all()
            return True

    def take(
        self,
        generation: int,
        step: int,
        layer: int,
        direction: int,
        senders: list[int],
        timeout: float,
        cancelled=lambda: False,
    ) -> list[Halo]:
        deadline = time.monotonic() + timeout
        keys = [(generation, step, layer, direction, s) for s in senders]
        with self._cond:
            while True:
                if all(k in self._box for k in keys):
                    return [self._box.pop(k) for k in keys]
                left = deadline - time.monotonic()
                if left <= 0 or cancelled() or self.generation != generation:
                    missing = [k[-1] for k in keys if k not in self._box]
                    raise PeerLost(
                        f"no halo from partition(s) {missing} for step {step} layer tag {layer} within {timeout:.0f}s"
                    )
                self._cond.wait(min(left, 0.2))


class _Link:
    def __init__(self, address: str, chcfg: ChannelConfig) -> None:
        self.address = address
        self.q: queue.Queue = queue.Queue()
        self.channel = open_channel(address, chcfg)
        self.error: grpc.RpcError | None = None
        call = worker_pb2_grpc.ModelWorkerStub(self.channel).Exchange(self._requests())
        self.thread = threading.Thread(target=self._drain, args=(call,), daemon=True, name=f"halo->{address}")
        self.thread.start()

    def _requests(self):
        while True:
            m = self.q.get()
            if m is None:
                return
            yield m

    def _drain(self, call) -> None:
        try:
            for _ in call:  # the receiver answers nothing; the stream ends when we close it
                pass
        except grpc.RpcError as e:
            self.error = e

    def send(self, req) -> None:
        if self.error is not None:
            raise PeerLost(f"stream to {self.address} broke: {self.error.code().name}")
        self.q.put(req)

    def close(self) -> None:
        self.q.put(None)
        self.channel.close()


class PeerLinks:
    """Outgoing streams to the other partitions of this replica, by partition id."""

    def __init__(self, peers: dict[int, str], chcfg: ChannelConfig) -> None:
        self.links = {p: _Link(a, chcfg) for p, a in peers.items()}

    def send(self, h: Halo) -> None:
        link = self.links.get(h.to_partition)
        if link is None:
            raise PeerLost(f"no address for partition {h.to_partition}")
        req = to_proto(h)
        n = len(req.halo.tensor.data)
        metrics.WORKER_HALO_BYTES.inc(n)
        link.send(req)

    def close(self) -> None:
        for link in self.links.values():
            link.close()


def drive(gen, links: PeerLinks, mailbox: Mailbox, generation: int, step: int, timeout: float, cancelled=lambda: False):
    """Run one partition generator to its ``PartitionResult``, exchanging through links and mailbox."""
    inbox = None
    while True:
        try:
            ex = gen.send(inbox)
        except StopIteration as stop:
            return stop.value
        for h in ex.send:
            links.send(h)
        inbox = (
            mailbox.take(generation, step, ex.tag, ex.direction, sorted(ex.expect), timeout, cancelled)
            if ex.expect
            else []
        )


def serve_exchange(mailbox: Mailbox, request_iterator, context):
    """The ``Exchange`` RPC body: file every incoming halo; answer nothing.

    A generator (the RPC is a bidi stream) that yields no responses: the
    sender's stream stays open for the replica's lifetime.
    """
    yield from ()
    for req in request_iterator:
        try:
            h = from_proto(req.halo)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad halo tensor: {e}")
        if h.to_partition != mailbox.partition and mailbox.partition >= 0:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"halo for partition {h.to_partition} sent to partition {mailbox.partition}",
            )
        mailbox.put(h)
