"""``downpour serve coordinator``: membership, assignment, checkpoints, job state.

    downpour serve coordinator --config job.yaml --shards H:P,H:P --feeder H:P \
        --state-dir DIR --checkpoint-dir DIR [--resume]

On a fresh start it creates the network's parameter blocks on the shards
(size-balanced placement); with ``--resume`` it restores them from the newest
committed checkpoint instead and continues every replica's step count; when
``--state-dir`` already holds a previous coordinator's state it re-adopts the
running cluster without touching the shards.

Checkpoints are consistent by construction of the commit point: each shard
writes its part, then the coordinator writes the manifest (atomically, last).
A checkpoint without a manifest never happened.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import threading
import time

import grpc

from downpour import config as jobconfig
from downpour import metrics
from downpour.coordinator.state import Checkpoint, JobState, atomic_write
from downpour.paramserver.client import ParamClient, balanced_placement
from downpour.rpc.channel import ChannelConfig
from downpour.rpc.server import Server, ServerConfig
from downpour.v1 import common_pb2, coordinator_pb2 as pb, coordinator_pb2_grpc, paramserver_pb2, \
    paramserver_pb2_grpc

log = logging.getLogger("downpour.coordinator")

MANIFEST = "MANIFEST.json"


def list_manifests(checkpoint_dir: str) -> list[dict]:
    """Committed checkpoints in ``checkpoint_dir``, oldest first (those with a readable manifest)."""
    found = []
    if not os.path.isdir(checkpoint_dir):
        return found
    for name in sorted(os.listdir(checkpoint_dir)):
        path = os.path.join(checkpoint_dir, name, MANIFEST)
        try:
            with open(path, encoding="utf-8") as f:
                found.append(json.load(f))
        except (OSError, ValueError):
            continue  # no manifest or a torn one: not committed
    found.sort(key=lambda m: (m["step"], m["created"]))
    return found


class Coordinator(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, state: JobState, shards: list[str], feeder: str, checkpoint_dir: str,
                 channel_config: ChannelConfig | None = None):
        self.state = state
        self.cfg = state.cfg
        self.shards = shards
        self.feeder = feeder
        self.checkpoint_dir = checkpoint_dir
        self.chcfg = channel_config or ChannelConfig()
        self.spec = self.cfg.network_spec()
        from downpour.nn import Network

        self.net = Network(self.spec)
        rows, cols = self.cfg.grid()
        self.plan = None
        if rows * cols > 1:
            # Model parallelism: every partition owns its own blocks of each layer.
            from downpour.partition import block_shapes, plan

            self.plan = plan(self.spec, rows, cols)
            self.shapes = block_shapes(self.plan)
        else:
            self.shapes = self.net.param_shapes()
        self.place = balanced_placement({k: _prod(s) for k, s in self.shapes.items()}, len(shards))
        self._ck_lock = threading.Lock()
        self._stop = threading.Event()
        self.succeeded = False

    # ------------------------------------------------------------ shard calls
    def _client(self) -> ParamClient:
        return ParamClient(self.shards, placement=self.place, channel_config=self.chcfg,
                           worker_id="coordinator")

    def _set_optimizer(self, client: ParamClient) -> None:
        # The job spec, not each shard's flags, decides the update rule.
        for shard in client.shards:
            paramserver_pb2_grpc.ParameterServerStub(shard.channel).SetOptimizer(
                paramserver_pb2.SetOptimizerRequest(optimizer=self._optimizer()), timeout=30)

    def init_parameters(self) -> None:
        """Create every block on its shard with fresh initial values and the job's optimizer."""
        with self._client() as client:
            client.wait_ready(60)
            self._set_optimizer(client)
            params = self.net.init_params(self.cfg.seed)
            if self.plan is not None:
                from downpour.partition import split_params

                params = split_params(self.plan, params)
            client.init(params, overwrite=True)
        self.state.initialized = True
        self.state.save()

    def restore(self, manifest: dict) -> None:
        """Every shard loads its part of a committed checkpoint; replicas resume at its steps."""
        with self._client() as client:
            client.wait_ready(60)
            client.restore(manifest["checkpoint_id"])
            self._set_optimizer(client)
        self.state.adopt_checkpoint(Checkpoint(
            manifest["checkpoint_id"], manifest["step"], manifest["manifest_path"], manifest["replica_steps"],
            manifest["shards"], manifest["created"]))

    def checkpoint(self, checkpoint_id: str = "") -> Checkpoint:
        """Each shard writes its part, then the manifest commits the checkpoint."""
        with self._ck_lock:
            t0 = time.perf_counter()
            with self.state.lock:
                step = self.state.step
                replica_steps = [p.step for p in self.state.progress]
            ck_id = checkpoint_id or f"step-{step:08d}-{int(time.time() * 1000) % 100000:05d}"
            with self._client() as client:
                parts = [{"shard": i, "path": r.path, "num_bytes": r.num_bytes, "crc32": r.crc32,
                          "num_blocks": r.num_blocks} for i, r in enumerate(client.checkpoint(ck_id))]
            folder = os.path.join(self.checkpoint_dir, ck_id)
            os.makedirs(folder, exist_ok=True)
            manifest_path = os.path.join(folder, MANIFEST)
            ck = Checkpoint(ck_id, step, manifest_path, replica_steps, parts, time.time())
            body = dict(ck.__dict__, job_id=self.state.job_id, placement=self.place,
                        config=self.cfg.to_yaml())
            atomic_write(manifest_path, json.dumps(body, indent=1).encode())  # the commit point
            for old in self.state.add_checkpoint(ck):
                shutil.rmtree(os.path.dirname(old.manifest_path), ignore_errors=True)
            metrics.CHECKPOINT_SECONDS.labels("coordinator").observe(time.perf_counter() - t0)
            log.info("checkpoint %s committed at step %d", ck_id, step)
            return ck

    def background(self) -> None:
        """Periodic checkpoints, and the last one when the job reaches its step count."""
        last = self.state.checkpoints[-1].step if self.state.checkpoints else self.state.step
        while not self._stop.wait(0.25):
            try:
                if self.state.done:
                    if not self.succeeded:
                        if not self.state.checkpoints or self.state.checkpoints[-1].step < self.state.step:
                            self.checkpoint()
                        self.succeeded = True
                        log.info("job complete at step %d", self.state.step)
                    continue
                if self.state.step >= last + self.cfg.checkpoint_every:
                    last = self.checkpoint().step
            except grpc.RpcError as e:
                log.warning("checkpoint failed, will retry: %s", e.details() if hasattr(e, "details") else e)

    def stop(self) -> None:
        self._stop.set()

    # ----------------------------------------------------------------- RPCs
    def _assignment(self, m) -> pb.Assignment | None:
        if m is None or m.replica < 0:
            return None
        rows, cols = self.cfg.grid()
        a = common_pb2.Assignment(
            job_id=self.state.job_id, generation=self.state.replica_generation[m.replica], replica=m.replica,
            partition=m.partition,
            num_replicas=self.cfg.replicas, num_partitions=rows * cols,
            shard_addresses=self.shards, feeder_address=self.feeder,
            start_step=self.state.replica_start[m.replica])
        for p, addr in self.state.peers(m.replica):
            a.peers.add(partition=p, address=addr)
        names = self.plan.blocks_pulled(m.partition) if self.plan is not None else list(self.shapes)
        for name in names:
            shape = self.shapes[name]
            a.blocks.add(name=name, shard=self.place[name], num_elements=int(_prod(shape)), shape=list(shape))
        return a

    def _optimizer(self) -> common_pb2.OptimizerSpec:
        o = self.cfg.optimizer
        kind = {"adagrad": common_pb2.OPTIMIZER_KIND_ADAGRAD, "sgd": common_pb2.OPTIMIZER_KIND_SGD}[o.kind]
        return common_pb2.OptimizerSpec(kind=kind, learning_rate=o.lr, eps=o.eps)

    def _job(self) -> common_pb2.JobSpec:
        c = self.cfg
        rows, cols = c.grid()
        return common_pb2.JobSpec(
            job_id=self.state.job_id, spec_yaml=c.to_yaml(), num_replicas=c.replicas, partition_rows=rows,
            partition_cols=cols, num_shards=len(self.shards),
            optimizer=self._optimizer(),
            n_fetch=c.n_fetch, n_push=c.n_push, batch_size=c.batch_size, max_steps=c.steps, dataset=c.data,
            supervised=c.supervised, checkpoint_dir=self.checkpoint_dir, checkpoint_every_steps=c.checkpoint_every,
            seed=c.seed)

    def Register(self, request, context):
        if request.role not in (pb.ROLE_WORKER, pb.ROLE_UNSPECIFIED):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"only workers register; got role {pb.Role.Name(request.role)}")
        if not request.address:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "register needs the worker's address (host:port)")
        m = self.state.register(request.address, request.member_id)
        metrics.COORDINATOR_MEMBERS.set(len(self.state.members))
        resp = pb.RegisterResponse(member_id=m.member_id, job=self._job(), lease_seconds=self.cfg.lease_seconds)
        a = self._assignment(m)
        if a is not None:
            resp.assignment.CopyFrom(a)
            log.info("member %s at %s -> replica %d partition %d", m.member_id, m.address, m.replica, m.partition)
        return resp

    def Deregister(self, request, context):
        self.state.deregister(request.member_id)
        return pb.DeregisterResponse()

    def Heartbeat(self, request, context):
        metrics.COORDINATOR_HEARTBEATS.inc()
        action, m = self.state.heartbeat(request.member_id, request.step)
        actions = {"continue": pb.ACTION_CONTINUE, "reassign": pb.ACTION_REASSIGN, "wait": pb.ACTION_PAUSE,
                   "stop": pb.ACTION_STOP}
        if action == "unknown":
            context.abort(grpc.StatusCode.NOT_FOUND, f"member {request.member_id!r} is not registered; register again")
        if action == "reassign":
            log.info("member %s at %s -> replica %d partition %d (slot freed)", m.member_id, m.address, m.replica,
                     m.partition)
        resp = pb.HeartbeatResponse(action=actions[action], lease_seconds=self.cfg.lease_seconds)
        if action in ("reassign", "continue"):
            a = self._assignment(m)
            if a is not None:
                resp.assignment.CopyFrom(a)
        return resp

    def ReportProgress(self, request, context):
        keep = self.state.report(request.member_id, request.step, request.loss, request.examples)
        metrics.TRAINING_LOSS.labels(str(request.replica)).set(request.loss)
        return pb.ReportProgressResponse(keep_running=keep)

    def JobStatus(self, request, context):
        st = self.state
        with st.lock:
            now = st.clock()
            if self.succeeded:
                state = pb.JOB_STATE_SUCCEEDED
            elif not st.initialized:
                state = pb.JOB_STATE_PENDING
            elif any(not s.member_id or s.lease_until < now for s in st.slots.values()):
                state = pb.JOB_STATE_DEGRADED
            else:
                state = pb.JOB_STATE_RUNNING
            resp = pb.JobStatusResponse(job=self._job(), state=state, step=st.step, shard_addresses=self.shards,
                                        last_checkpoint_id=st.checkpoints[-1].checkpoint_id if st.checkpoints else "",
                                        examples_per_second=st.examples_per_second())
            for (r, p), s in sorted(st.slots.items()):
                resp.slots.add(replica=r, partition=p, member_id=s.member_id, address=s.address,
                               step=st.progress[r].step, loss=st.progress[r].loss,
                               seconds_since_heartbeat=(now - s.last_heartbeat) if s.member_id else -1.0)
        return resp

    def CreateCheckpoint(self, request, context):
        try:
            ck = self.checkpoint(request.checkpoint_id)
        except grpc.RpcError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"a shard failed to checkpoint: {e.details()}")
        return pb.CreateCheckpointResponse(checkpoint=_ck_info(ck))

    def ListCheckpoints(self, request, context):
        with self.state.lock:
            return pb.ListCheckpointsResponse(checkpoints=[_ck_info(c) for c in self.state.checkpoints])


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _ck_info(ck: Checkpoint) -> pb.CheckpointInfo:
    info = pb.CheckpointInfo(checkpoint_id=ck.checkpoint_id, step=ck.step, manifest_path=ck.manifest_path,
                             created_unix_seconds=ck.created)
    for s in ck.shards:
        info.shards.add(shard=s["shard"], path=s["path"], num_bytes=s["num_bytes"], crc32=s["crc32"])
    return info


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
    manifests = list_manifests(args.checkpoint_dir) if args.resume else []
    if args.resume and not manifests:
        ap.error(f"--resume: no committed checkpoint (no {MANIFEST}) under {args.checkpoint_dir}")
    state = None if args.resume or not args.state_dir else JobState.load(args.state_dir)
    adopted = state is not None
    if state is None:
        state = JobState(cfg, args.state_dir or None)
    coord = Coordinator(state, shards, args.feeder, args.checkpoint_dir)
    server = Server("coordinator", ServerConfig.from_args(args))
    server.add(lambda s: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(coord, s), "downpour.v1.Coordinator")
    server.start()
    if adopted:
        log.info("re-adopted job %s at step %d from %s", state.job_id, state.step, args.state_dir)
    elif manifests:
        coord.restore(manifests[-1])
        log.info("resumed from checkpoint %s at step %d", manifests[-1]["checkpoint_id"], manifests[-1]["step"])
    else:
        coord.init_parameters()
    threading.Thread(target=coord.background, name="checkpoints", daemon=True).start()
    server.set_serving()
    server.wait()
    coord.stop()
    state.save()
    return 0
