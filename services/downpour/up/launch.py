"""``downpour up`` from start to finish: the checks, the cluster, the watch over it, the
progress loop, the last checkpoint on Ctrl-C, and the run's outputs."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import grpc

from downpour import config as jobconfig
from downpour.rpc.channel import ChannelConfig
from downpour.up.checks import check_runnable
from downpour.up.cluster import Cluster
from downpour.up.display import Display, WarningsToLog
from downpour.up.health import HangWatch
from downpour.up.outputs import write_outputs
from downpour.up.scrape import scrape_shards
from downpour.up.status import job_status, request_checkpoint, snapshot
from downpour.up.tls import secure_setup
from downpour.v1 import coordinator_pb2


def run(
    cfg: jobconfig.JobConfig,
    out: str,
    resume: bool = False,
    quiet: bool = False,
    start_timeout: float = 90.0,
    secure: bool = False,
    neurons: bool = True,
    memory: str = "",
) -> int:
    """Run a job to its step count (or to the end of its time budget). Returns a process exit code.

    ``memory`` (e.g. "24G") replaces the memory this machine has in the fit check."""
    check_runnable(cfg, resume, neurons, memory)
    show = Display(quiet)  # restarts and failures are always told; quiet drops the rest
    env, chcfg = secure_setup(os.path.abspath(out)) if secure else ({}, None)
    cluster = Cluster(cfg, out, resume, env, chcfg, neurons=neurons)
    history: list[dict[str, Any]] = []
    interrupted = False
    watch: HangWatch | None = None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupted
        interrupted = True

    old = signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    with WarningsToLog(cluster.logs):
        try:
            show.say(
                f"[bold]downpour up[/]: {cfg.replicas} replicas x {cfg.partitions} partitions, "
                f"{cfg.shards} shards, {cfg.steps} steps"
                + (f" or {cfg.max_seconds:g} s of training, whichever ends first" if cfg.max_seconds else "")
                + f", run dir {cluster.out}"
                + (" (mutual TLS and a bearer token per role: certificates and tokens in tls/)" if secure else "")
            )
            cluster.start(start_timeout)
            watch = HangWatch(cluster.children, cfg.hang_seconds, chcfg, start_timeout)
            watch.start()
            _tell_addresses(show, cluster, secure)
            code = _follow(cluster, watch, show, chcfg, history, lambda: interrupted)
            if interrupted:
                code = 130
                _last_checkpoint(cluster, show, chcfg)
        except (RuntimeError, TimeoutError) as e:
            show.tell(f"[red]downpour up failed[/]: {e}; logs in {cluster.logs}")
            code = 1
        finally:
            if watch is not None:
                watch.stop()
            shard_metrics = scrape_shards(cluster.children, chcfg)
            cluster.stop()
            signal.signal(signal.SIGINT, old)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            write_outputs(cluster.out, history, cfg, shard_metrics, checkpoint_dir=cluster.ckpt_dir)
    if code == 0 and history:
        last = history[-1]
        losses = ", ".join(f"{r['loss']:.4g}" for r in last["replicas"])
        why = (
            f" (its time budget of {cfg.max_seconds:g} s ran out at step {last['end_step']})"
            if last.get("ended_by") == "time_budget"
            else ""
        )
        show.say(
            f"done: step {last['step']}{why}, final loss per replica {losses}; "
            f"checkpoints, metrics.json, loss.png and filters.png in {cluster.out}"
        )
    return code


def _tell_addresses(show: Display, cluster: Cluster, secure: bool) -> None:
    """Where the coordinator and the neurons service answer, and the commands that ask them."""
    assert cluster.coordinator is not None  # started by cluster.start
    addr = cluster.coordinator.address
    show.say(f"coordinator at {addr}  (downpour status --coordinator {addr})")
    if cluster.neurons is not None:
        show.say(
            f"neurons at {cluster.neurons.address}  (downpour query --addr {cluster.neurons.address} "
            "--image F --layer stage3.output"
            + (
                " --ca tls/ca.pem --cert tls/node.pem --key tls/node.key --token-file tls/token-reader)"
                if secure
                else ")"
            )
        )


def _follow(
    cluster: Cluster,
    watch: HangWatch,
    show: Display,
    chcfg: ChannelConfig | None,
    history: list[dict[str, Any]],
    interrupted: Callable[[], bool],
) -> int:
    """Poll the job until it ends (0), fails (1) or ``interrupted()``; restart what died meanwhile."""
    cfg = cluster.cfg
    assert cluster.coordinator is not None  # started by cluster.start
    with show.progress(cfg.replicas, cfg.steps, cfg.max_seconds) as bars:
        while not interrupted():
            while watch.events:
                show.tell(f"[yellow]hung[/] {watch.events.pop(0)}")
            for what in cluster.supervise():
                show.tell(f"[yellow]restarted[/] {what}")
            try:
                status = job_status(cluster.coordinator.address, chcfg=chcfg)
            except grpc.RpcError:
                time.sleep(0.5)
                continue
            snap = snapshot(status)
            history.append(snap)
            bars.update(snap)
            if status.state == coordinator_pb2.JOB_STATE_SUCCEEDED:
                return 0
            if status.state == coordinator_pb2.JOB_STATE_FAILED:
                show.tell(
                    f"[red]downpour up failed[/]: the job failed at step {status.step}: "
                    f"{status.message}; logs in {cluster.logs}"
                )
                return 1
            time.sleep(0.25)
    return 0


def _last_checkpoint(cluster: Cluster, show: Display, chcfg: ChannelConfig | None) -> None:
    """On Ctrl-C (or SIGTERM): one more checkpoint before every child stops."""
    show.tell("[yellow]interrupted[/]: checkpointing and stopping every service")
    if cluster.coordinator is None:  # interrupted before the coordinator existed
        return
    try:
        request_checkpoint(cluster.coordinator.address, chcfg=chcfg)
    except grpc.RpcError as e:
        show.tell(
            f"[red]the last checkpoint was not written[/] ({e.code().name}: {e.details()}); "
            "the newest committed one is kept"
        )
