"""``downpour serve worker``: one model worker running Downpour SGD.

    downpour serve worker --coordinator H:P [--port P] [--metrics-port M] [--advertise H] [--device cpu|gpu]

The worker registers with the coordinator and gets an assignment: its replica
and partition, the parameter shards and which blocks live where, the feeder,
and the step its replica has reached. Without a free slot it waits as a spare
and heartbeats until one frees up. It then runs the Downpour loop
(``worker.loop``) from that step, reporting progress, and heartbeats in the
background: a coordinator that says STOP ends it (exit 0), one that gives it a
new slot restarts the loop there, one that does not know it (it restarted
without our membership) gets a fresh registration. A coordinator that is
down does not stop training: the loop carries on and heartbeats retry.

A parameter shard that is down or restarting makes pulls and pushes retry
with backoff (``PARAM_RETRY_SECONDS``); a feeder that is down makes the batch
stream reconnect. If either stays away past its deadline, the worker gives
its slot back and takes one again (a fresh start at its replica's step)
instead of exiting.

With ``--device gpu`` the network runs on CuPy (``downpour.kernels``): each
pull's parameters are copied to the GPU once, gradients accumulate there and
are copied back once per push. Without CuPy or a visible GPU the worker stops
at start with the reason (exit 2). Model-parallel partitions (grids other
than 1x1) compute on the CPU only: a GPU worker given such a slot stops with
that reason.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time

import grpc
import numpy as np

from downpour import config as jobconfig
from downpour import device as devices
from downpour import metrics
from downpour.rpc.channel import ChannelConfig, open_channel
from downpour.rpc.server import Server, ServerConfig
from downpour.v1 import coordinator_pb2 as cpb, coordinator_pb2_grpc, worker_pb2, worker_pb2_grpc
from downpour.worker.exchange import Mailbox, PeerLinks, PeerLost, drive, serve_exchange
from downpour.worker.loop import DownpourLoop

log = logging.getLogger("downpour.worker")

PARAM_TIMEOUT_SECONDS = 30.0  # one pull or push attempt
PARAM_RETRY_SECONDS = 120.0  # retrying a shard that is down, before giving the slot back


def head_only(grads: dict) -> dict:
    """The gradients with every block but the softmax head's zeroed: a step that trains the head alone
    (Adagrad and SGD leave a block with a zero gradient exactly where it is)."""
    return {k: v if k.startswith("head.") else v * 0 for k, v in grads.items()}


class Stop(Exception):
    """The coordinator ended this worker's part in the job."""


class Reassigned(Exception):
    """The coordinator moved this worker to another slot."""


class Worker(worker_pb2_grpc.ModelWorkerServicer):
    def __init__(self, coordinator: str, address: str, chcfg: ChannelConfig, device: str = "cpu", xp=np):
        self.coordinator_addr, self.address, self.chcfg, self.device = coordinator, address, chcfg, device
        self.xp = xp  # numpy, or cupy for --device gpu (checked at start by downpour.device)
        self.coord = coordinator_pb2_grpc.CoordinatorStub(open_channel(coordinator, chcfg))
        self.member_id = ""
        self.assignment = None
        self.job = None
        self.state = worker_pb2.WORKER_STATE_WAITING
        self.step = 0
        self.loss = float("nan")
        self.rate = 0.0
        self.lease = 5.0
        self._pending: str | None = None  # "stop" or "reassign", set by the heartbeat thread
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.mailbox = Mailbox()  # halos from the other partitions of our replica
        self.halo_timeout = 30.0  # a peer silent this long is lost: the replica resynchronises

    # ------------------------------------------------------------- RPCs
    def Status(self, request, context):
        r = worker_pb2.StatusResponse(member_id=self.member_id, state=self.state, step=self.step, loss=self.loss,
                                      examples_per_second=self.rate, device=self.device)
        if self.assignment is not None:
            r.assignment.CopyFrom(self.assignment)
        return r

    def Exchange(self, request_iterator, context):
        return serve_exchange(self.mailbox, request_iterator, context)

    # ------------------------------------------------------- coordinator
    def _call(self, fn, request, timeout: float = 5.0):
        """A coordinator call retried with backoff until it answers or we are stopped."""
        delay = 0.1
        while not self._stop.is_set():
            try:
                return fn(request, timeout=timeout)
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    raise
                log.info("coordinator unavailable (%s); retrying in %.1fs", e.code().name, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 2.0)
        raise Stop()

    def register(self) -> None:
        r = self._call(self.coord.Register, cpb.RegisterRequest(role=cpb.ROLE_WORKER, address=self.address,
                                                                member_id=self.member_id))
        self.member_id, self.job, self.lease = r.member_id, r.job, r.lease_seconds or 5.0
        self.assignment = r.assignment if r.HasField("assignment") else None

    def heartbeat_loop(self) -> None:
        while not self._stop.wait(max(0.2, self.lease / 4)):
            if not self.member_id:
                continue
            try:
                r = self.coord.Heartbeat(cpb.HeartbeatRequest(member_id=self.member_id, step=self.step), timeout=2.0)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    self._pending = "reregister"  # a coordinator that lost us: register again
                continue  # coordinator down: keep training, try again later
            metrics.WORKER_HEARTBEATS.inc()
            if r.action == cpb.ACTION_STOP:
                self._pending = "stop"
            elif r.action == cpb.ACTION_REASSIGN or (
                    r.action == cpb.ACTION_CONTINUE and r.HasField("assignment") and self.assignment is not None
                    and r.assignment.generation != self.assignment.generation):
                # A new slot, or a peer partition of our replica was replaced: restart there.
                with self._lock:
                    self.assignment = r.assignment
                self._pending = "reassign"

    def wait_for_slot(self) -> None:
        while self.assignment is None:
            self.state = worker_pb2.WORKER_STATE_WAITING
            if self._pending == "stop":
                raise Stop()
            if self._pending in ("reassign", "reregister"):
                if self._pending == "reregister":
                    self.register()
                self._pending = None
                continue
            self._stop.wait(0.2)

    # ------------------------------------------------------------ training
    def train_once(self) -> None:
        """Run the current assignment until its replica is done or we are moved."""
        from downpour.feeder.client import batch_stream
        from downpour.nn import Network
        from downpour.paramserver.client import ParamClient

        a = self.assignment
        cfg = jobconfig.from_yaml(self.job.spec_yaml)
        xp = self.xp
        if xp is not np and a.num_partitions > 1:
            raise devices.DeviceError(f"--device gpu: this job's replicas are split into {cfg.partitions} partitions, "
                                      "and model-parallel partitions compute on the CPU only; run this worker "
                                      "with --device cpu or the job with partitions 1x1")
        net = Network(cfg.network_spec(), xp=xp)
        placement = {b.name: b.shard for b in a.blocks}
        names = [b.name for b in a.blocks]
        client = ParamClient(list(a.shard_addresses), placement=placement, channel_config=self.chcfg,
                             worker_id=self.member_id or self.address, timeout=PARAM_TIMEOUT_SECONDS,
                             retry_deadline=PARAM_RETRY_SECONDS, shared=cfg.shared_memory,
                             wire_dtype=cfg.wire_dtype)
        supervised = cfg.supervised
        links = None
        cur = {"step": int(a.start_step)}

        if a.num_partitions > 1:
            # Model parallelism: this worker computes its tile of every layer and
            # trades halos with the other partitions of the replica.
            from downpour.nn import to_internal
            from downpour.partition import PartitionRuntime, plan

            rows, cols = cfg.grid()
            pl = plan(cfg.network_spec(), rows, cols)
            peers = {q.partition: q.address for q in a.peers if q.partition != a.partition}
            if len(peers) < a.num_partitions - 1:
                log.info("replica %d partition %d: waiting for %d more partition(s) to join", a.replica,
                         a.partition, a.num_partitions - 1 - len(peers))
                client.close()
                # The coordinator bumps the replica's generation when a slot fills.
                while self._pending is None and not self._stop.is_set():
                    self._stop.wait(0.2)
                return
            self.mailbox.reset(a.generation, a.replica, a.partition)
            links = PeerLinks(peers, self.chcfg)
            runtime = PartitionRuntime(pl, a.partition, replica=a.replica, generation=a.generation)
            y0, y1, x0, x1 = pl.tile(0, a.partition)

            def compute(params, x, y):
                tile = to_internal(np, x)[y0:y1, x0:x1]
                gen = (runtime.supervised(params, tile, y, cur["step"]) if supervised
                       else runtime.tica(params, tile, cur["step"]))
                res = drive(gen, links, self.mailbox, a.generation, cur["step"], self.halo_timeout,
                            cancelled=lambda: self._pending is not None or self._stop.is_set())
                return res.loss, head_only(res.grads) if cur["step"] < cfg.head_only_steps else res.grads
        else:
            on_device = {"host": None, "params": None}

            def compute(params, x, y):
                # The loop hands us the same host dict until its next pull: copy it to the device once.
                if params is not on_device["host"]:
                    on_device["host"], on_device["params"] = params, devices.to_device(xp, params)
                if supervised:
                    loss, grads, _ = net.supervised(on_device["params"], x, y)
                    if cur["step"] < cfg.head_only_steps:
                        grads = head_only(grads)
                else:
                    loss, grads, _ = net.tica(on_device["params"], x)
                return loss, grads

        batches = batch_stream(a.feeder_address, a.replica, a.num_replicas, cfg.batch_size,
                               start_batch=int(a.start_step), with_labels=supervised, seed=cfg.seed,
                               channel_config=self.chcfg)
        loop = DownpourLoop(compute, client, names, batches, cfg.n_fetch, cfg.n_push, schedule=cfg.schedule,
                            to_host=None if xp is np else devices.to_host)
        self.state = worker_pb2.WORKER_STATE_TRAINING
        step = int(a.start_step)
        self.step = step
        log.info("replica %d partition %d: training from step %d to %d", a.replica, a.partition, step, cfg.steps)
        last_report, t_rate, n_rate = 0.0, time.perf_counter(), 0
        loss_sum, loss_n = 0.0, 0  # report the mean loss since the last report: less noise than one batch
        try:
            first = True
            n_steps = 0
            while step < cfg.steps:
                if self._pending in ("stop", "reassign", "reregister") or self._stop.is_set():
                    break
                cur["step"] = step
                res = loop.step(step, first=first)
                first = False
                step += 1
                n_steps += 1
                self.step, self.loss = step, res.loss
                n_rate += res.examples
                loss_sum, loss_n = loss_sum + res.loss, loss_n + 1
                metrics.WORKER_STEPS.inc()
                metrics.WORKER_EXAMPLES.inc(res.examples)
                metrics.TRAINING_LOSS.labels(str(a.replica)).set(res.loss)
                now = time.perf_counter()
                if now - last_report > 0.25 or step == cfg.steps:
                    self.rate = n_rate / max(now - t_rate, 1e-9)
                    t_rate, n_rate, last_report = now, 0, now
                    loop.flush()  # what we report as done has reached the shards
                    self._report(a, step, loss_sum / loss_n, n_steps * cfg.batch_size)
                    loss_sum, loss_n, n_steps = 0.0, 0, 0
        finally:
            if links is not None:
                links.close()
            loop.close()
            client.close()
            batches.close() if hasattr(batches, "close") else None
        if step >= cfg.steps:
            # The last report is the one the job's completion waits for: a coordinator that is
            # down (restarting) now would otherwise never learn that this replica is done.
            self._report(a, step, self.loss, 0, until_answered=True)

    def _report(self, a, step: int, loss: float, examples: int, until_answered: bool = False) -> None:
        req = cpb.ReportProgressRequest(member_id=self.member_id, replica=a.replica, partition=a.partition, step=step,
                                        loss=loss if np.isfinite(loss) else 0.0, examples=examples)
        try:
            r = self._call(self.coord.ReportProgress, req, 2.0) if until_answered else \
                self.coord.ReportProgress(req, timeout=2.0)
            if not r.keep_running:
                self._pending = self._pending or "stop"
        except grpc.RpcError:
            pass  # the coordinator is down: keep training, it will catch up from the next report

    def _resync(self) -> None:
        """Give our slot back and take it again: the replica gets a new generation."""
        gen = self.assignment.generation if self.assignment is not None else -1
        try:
            self._call(self.coord.Deregister, cpb.DeregisterRequest(member_id=self.member_id))
        except grpc.RpcError:
            pass
        self.assignment = None
        self.register()
        # Wait (bounded) until the peers' heartbeats can see the new generation too.
        deadline = time.monotonic() + self.lease
        while self.assignment is not None and self.assignment.generation == gen and time.monotonic() < deadline:
            self._stop.wait(0.2)

    def run(self) -> int:
        from downpour.feeder.client import FeederUnavailable

        threading.Thread(target=self.heartbeat_loop, name="heartbeat", daemon=True).start()
        try:
            self.register()
            while True:
                self.wait_for_slot()
                try:
                    self.train_once()
                except (grpc.RpcError, FeederUnavailable) as e:
                    # A shard or the feeder stayed away past the retry deadline:
                    # start over in a fresh generation rather than exit.
                    what = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else str(e)
                    log.warning("training interrupted (%s); taking the slot again", what)
                    if self._pending == "stop":
                        raise Stop() from None
                    self._pending = None
                    self._stop.wait(1.0)
                    self._resync()
                    continue
                except PeerLost as e:
                    if self._pending is None:
                        # Nobody moved: ask for a fresh generation so that every
                        # partition of the replica restarts together.
                        log.warning("%s; resynchronising the replica", e)
                        self._resync()
                    else:
                        log.info("replica changed while exchanging halos (%s); restarting the step", self._pending)
                    if self._pending == "stop":
                        raise Stop() from None
                    if self._pending == "reassign":
                        self._pending = None
                    continue
                if self._pending == "reassign":
                    self._pending = None
                    continue
                if self._pending == "reregister":
                    self._pending = None
                    self.assignment = None
                    self.register()
                    continue
                # Our replica is done: wait for the coordinator to end the job.
                self.state = worker_pb2.WORKER_STATE_PAUSED
                while self._pending not in ("stop", "reassign") and not self._stop.is_set():
                    self._stop.wait(0.2)
                if self._pending == "reassign":
                    self._pending = None
                    continue
                raise Stop()
        except Stop:
            self.state = worker_pb2.WORKER_STATE_STOPPED
            log.info("stopped by the coordinator at step %d", self.step)
            return 0
        finally:
            self._stop.set()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="downpour serve worker", description=__doc__.splitlines()[0])
    ServerConfig.add_arguments(ap, port=0)
    ap.add_argument("--coordinator", required=True, help="the coordinator's address (host:port)")
    ap.add_argument("--advertise", default="", help="host name peers reach this worker at (default: this host)")
    ap.add_argument("--device", default="cpu", choices=devices.DEVICES,
                    help="compute device: cpu (NumPy) or gpu (CuPy, one CUDA GPU)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    try:
        xp = devices.array_module(args.device)
    except devices.DeviceError as e:
        print(f"downpour serve worker: {e}", file=sys.stderr, flush=True)
        return 2
    log.info("computing on %s", devices.describe(xp))
    scfg = ServerConfig.from_args(args)
    server = Server("worker", scfg)
    chcfg = scfg.channel_config()
    host = args.advertise or ("127.0.0.1" if args.host in ("127.0.0.1", "localhost") else socket.gethostname())
    worker = Worker(args.coordinator, "", chcfg, args.device, xp)
    server.add(lambda s: worker_pb2_grpc.add_ModelWorkerServicer_to_server(worker, s), "downpour.v1.ModelWorker")
    port = server.start()
    worker.address = f"{host}:{port}"
    server.set_serving()
    done = threading.Event()
    result = {"code": 0}

    def train():
        try:
            result["code"] = worker.run()
        except Exception:  # noqa: BLE001 - log, exit non-zero so a supervisor restarts us
            log.exception("training failed")
            result["code"] = 1
        finally:
            done.set()
            server.stop(grace=1.0)

    threading.Thread(target=train, name="train", daemon=True).start()
    server.wait()
    worker._stop.set()
    if not done.wait(10):
        log.warning("training did not stop within 10 s of shutdown")
    # I/O threads still retrying a pull or push against a dead peer would hold
    # the interpreter's exit (it joins every executor thread, daemon or not): a
    # stopped worker exits now, whatever they are waiting for. The last push
    # was flushed by the loop if it could be.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(result["code"])
