"""A worker's life as a member of the job: the ``ModelWorker`` service, the coordinator calls, the run.

``Worker.run`` (the training thread) acts in the current state of ``worker.state``'s machine and
feeds the outcome through ``transition``: register and get a slot, wait as a spare, train the
assignment (a run built by ``worker.build``, stepped here with progress reports), resync (give
the slot back and take it again). The heartbeat thread renews the lease and passes what the
coordinator says to the owner through the inbox. The process around it is ``worker.server``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import grpc
import numpy as np

from downpour import config as jobconfig
from downpour import metrics
from downpour.feeder.client import FeederUnavailable
from downpour.rpc.channel import ChannelConfig, open_channel
from downpour.scalars import Means
from downpour.v1 import common_pb2, coordinator_pb2_grpc, worker_pb2, worker_pb2_grpc
from downpour.v1 import coordinator_pb2 as cpb
from downpour.worker.build import Training, build, missing_peers
from downpour.worker.exchange import Mailbox, PeerLost, serve_exchange
from downpour.worker.state import WIRE_STATE, Control, Event, Inbox, State, from_heartbeat, transition

log = logging.getLogger("downpour.worker")

# Coordinator answers that retrying cannot change.
FINAL_CODES = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
)


class Stop(Exception):
    """The process is shutting down: a coordinator call gave up waiting."""


class Worker(worker_pb2_grpc.ModelWorkerServicer):
    """The ``ModelWorker`` service and the worker's life (``run``, on the training thread).

    The training thread owns ``life``, ``assignment`` and the progress fields; the heartbeat
    thread reads ``member_id`` and ``lease`` and speaks to the owner only through ``inbox``.
    """

    def __init__(
        self, coordinator: str, address: str, chcfg: ChannelConfig, device: str = "cpu", xp: ModuleType = np
    ) -> None:
        self.address, self.chcfg, self.device = address, chcfg, device
        self.xp = xp  # numpy, or cupy for --device gpu (checked at start by downpour.device)
        self.coord = coordinator_pb2_grpc.CoordinatorStub(open_channel(coordinator, chcfg))
        self.member_id = ""
        self.member_key = ""  # the coordinator's secret for our member_id: every call for it carries it
        self.assignment: common_pb2.Assignment | None = None
        self.job: common_pb2.JobSpec | None = None
        self.life = State.REGISTERING
        self.step = 0
        self.loss = float("nan")
        self.rate = 0.0
        self.lease = 5.0
        self.inbox = Inbox()  # control from the heartbeat thread and the progress reports
        self._stop = threading.Event()  # process shutdown: ends every wait and retry at once
        self.mailbox = Mailbox()  # halos from the other partitions of our replica
        self.halo_timeout = 30.0  # a peer silent this long is lost: the replica resynchronises

    def shutdown(self) -> None:
        """End the worker from any thread: waits and retries stop, the owner sees STOP."""
        self._stop.set()
        self.inbox.put(Control(Event.STOP))

    # ------------------------------------------------------------- RPCs
    def Status(self, request: worker_pb2.StatusRequest, context: Any) -> worker_pb2.StatusResponse:
        r = worker_pb2.StatusResponse(
            member_id=self.member_id,
            state=WIRE_STATE[self.life],
            step=self.step,
            loss=self.loss,
            examples_per_second=self.rate,
            device=self.device,
        )
        a = self.assignment
        if a is not None:
            r.assignment.CopyFrom(a)
        return r

    def Exchange(self, request_iterator: Any, context: Any) -> Any:
        return serve_exchange(self.mailbox, request_iterator, context)

    # ------------------------------------------------------- coordinator
    def _call(self, fn: Callable[..., Any], request: Any, timeout: float = 5.0) -> Any:
        """A coordinator call retried with backoff until it answers or we are shut down."""
        delay = 0.1
        while not self._stop.is_set():
            try:
                return fn(request, timeout=timeout)
            except grpc.RpcError as e:
                if e.code() in FINAL_CODES:
                    raise
                log.info("coordinator unavailable (%s); retrying in %.1fs", e.code().name, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 2.0)
        raise Stop()

    def heartbeat_loop(self) -> None:
        """The heartbeat thread: renew the lease, and pass on what the coordinator says."""
        while not self._stop.wait(max(0.2, self.lease / 4)):
            member_id = self.member_id
            if not member_id:
                continue
            try:
                r = self.coord.Heartbeat(
                    cpb.HeartbeatRequest(member_id=member_id, step=self.step, member_key=self.member_key), timeout=2.0
                )
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    self.inbox.put(Control(Event.REREGISTER))  # a coordinator that lost us: register again
                continue  # coordinator down: keep training, try again later
            metrics.WORKER_HEARTBEATS.inc()
            c = from_heartbeat(r)
            if c is not None:
                self.inbox.put(c)

    def _generation(self) -> int | None:
        return None if self.assignment is None else int(self.assignment.generation)

    def _control(self) -> Control | None:
        """Take the control to act on now, adopting a reassignment's slot."""
        c = self.inbox.take(self._generation())
        if c is not None and c.event is Event.REASSIGN:
            self.assignment = c.assignment
        return c

    def _await_control(self) -> Event:
        """Wait for the coordinator's next word (a spare, a finished replica, a partition without peers)."""
        while not self._stop.is_set():
            self.inbox.wait(self._generation(), 0.2)  # read what arrived into the inbox's hold
            c = self._control()
            if c is not None and c.event is not None:
                return c.event
        return Event.STOP

    # ------------------------------------------------------------- states
    def run(self) -> int:
        """The worker's life: act in the current state, feed the outcome through ``transition``."""
        threading.Thread(target=self.heartbeat_loop, name="heartbeat", daemon=True).start()
        actions: dict[State, Callable[[], Event]] = {
            State.REGISTERING: self._register,
            State.WAITING: self._await_control,
            State.TRAINING: self._train,
            State.RESYNCING: self._resync,
            State.DONE: self._await_control,
        }
        try:
            while self.life is not State.STOPPED:
                event = actions[self.life]()
                self.life = transition(self.life, event)
        except Stop:
            self.life = State.STOPPED
        finally:
            self._stop.set()
        log.info("stopped by the coordinator at step %d", self.step)
        return 0

    def _register(self) -> Event:
        r = self._call(
            self.coord.Register,
            cpb.RegisterRequest(
                role=cpb.ROLE_WORKER, address=self.address, member_id=self.member_id, member_key=self.member_key
            ),
        )
        self.member_id, self.job, self.lease = r.member_id, r.job, r.lease_seconds or 5.0
        self.member_key = r.member_key
        self.assignment = r.assignment if r.HasField("assignment") else None
        return Event.NO_SLOT if self.assignment is None else Event.SLOT

    def _resync(self) -> Event:
        """Give our slot back and take it again: the replica gets a new generation."""
        c = self._control()
        if c is not None and c.event is Event.STOP:
            return Event.STOP
        gen = self.assignment.generation if self.assignment is not None else -1
        try:
            self._call(
                self.coord.Deregister, cpb.DeregisterRequest(member_id=self.member_id, member_key=self.member_key)
            )
        except grpc.RpcError:
            pass
        self.assignment = None
        self._register()
        # Wait (bounded) until the peers' heartbeats can see the new generation too.
        deadline = time.monotonic() + self.lease
        while self.assignment is not None and self.assignment.generation == gen and time.monotonic() < deadline:
            self.inbox.wait(self._generation(), 0.2)
            c = self._control()  # a reassignment is adopted; a lost membership we have just renewed
            if (c is not None and c.event is Event.STOP) or self._stop.is_set():
                return Event.STOP
        return Event.NO_SLOT if self.assignment is None else Event.SLOT

    def _train(self) -> Event:
        """Run the current assignment until its replica is done, we are moved, or a peer, shard or feeder fails."""
        a, job = self.assignment, self.job
        assert a is not None and job is not None, "training needs an assignment and a job"
        if missing_peers(a):
            log.info(
                "replica %d partition %d: waiting for %d more partition(s) to join",
                a.replica,
                a.partition,
                missing_peers(a),
            )
            return self._await_control()  # the coordinator bumps the replica's generation when a slot fills
        gen = int(a.generation)
        try:
            t = build(
                a,
                jobconfig.from_yaml(job.spec_yaml),
                worker_id=self.member_id or self.address,
                chcfg=self.chcfg,
                xp=self.xp,
                mailbox=self.mailbox,
                halo_timeout=self.halo_timeout,
                cancelled=lambda: self.inbox.pending(gen) is not None or self._stop.is_set(),
            )
            return self._run_loop(a, t)
        except (grpc.RpcError, FeederUnavailable) as e:
            # A shard or the feeder stayed away past the retry deadline: start over in a
            # fresh generation rather than exit.
            what = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else str(e)
            log.warning("training interrupted (%s); taking the slot again", what)
            self._stop.wait(1.0)
            return Event.INTERRUPTED
        except PeerLost as e:
            c = self._control()
            if c is not None and c.event is not None:
                log.info("replica changed while exchanging halos (%s); restarting the step", c.event.value)
                return c.event
            # Nobody moved: ask for a fresh generation so that every partition of the replica restarts together.
            log.warning("%s; resynchronising the replica", e)
            return Event.PEER_LOST

    def _run_loop(self, a: common_pb2.Assignment, t: Training) -> Event:
        """Step ``t``'s loop to the job's last step or until a control event arrives; report progress."""
        cfg, loop, gen = t.cfg, t.loop, int(a.generation)
        step = int(a.start_step)
        self.step = step
        log.info("replica %d partition %d: training from step %d to %d", a.replica, a.partition, step, cfg.steps)
        last_report, t_rate, n_rate = 0.0, time.perf_counter(), 0
        loss_sum, loss_n = 0.0, 0  # report the mean loss since the last report: less noise than one batch
        means = Means()  # and the mean of each of the objective's scalars (per-stage terms, norms)
        n_steps, first = 0, True
        try:
            while step < cfg.steps:
                if self.inbox.pending(gen) is not None or self._stop.is_set():
                    break
                t.cursor.step = step
                res = loop.step(step, first=first)
                first = False
                step += 1
                n_steps += 1
                self.step, self.loss = step, res.loss
                n_rate += res.examples
                loss_sum, loss_n = loss_sum + res.loss, loss_n + 1
                means.add(res.info)
                metrics.WORKER_STEPS.inc()
                metrics.WORKER_EXAMPLES.inc(res.examples)
                metrics.TRAINING_LOSS.labels(str(a.replica)).set(res.loss)
                now = time.perf_counter()
                if now - last_report > 0.25 or step == cfg.steps:
                    self.rate = n_rate / max(now - t_rate, 1e-9)
                    t_rate, n_rate, last_report = now, 0, now
                    loop.flush()  # what we report as done has reached the shards
                    self._report(a, step, loss_sum / loss_n, n_steps * cfg.batch_size, means.take())
                    loss_sum, loss_n, n_steps = 0.0, 0, 0
        finally:
            t.close()  # flushes: every step taken has reached the shards
        if step >= cfg.steps:
            # The last report is the one the job's completion waits for: a coordinator that is
            # down (restarting) now would otherwise never learn that this replica is done.
            self._report(a, step, self.loss, 0, until_answered=True)
        elif self._told_to_stop(gen):
            # The job ended before our steps did (its time budget): report where we stopped, so
            # that the final checkpoint, which waits for this report, records the steps we pushed.
            loss = loss_sum / loss_n if loss_n else self.loss
            self._report(a, step, loss, n_steps * cfg.batch_size, means.take())
        c = self._control()
        if c is not None and c.event is not None:
            return c.event
        return Event.STOP if self._stop.is_set() or step < cfg.steps else Event.FINISHED

    def _told_to_stop(self, generation: int) -> bool:
        """Whether the coordinator (not our own shutdown) has told us to stop."""
        c = self.inbox.pending(generation)
        return c is not None and c.event is Event.STOP and not self._stop.is_set()

    def _report(
        self,
        a: common_pb2.Assignment,
        step: int,
        loss: float,
        examples: int,
        scalars: dict[str, float] | None = None,
        until_answered: bool = False,
    ) -> None:
        req = cpb.ReportProgressRequest(
            member_id=self.member_id,
            member_key=self.member_key,
            replica=a.replica,
            partition=a.partition,
            step=step,
            loss=loss if np.isfinite(loss) else 0.0,
            examples=examples,
            scalars=scalars or {},  # finite means only (scalars.Means)
        )
        try:
            r = (
                self._call(self.coord.ReportProgress, req, 2.0)
                if until_answered
                else self.coord.ReportProgress(req, timeout=2.0)
            )
            if not r.keep_running:
                self.inbox.put(Control(Event.STOP))
        except grpc.RpcError:
            pass  # the coordinator is down: keep training, it will catch up from the next report
