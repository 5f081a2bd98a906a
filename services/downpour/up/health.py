"""Is a child up, and is it still answering: the start-up wait (``wait_healthy``) and the
liveness probe that kills a child that is alive but hung (``HangWatch``)."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from downpour.rpc.channel import ChannelConfig, open_channel, wait_ready
from downpour.up.children import Child


def wait_healthy(
    address: str, timeout: float, proc: subprocess.Popen | None = None, chcfg: ChannelConfig | None = None
) -> None:
    """Block until ``address`` answers SERVING on the gRPC health service (and ``proc`` is still running)."""
    alive = None if proc is None else (lambda: proc.poll() is None)
    with open_channel(address, chcfg) as ch:
        try:
            wait_ready(ch, timeout, alive=alive)
        except RuntimeError:
            code = proc.returncode if proc is not None else None
            raise RuntimeError(f"the service at {address} exited with code {code} during start-up") from None
        except TimeoutError as e:
            raise TimeoutError(f"the service at {address} was not healthy within {timeout:.0f} s ({e})") from None


@dataclass
class _Seen:
    """What the watch knows of one child's current process."""

    pid: int
    since: float  # when the watch first saw this process
    answered: float | None = None  # when it last answered a probe
    probe: grpc.Future | None = None  # the probe in flight


class HangWatch:
    """Kills children that are alive but do not answer their health check (the launcher's liveness probe).

    Every ``period`` seconds each running child without a probe in flight gets one
    (``Health.Check`` with a deadline of ``hang_seconds``); any answer, SERVING or not,
    counts as alive. A child whose last answer is more than ``hang_seconds`` old is
    sent SIGKILL; ``Cluster.supervise`` then restarts it like any child that died.
    The clock starts at a child's first answer: start-up (imports, restoring) is
    bounded by ``start_timeout`` instead, so a slow start is not taken for a hang.
    """

    def __init__(
        self,
        children: list[Child],
        hang_seconds: float,
        chcfg: ChannelConfig | None = None,
        start_timeout: float = 90.0,
        period: float = 0.5,
    ):
        self.children, self.hang, self.chcfg = children, hang_seconds, chcfg
        self.start_timeout, self.period = start_timeout, period
        self.events: list[str] = []  # what was killed and why, for the launcher to print
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hang-watch", daemon=True)
        self._channels: dict[str, grpc.Channel] = {}
        self._seen: dict[str, _Seen] = {}  # child name -> its current process

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for ch in self._channels.values():
            ch.close()

    def _stub(self, address: str) -> health_pb2_grpc.HealthStub:
        if address not in self._channels:
            self._channels[address] = open_channel(address, self.chcfg)
        return health_pb2_grpc.HealthStub(self._channels[address])

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            for c in list(self.children):
                try:
                    self.check(c, time.monotonic())
                except Exception as e:  # noqa: BLE001 - the watch must outlive any one child's oddity
                    self.events.append(f"hang watch: {c.name}: {e}")

    def check(self, c: Child, now: float) -> None:
        proc = c.proc  # one process throughout: the launcher's thread may start a new one meanwhile
        if proc is None or proc.poll() is not None:
            self._seen.pop(c.name, None)
            return
        s = self._seen.get(c.name)
        if s is None or s.pid != proc.pid:  # a new process: its start-up is not a hang
            s = self._seen[c.name] = _Seen(pid=proc.pid, since=now)
        probe = s.probe
        if probe is not None and probe.done():
            s.probe = None
            try:
                probe.result()
                s.answered = now
            except grpc.RpcError as e:
                # Any answer from the process itself means it is alive; no connection or no
                # answer in time is what a hung (or not yet listening) process looks like.
                if e.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                    s.answered = now
        if s.probe is None:
            s.probe = self._stub(c.address).Check.future(health_pb2.HealthCheckRequest(service=""), timeout=self.hang)
        silent = now - (s.answered if s.answered is not None else s.since)
        limit = self.hang if s.answered is not None else max(self.start_timeout, self.hang)
        if silent > limit:
            what = "has not answered its health check" if s.answered is not None else "never answered its health check"
            self.events.append(f"{c.name} (pid {proc.pid}) {what} for {silent:.1f} s: killed as hung")
            c.hangs += 1
            proc.kill()
            s.probe.cancel()
            self._seen.pop(c.name, None)
