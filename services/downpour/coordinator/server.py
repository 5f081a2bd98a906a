"""``downpour serve coordinator``: membership, assignment, checkpoints, job state.

    downpour serve coordinator --config job.yaml --shards H:P,H:P --feeder H:P \
        --state-dir DIR --checkpoint-dir DIR [--resume]

On a fresh start it places the network's parameter blocks on the shards
(size-balanced placement) and each shard creates its own blocks' values
(InitBlocks: drawn from the job's seed, or read from ``init_from``): the
coordinator never holds a parameter; with ``--resume`` it restores them from the newest
committed checkpoint instead and continues every replica's step count; when
``--state-dir`` already holds a previous coordinator's state it re-adopts the
running cluster without touching the shards.

This module is the gRPC servicer and the process; the work is done by
``state`` (membership, leases, progress), ``params`` (the blocks, their
placement and creation), ``manager`` (the checkpoint commit protocol and its
thread) and ``supervisor`` (the shard watchdog), which reach the shards
through the ``shards.Shards`` interface; ``messages`` builds the answers.
"""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from downpour import checkpoint as cks
from downpour import config as jobconfig
from downpour import metrics, optim
from downpour.coordinator import messages
from downpour.coordinator.manager import CheckpointFailed, CheckpointManager
from downpour.coordinator.params import Parameters
from downpour.coordinator.shards import GrpcShards, ShardError, connect, disk_full
from downpour.coordinator.state import Checkpoint, JobState, Member, MemberKeyError, TooManyMembers
from downpour.coordinator.supervisor import ShardSupervisor
from downpour.paramserver.client import ParamClient
from downpour.rpc.channel import ChannelConfig
from downpour.rpc.server import Server, ServerConfig
from downpour.v1 import common_pb2, coordinator_pb2_grpc
from downpour.v1 import coordinator_pb2 as pb

log = logging.getLogger("downpour.coordinator")

# How long a stopping coordinator waits for a checkpoint in flight (under the 15 s a launcher
# gives a child between SIGTERM and SIGKILL).
STOP_SECONDS = 10.0


class Coordinator(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(
        self,
        state: JobState,
        shards: list[str],
        feeder: str,
        checkpoint_dir: str,
        channel_config: ChannelConfig | None = None,
    ):
        self.state = state
        self.cfg = state.cfg
        self.shards = shards
        self.feeder = feeder
        self.checkpoint_dir = checkpoint_dir
        self.chcfg = channel_config or ChannelConfig()
        self.params = Parameters(self.cfg, len(shards))
        self.plan = self.params.plan
        self.shapes = self.params.shapes
        self.place = self.params.place
        self.manager = CheckpointManager(state, self.place, checkpoint_dir, self._connect)
        self.supervisor = ShardSupervisor(state, self.params, checkpoint_dir, self.manager.lock)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.shard_check_seconds = 1.0

    # ------------------------------------------------------------ shard calls
    @contextmanager
    def _connect(self, **client) -> Iterator[GrpcShards]:
        with connect(
            self.shards, self.place, self._optimizer(), self.cfg.to_yaml(), channel_config=self.chcfg, **client
        ) as shards:
            yield shards

    def check_init_from(self) -> None:
        """Whether ``init_from`` can be used (from its files' headers). Raises ValueError naming the problem."""
        self.params.check_init_from()

    def init_parameters(self) -> None:
        """Every shard creates its blocks with their initial values, under the job's optimizer."""
        with self._connect() as shards:
            self.params.init_all(shards)
        self.state.initialized = True
        self.state.save()

    def restore(self, manifest: dict) -> None:
        """Every shard loads its part of a committed checkpoint; replicas resume at its steps."""
        with self._connect() as shards:
            shards.wait_ready(60)
            shards.restore_all(manifest["checkpoint_id"])
            for i in range(len(self.shards)):
                shards.set_optimizer(i)
        self.state.adopt_checkpoint(
            Checkpoint(
                manifest["checkpoint_id"],
                manifest["step"],
                manifest["manifest_path"],
                manifest["replica_steps"],
                manifest["shards"],
                manifest["created"],
            )
        )

    def checkpoint(self, checkpoint_id: str = "") -> Checkpoint:
        """Each shard writes its part; verified, the manifest commits the checkpoint (see ``manager``)."""
        return self.manager.checkpoint(checkpoint_id)

    def check_shards(self, client: ParamClient) -> list[int]:
        """Refill every shard that answers without its blocks; returns the shards refilled."""
        return self.supervisor.check(GrpcShards(client, self._optimizer(), self.cfg.to_yaml()))

    @property
    def succeeded(self) -> bool:
        return self.manager.succeeded

    @property
    def failed(self) -> str:
        return self.manager.failed

    def watch_shards(self) -> None:
        """The watchdog thread (see ``supervisor``)."""
        self.supervisor.run(self._stop, lambda: self._connect(timeout=60), self.shard_check_seconds)

    def background(self) -> None:
        """Periodic checkpoints, and the last one when the job is done (see ``manager``)."""
        self.manager.run(self._stop)

    def start_background(self) -> None:
        """The checkpoint thread and the shard watchdog."""
        self._threads = [
            threading.Thread(target=self.background, name="checkpoints", daemon=True),
            threading.Thread(target=self.watch_shards, name="shard-watchdog", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """Stop the background threads. A checkpoint in flight ends first (committed, or its files
        removed): cut short by the process exiting, it would leave an uncommitted folder behind."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)

    # ----------------------------------------------------------------- RPCs
    def _assignment(self, m) -> common_pb2.Assignment | None:
        if m is None or m.replica < 0:
            return None
        rows, cols = self.cfg.grid()
        with self.state.lock:  # the generation and the peers it names, read together
            a = common_pb2.Assignment(
                job_id=self.state.job_id,
                generation=self.state.replica_generation[m.replica],
                replica=m.replica,
                partition=m.partition,
                num_replicas=self.cfg.replicas,
                num_partitions=rows * cols,
                shard_addresses=self.shards,
                feeder_address=self.feeder,
                start_step=self.state.replica_start[m.replica],
            )
            for p, addr in self.state.peers(m.replica):
                a.peers.add(partition=p, address=addr)
        names = self.plan.blocks_pulled(m.partition) if self.plan is not None else list(self.shapes)
        for name in names:
            shape = self.shapes[name]
            a.blocks.add(name=name, shard=self.place[name], num_elements=self.params.sizes[name], shape=list(shape))
        return a

    def _optimizer(self) -> common_pb2.OptimizerSpec:
        return optim.to_proto(self.cfg.optimizer)

    def _member(self, member_id: str, key: str, context) -> Member | None:
        """The member if ``key`` is its key (None if unknown); PERMISSION_DENIED otherwise."""
        try:
            return self.state.authorize(member_id, key)
        except MemberKeyError as e:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
            raise AssertionError("context.abort returned") from None

    def Register(self, request, context):
        if request.role not in (pb.ROLE_WORKER, pb.ROLE_UNSPECIFIED):
            name = pb.Role.Name(request.role) if request.role in pb.Role.values() else str(request.role)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"only workers register; got role {name}")
        if not request.address:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "register needs the worker's address (host:port)")
        try:
            m = self.state.register(request.address, request.member_id, request.member_key)
        except MemberKeyError as e:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        except TooManyMembers as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        metrics.COORDINATOR_MEMBERS.set(len(self.state.members))
        resp = pb.RegisterResponse(
            member_id=m.member_id,
            job=messages.job_spec(self.cfg, self.state.job_id, len(self.shards), self.checkpoint_dir),
            lease_seconds=self.cfg.lease_seconds,
            member_key=m.key,
        )
        a = self._assignment(m)
        if a is not None:
            resp.assignment.CopyFrom(a)
            log.info("member %s at %s -> replica %d partition %d", m.member_id, m.address, m.replica, m.partition)
        return resp

    def Deregister(self, request, context):
        self._member(request.member_id, request.member_key, context)
        self.state.deregister(request.member_id)
        return pb.DeregisterResponse()

    def Heartbeat(self, request, context):
        metrics.COORDINATOR_HEARTBEATS.inc()
        self._member(request.member_id, request.member_key, context)
        action, m = self.state.heartbeat(request.member_id, request.step)
        actions = {
            "continue": pb.ACTION_CONTINUE,
            "reassign": pb.ACTION_REASSIGN,
            "wait": pb.ACTION_PAUSE,
            "stop": pb.ACTION_STOP,
        }
        if action == "unknown":
            context.abort(grpc.StatusCode.NOT_FOUND, f"member {request.member_id!r} is not registered; register again")
        if action == "reassign":
            log.info(
                "member %s at %s -> replica %d partition %d (slot freed)",
                m.member_id,
                m.address,
                m.replica,
                m.partition,
            )
        resp = pb.HeartbeatResponse(action=actions[action], lease_seconds=self.cfg.lease_seconds)
        if action in ("reassign", "continue"):
            a = self._assignment(m)
            if a is not None:
                resp.assignment.CopyFrom(a)
        return resp

    def ReportProgress(self, request, context):
        """Progress of the caller's own slot. Metric labels come from the member's slot, never from the
        request: a replica outside the job is INVALID_ARGUMENT, another member's slot PERMISSION_DENIED."""
        rows, cols = self.cfg.grid()
        if not (0 <= request.replica < self.cfg.replicas and 0 <= request.partition < rows * cols):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"replica {request.replica} partition {request.partition} is outside the job "
                f"({self.cfg.replicas} replicas x {rows * cols} partitions)",
            )
        m = self._member(request.member_id, request.member_key, context)
        if m is None or m.replica < 0:  # unknown, or a spare: nothing to record (as before)
            return pb.ReportProgressResponse(keep_running=not self.state.done)
        replica, partition = m.replica, m.partition
        if (replica, partition) != (request.replica, request.partition):
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"member {m.member_id!r} holds replica {replica} partition {partition}, "
                f"not replica {request.replica} partition {request.partition}",
            )
        keep = self.state.report(request.member_id, request.step, request.loss, request.examples, dict(request.scalars))
        metrics.TRAINING_LOSS.labels(str(replica)).set(request.loss)
        if request.scalars:
            messages.export_scalars(str(replica), self.state.replica_scalars(replica))
        return pb.ReportProgressResponse(keep_running=keep)

    def JobStatus(self, request, context):
        st = self.state
        with st.lock:
            now = st.clock()
            if self.failed:
                state = pb.JOB_STATE_FAILED
            elif self.succeeded:
                state = pb.JOB_STATE_SUCCEEDED
            elif not st.initialized:
                state = pb.JOB_STATE_PENDING
            elif any(
                not s.member_id or s.lease_until < now for (r, _), s in st.slots.items() if r in st.open_replicas()
            ):  # replicas held back by the warm start are not missing
                state = pb.JOB_STATE_DEGRADED
            else:
                state = pb.JOB_STATE_RUNNING
            resp = pb.JobStatusResponse(
                job=messages.job_spec(self.cfg, self.state.job_id, len(self.shards), self.checkpoint_dir),
                state=state,
                step=st.step,
                shard_addresses=self.shards,
                last_checkpoint_id=st.checkpoints[-1].checkpoint_id if st.checkpoints else "",
                examples_per_second=st.examples_per_second(),
                message=self.failed,
                end_reason=messages.END_REASONS[st.ending.reason] if st.done else pb.END_REASON_UNSPECIFIED,
                end_step=st.ending.step,
                training_seconds=st.training_seconds(),
            )
            for (r, p), s in sorted(st.slots.items()):
                resp.slots.add(
                    replica=r,
                    partition=p,
                    member_id=s.member_id,
                    address=s.address,
                    step=st.progress[r].step,
                    loss=st.progress[r].loss,
                    seconds_since_heartbeat=(now - s.last_heartbeat) if s.member_id else -1.0,
                    scalars=st.slot_scalars.get((r, p), {}),
                )
        return resp

    def CreateCheckpoint(self, request, context):
        try:
            ck = self.checkpoint(request.checkpoint_id)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except cks.CheckpointExists as e:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"checkpoint not created: {e}")
        except ShardError as e:
            if e.code == grpc.StatusCode.ALREADY_EXISTS.name:  # a shard already holds a file of that id
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"checkpoint not created: {e.details}")
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED if e.disk_full else grpc.StatusCode.UNAVAILABLE,
                f"checkpoint not committed: a shard failed to checkpoint: {e.details}",
            )
        except (CheckpointFailed, OSError, cks.CheckpointError) as e:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED if disk_full(e) else grpc.StatusCode.UNAVAILABLE,
                f"checkpoint not committed: {e}",
            )
        return pb.CreateCheckpointResponse(checkpoint=messages.checkpoint_info(ck))

    def ListCheckpoints(self, request, context):
        with self.state.lock:
            return pb.ListCheckpointsResponse(checkpoints=[messages.checkpoint_info(c) for c in self.state.checkpoints])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="downpour serve coordinator", description=__doc__.splitlines()[0])
    ServerConfig.add_arguments(ap, port=7070)
    ap.add_argument("--config", required=True, help="the job spec (YAML)")
    ap.add_argument("--shards", required=True, help="comma-separated parameter shard addresses, in shard order")
    ap.add_argument("--feeder", required=True, help="the data feeder's address")
    ap.add_argument("--state-dir", default="", help="where the coordinator keeps its state (re-adopted on restart)")
    ap.add_argument("--checkpoint-dir", required=True, help="where the shards write checkpoints and manifests go")
    ap.add_argument("--resume", action="store_true", help="restore the newest committed checkpoint")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s coordinator %(levelname)s %(message)s")
    try:
        cfg = jobconfig.load(args.config, env={})
    except (OSError, ValueError) as e:
        ap.error(str(e))
    shards = [s.strip() for s in args.shards.split(",") if s.strip()]
    if len(shards) != cfg.shards:
        ap.error(f"--shards lists {len(shards)} addresses but the job has shards={cfg.shards}")
    # --resume: a new cluster continues from the newest checkpoint; otherwise a
    # state directory left by a previous coordinator means the cluster is still
    # running and is re-adopted as it is.
    manifests = cks.valid_manifests(args.checkpoint_dir) if args.resume else []
    if args.resume and not manifests:
        ap.error(
            f"--resume: no committed checkpoint whose files verify (no valid {cks.MANIFEST}) "
            f"under {args.checkpoint_dir}"
        )
    state = None if args.resume or not args.state_dir else JobState.load(args.state_dir)
    adopted = state is not None
    if state is None:
        state = JobState(cfg, args.state_dir or None)
    scfg = ServerConfig.from_args(args)
    coord = Coordinator(state, shards, args.feeder, args.checkpoint_dir, scfg.channel_config())
    if not (adopted and state.initialized) and not manifests:
        try:  # a bad init_from stops the start-up with its reason, before anything is served
            coord.check_init_from()
        except ValueError as e:
            ap.error(str(e))
    server = Server("coordinator", scfg)
    server.add(lambda s: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(coord, s), "downpour.v1.Coordinator")
    server.start()
    if adopted and state.initialized:
        log.info("re-adopted job %s at step %d from %s", state.job_id, state.step, args.state_dir)
    elif adopted:  # the previous coordinator died before the parameters existed
        log.info("re-adopted job %s before its parameters were created: creating them", state.job_id)
        coord.init_parameters()
    elif manifests:
        coord.restore(manifests[-1])
        log.info("resumed from checkpoint %s at step %d", manifests[-1]["checkpoint_id"], manifests[-1]["step"])
    else:
        coord.init_parameters()
    coord.start_background()
    server.set_serving()
    server.wait()
    coord.stop()
    state.save()
    return 0
