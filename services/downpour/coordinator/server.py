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

Checkpoints are consistent by construction of the commit point: each shard
writes its part, then the coordinator verifies the files (size and crc32 as
the shard reported them, every placed block present) and writes the manifest
(atomically, last), which records a crc32 per block. A checkpoint without a
manifest never happened; one whose files no longer verify is skipped in favour
of the previous one (``downpour.checkpoints.newest_valid``). The newest
``keep_checkpoints`` are kept; uncommitted leftovers are removed.

A shard watchdog asks every shard for its blocks each second. A shard that
answers without its blocks has restarted empty: it is told to restore its part
of the newest valid checkpoint (or, before the first checkpoint, to recreate
its blocks with their initial values) while the other shards keep their state.
Progress lost on that shard is at most one checkpoint interval.
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

from downpour import checkpoint as cks
from downpour import config as jobconfig
from downpour import metrics
from downpour.coordinator.state import Checkpoint, JobState, atomic_write
from downpour.paramserver.client import ParamClient, balanced_placement
from downpour.rpc.channel import ChannelConfig
from downpour.rpc.server import Server, ServerConfig
from downpour.v1 import common_pb2, coordinator_pb2 as pb, coordinator_pb2_grpc, paramserver_pb2, \
    paramserver_pb2_grpc

log = logging.getLogger("downpour.coordinator")

MANIFEST = cks.MANIFEST
CHECKPOINT_BACKOFF = (1.0, 30.0)  # seconds before retrying a failed checkpoint: doubling, capped
FINAL_CHECKPOINT_ATTEMPTS = 4  # then the job is FAILED with the reason (1 + 2 + 4 s of backoff between)
list_manifests = cks.list_manifests  # kept here for callers that import it from the coordinator


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
        self.failed = ""  # why the job failed (its final checkpoint could not be written)
        self.shard_check_seconds = 1.0
        self.shard_down: list[bool] = [False] * len(shards)

    # ------------------------------------------------------------ shard calls
    def _client(self) -> ParamClient:
        return ParamClient(self.shards, placement=self.place, channel_config=self.chcfg,
                           worker_id="coordinator")

    def _set_optimizer(self, client: ParamClient) -> None:
        # The job spec, not each shard's flags, decides the update rule.
        for shard in client.shards:
            paramserver_pb2_grpc.ParameterServerStub(shard.channel).SetOptimizer(
                paramserver_pb2.SetOptimizerRequest(optimizer=self._optimizer()), timeout=30)

    def check_init_from(self) -> None:
        """Whether ``init_from`` can be used (from its files' headers; no values are read here).
        Raises ValueError naming the problem."""
        if not self.cfg.init_from:
            return
        from downpour.checkpoint.initfrom import check_init_from

        taken, m = check_init_from(self.cfg)
        fresh = sorted(set(self.net.param_shapes()) - set(taken))
        log.info("initial values of %d of %d blocks from checkpoint %s (step %d) in %s; fresh: %s",
                 len(taken), len(self.net.param_shapes()), m["checkpoint_id"], m["step"], self.cfg.init_from,
                 ", ".join(fresh) or "none")

    def _init_shard(self, client: ParamClient, i: int) -> None:
        """Shard i creates its own blocks (drawn from the seed, or read from init_from): the coordinator
        sends their names only and never holds a parameter (see paramserver/initial.py)."""
        names = [n for n, s in self.place.items() if s == i]
        resp = paramserver_pb2_grpc.ParameterServerStub(client.shards[i].channel).InitBlocks(
            paramserver_pb2.InitBlocksRequest(job_yaml=self.cfg.to_yaml(), names=names, overwrite=True),
            timeout=max(600.0, 60.0 + sum(_prod(self.shapes[n]) for n in names) / 5e6))
        log.info("shard %d created its %d blocks (%d from init_from)", i, len(resp.blocks), len(resp.from_checkpoint))

    def init_parameters(self) -> None:
        """Every shard creates its blocks with their initial values, under the job's optimizer."""
        with self._client() as client:
            client.wait_ready(60)
            self._set_optimizer(client)
            errors: list[BaseException] = []

            def one(i: int) -> None:
                try:
                    self._init_shard(client, i)
                except BaseException as e:  # noqa: BLE001 - re-raised below, in this thread
                    errors.append(e)
            threads = [threading.Thread(target=one, args=(i,)) for i in range(len(self.shards))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
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
        """Each shard writes its part; verified, the manifest commits the checkpoint."""
        if checkpoint_id and not cks.valid_id(checkpoint_id):
            raise ValueError(f"invalid checkpoint id {checkpoint_id!r}: letters, digits and ._- only, "
                             "not starting with a dot, at most 128 characters")
        with self._ck_lock:
            t0 = time.perf_counter()
            with self.state.lock:
                step = self.state.step
                replica_steps = [p.step for p in self.state.progress]
            ck_id = checkpoint_id or f"step-{step:08d}-{int(time.time() * 1000) % 100000:05d}"
            folder = os.path.join(self.checkpoint_dir, ck_id)
            manifest_path = os.path.join(folder, MANIFEST)
            try:
                with self._client() as client:
                    parts = [{"shard": i, "path": r.path, "num_bytes": r.num_bytes, "crc32": r.crc32,
                              "num_blocks": r.num_blocks} for i, r in enumerate(client.checkpoint(ck_id))]
                blocks = self._verify_parts(ck_id, parts)
                os.makedirs(folder, exist_ok=True)
                ck = Checkpoint(ck_id, step, manifest_path, replica_steps, parts, time.time())
                body = dict(ck.__dict__, job_id=self.state.job_id, placement=self.place,
                            config=self.cfg.to_yaml(), blocks=blocks)
                atomic_write(manifest_path, json.dumps(body, indent=1).encode())  # the commit point
            except BaseException as e:
                # Not committed: whatever the shards wrote for it goes now, so failed attempts (a full
                # disk retried for hours) leave no folders behind, and the newest committed one stays.
                if not os.path.exists(manifest_path):
                    shutil.rmtree(folder, ignore_errors=True)
                if isinstance(e, Exception):
                    metrics.CHECKPOINT_FAILURES.labels("coordinator", "disk_full" if disk_full(e) else "error").inc()
                raise
            for old in self.state.add_checkpoint(ck):
                shutil.rmtree(os.path.dirname(old.manifest_path), ignore_errors=True)
            self._remove_uncommitted(keep=ck_id)
            metrics.CHECKPOINT_SECONDS.labels("coordinator").observe(time.perf_counter() - t0)
            log.info("checkpoint %s committed at step %d", ck_id, step)
            return ck

    def _verify_parts(self, ck_id: str, parts: list[dict]) -> dict[str, dict]:
        """The shards' files as written: sizes and crc32s as reported, every placed block there.

        A shard that restarted empty between its last push and this checkpoint
        would otherwise commit a checkpoint without its blocks.
        """
        paths = {}
        for p in parts:
            path = p["path"]
            if not os.path.isfile(path):  # the shard wrote to a path we do not see: the conventional one
                path = os.path.join(self.checkpoint_dir, ck_id, f"shard-{p['shard']}.ckpt")
            crc, size = cks.file_crc32(path)
            if crc != p["crc32"] or size != p["num_bytes"]:
                raise CheckpointFailed(f"checkpoint {ck_id}: shard {p['shard']}'s file does not match what it reported")
            paths[p["shard"]] = path
        table = cks.block_table(paths)
        missing = [n for n in self.place if n not in table or table[n]["shard"] != self.place[n]]
        if missing:
            raise CheckpointFailed(f"checkpoint {ck_id}: {len(missing)} block(s) missing on their shards "
                                   f"(e.g. {missing[0]!r}); a shard is being refilled")
        return table

    def _remove_uncommitted(self, keep: str) -> None:
        """Folders the shards wrote for a checkpoint that was never committed (a coordinator died mid-way)."""
        committed = {os.path.basename(os.path.dirname(c.manifest_path)) for c in self.state.checkpoints}
        try:
            names = os.listdir(self.checkpoint_dir)
        except OSError:
            return
        for name in names:
            folder = os.path.join(self.checkpoint_dir, name)
            if name in committed or name == keep or not os.path.isdir(folder):
                continue
            if not os.path.exists(os.path.join(folder, MANIFEST)):
                shutil.rmtree(folder, ignore_errors=True)

    # ----------------------------------------------------------- shard watchdog
    def check_shards(self, client: ParamClient) -> list[int]:
        """Refill every shard that answers without its blocks; returns the shards refilled."""
        if not self.state.initialized:
            return []
        refilled = []
        for i, shard in enumerate(client.shards):
            try:
                have = {b.name for b in shard.list_blocks(paramserver_pb2.ListBlocksRequest(), timeout=2.0).blocks}
            except grpc.RpcError:
                if not self.shard_down[i]:
                    log.warning("shard %d at %s is not answering; waiting for it", i, shard.address)
                self.shard_down[i] = True
                continue
            if self.shard_down[i]:
                log.info("shard %d at %s answers again", i, shard.address)
            self.shard_down[i] = False
            want = {n for n, s in self.place.items() if s == i}
            if want <= have:
                continue
            log.warning("shard %d at %s lacks %d of its %d blocks (restarted?): refilling it", i, shard.address,
                        len(want - have), len(want))
            with self._ck_lock:  # no checkpoint while a shard is being refilled
                self._refill(client, i)
            refilled.append(i)
        return refilled

    def _refill(self, client: ParamClient, i: int) -> None:
        shard = client.shards[i]
        bad: tuple[str, ...] = ()
        while True:
            m = cks.newest_valid(self.checkpoint_dir, exclude=bad)
            if m is None or m.get("placement", self.place) != self.place:
                break
            try:
                shard.restore(paramserver_pb2.RestoreRequest(checkpoint_id=m["checkpoint_id"]), timeout=60)
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.NOT_FOUND):
                    log.warning("shard %d cannot restore %s (%s); trying an older checkpoint", i,
                                m["checkpoint_id"], e.details())
                    bad += (m["checkpoint_id"],)
                    continue
                raise
            paramserver_pb2_grpc.ParameterServerStub(shard.channel).SetOptimizer(
                paramserver_pb2.SetOptimizerRequest(optimizer=self._optimizer()), timeout=30)
            metrics.COORDINATOR_SHARD_RECOVERIES.labels(str(i), "checkpoint").inc()
            log.info("shard %d restored from checkpoint %s (step %d)", i, m["checkpoint_id"], m["step"])
            return
        # No usable checkpoint yet: the shard's blocks start again from their initial values.
        paramserver_pb2_grpc.ParameterServerStub(shard.channel).SetOptimizer(
            paramserver_pb2.SetOptimizerRequest(optimizer=self._optimizer()), timeout=30)
        self._init_shard(client, i)
        metrics.COORDINATOR_SHARD_RECOVERIES.labels(str(i), "initial").inc()
        log.info("shard %d refilled with initial values (no checkpoint yet)", i)

    def watch_shards(self) -> None:
        """The watchdog thread: ``check_shards`` every ``shard_check_seconds``."""
        client = ParamClient(self.shards, placement=self.place, channel_config=self.chcfg, worker_id="coordinator",
                             timeout=60)
        try:
            while not self._stop.wait(self.shard_check_seconds):
                try:
                    self.check_shards(client)
                except (grpc.RpcError, OSError, cks.CheckpointInvalid) as e:
                    log.warning("refilling a shard failed, will retry: %s", e.details() if hasattr(e, "details") else e)
        finally:
            client.close()

    def background(self) -> None:
        """Periodic checkpoints, and the last one when the job reaches its step count.

        The interval counts the steps of all replicas together (``checkpoint_every``
        per replica): a replica that stalls (its worker died) does not hold the
        checkpoints back while the others train, so a shard that dies never
        loses more than one interval of updates.

        A checkpoint that fails (a full disk, a shard away) is retried with
        exponential backoff while training goes on; the previous committed one
        stays the newest. The final one is tried ``FINAL_CHECKPOINT_ATTEMPTS``
        times; then the job is FAILED with the reason, rather than retried forever.
        """
        def total() -> int:
            with self.state.lock:
                return sum(p.step for p in self.state.progress)

        last = sum(self.state.checkpoints[-1].replica_steps) if self.state.checkpoints else total()
        saved = time.monotonic()
        failures, final_failures, retry_at = 0, 0, 0.0
        while not self._stop.wait(0.25):
            if time.monotonic() - saved > 1.0:  # progress too, for a coordinator that restarts
                self.state.save()
                saved = time.monotonic()
            if self.failed or time.monotonic() < retry_at:
                continue
            try:
                if self.state.done:
                    if not self.succeeded:
                        if not self.state.checkpoints or self.state.checkpoints[-1].step < self.state.step:
                            self.checkpoint()
                        self.succeeded = True
                        log.info("job complete at step %d", self.state.step)
                    continue
                if total() >= last + self.cfg.checkpoint_every * self.cfg.replicas:
                    last = sum(self.checkpoint().replica_steps)
                    if failures:
                        log.info("checkpoints commit again after %d failed attempt(s)", failures)
                    failures = 0
            except (grpc.RpcError, CheckpointFailed, OSError, cks.CheckpointInvalid) as e:
                failures += 1
                why = ("the disk is full: " if disk_full(e) else "") + _why(e)
                if self.state.done:
                    final_failures += 1
                    if final_failures >= FINAL_CHECKPOINT_ATTEMPTS:
                        self.failed = (f"the final checkpoint could not be written ({final_failures} attempts); "
                                       f"last error: {why}")
                        log.error("job failed at step %d: %s", self.state.step, self.failed)
                        continue
                n = final_failures if self.state.done else failures
                delay = min(CHECKPOINT_BACKOFF[1], CHECKPOINT_BACKOFF[0] * 2 ** (n - 1))
                retry_at = time.monotonic() + delay
                log.warning("checkpoint failed (%d in a row; the newest committed one stays %s), next attempt in "
                            "%.0f s: %s", failures,
                            self.state.checkpoints[-1].checkpoint_id if self.state.checkpoints else "none", delay, why)

    def stop(self) -> None:
        self._stop.set()

    # ----------------------------------------------------------------- RPCs
    def _assignment(self, m) -> pb.Assignment | None:
        if m is None or m.replica < 0:
            return None
        rows, cols = self.cfg.grid()
        with self.state.lock:  # the generation and the peers it names, read together
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
        return common_pb2.OptimizerSpec(kind=kind, learning_rate=o.lr, eps=o.eps,
                                         initial_accumulator=o.initial_accumulator)

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
            name = pb.Role.Name(request.role) if request.role in pb.Role.values() else str(request.role)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"only workers register; got role {name}")
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
            if self.failed:
                state = pb.JOB_STATE_FAILED
            elif self.succeeded:
                state = pb.JOB_STATE_SUCCEEDED
            elif not st.initialized:
                state = pb.JOB_STATE_PENDING
            elif any(not s.member_id or s.lease_until < now for (r, _), s in st.slots.items()
                     if r in st.open_replicas()):  # replicas held back by the warm start are not missing
                state = pb.JOB_STATE_DEGRADED
            else:
                state = pb.JOB_STATE_RUNNING
            resp = pb.JobStatusResponse(job=self._job(), state=state, step=st.step, shard_addresses=self.shards,
                                        last_checkpoint_id=st.checkpoints[-1].checkpoint_id if st.checkpoints else "",
                                        examples_per_second=st.examples_per_second(), message=self.failed)
            for (r, p), s in sorted(st.slots.items()):
                resp.slots.add(replica=r, partition=p, member_id=s.member_id, address=s.address,
                               step=st.progress[r].step, loss=st.progress[r].loss,
                               seconds_since_heartbeat=(now - s.last_heartbeat) if s.member_id else -1.0)
        return resp

    def CreateCheckpoint(self, request, context):
        try:
            ck = self.checkpoint(request.checkpoint_id)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except grpc.RpcError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED if disk_full(e) else grpc.StatusCode.UNAVAILABLE,
                          f"checkpoint not committed: a shard failed to checkpoint: {e.details()}")
        except (CheckpointFailed, OSError, cks.CheckpointInvalid) as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED if disk_full(e) else grpc.StatusCode.UNAVAILABLE,
                          f"checkpoint not committed: {e}")
        return pb.CreateCheckpointResponse(checkpoint=_ck_info(ck))

    def ListCheckpoints(self, request, context):
        with self.state.lock:
            return pb.ListCheckpointsResponse(checkpoints=[_ck_info(c) for c in self.state.checkpoints])


class CheckpointFailed(Exception):
    """The shards' files did not verify: the checkpoint is not committed."""


def disk_full(e: BaseException) -> bool:
    """Whether a failed checkpoint failed for want of space (a shard's or our own write)."""
    from downpour.paramserver.server import DISK_FULL

    if isinstance(e, grpc.RpcError):
        return e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return isinstance(e, OSError) and e.errno in DISK_FULL


def _why(e: BaseException) -> str:
    return f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else str(e)


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
    manifests = cks.valid_manifests(args.checkpoint_dir) if args.resume else []
    if args.resume and not manifests:
        ap.error(f"--resume: no committed checkpoint whose files verify (no valid {MANIFEST}) "
                 f"under {args.checkpoint_dir}")
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
    threading.Thread(target=coord.background, name="checkpoints", daemon=True).start()
    threading.Thread(target=coord.watch_shards, name="shard-watchdog", daemon=True).start()
    server.set_serving()
    server.wait()
    coord.stop()
    state.save()
    return 0
