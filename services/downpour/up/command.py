"""``downpour up`` and ``downpour status``: their flags and what they print."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from google.protobuf.json_format import MessageToDict

from downpour import config as jobconfig
from downpour import jobflags, scalars
from downpour.up.launch import run
from downpour.up.status import job_status
from downpour.v1 import coordinator_pb2


def add_up_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``downpour up`` to a ``downpour`` subparsers object."""
    u = subparsers.add_parser("up", help="run the whole cluster as local processes and train")
    u.add_argument("--config", help="job config (YAML); flags and DOWNPOUR_* variables override it")
    u.add_argument("--preset", help="network preset: tiny, small (default), medium or le2012")
    jobflags.add_layout_flags(
        u, ("replicas", "shards", "partitions", "steps", "batch_size"), notes={"replicas": " (data parallelism)"}
    )
    # Not a layout flag (jobflags.LAYOUT_FLAGS are shared with ``downpour model --plan``, where a
    # time budget means nothing): the job's max_seconds, for ``up`` alone.
    u.add_argument(
        "--max-seconds",
        type=float,
        metavar="S",
        help="train for at most S wall-clock seconds, counted from the first step (start-up does not "
        "count); the job then ends as at --steps, which stays the upper bound. 0: no limit",
    )
    u.add_argument("--data", help="'default' (bundled), a folder of images, .npy/.npz or IDX")
    u.add_argument(
        "--init-from",
        metavar="DIR",
        help="start from the newest checkpoint in DIR (its blocks this model shares, e.g. "
        "runs/a/checkpoints under a supervised head); the rest fresh",
    )
    u.add_argument(
        "--device",
        choices=["cpu", "gpu"],
        help="where workers and the neurons service compute: cpu (default) or gpu (CuPy)",
    )
    u.add_argument("--out", help="run directory (default runs/<time>)")
    u.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    u.add_argument("--quiet", action="store_true", help="no progress display")
    u.add_argument("--secure", action="store_true", help="mutual TLS and a bearer token between every service")
    u.add_argument(
        "--memory",
        metavar="SIZE",
        help="the memory the job may use (e.g. 24G); default: what this machine has available. "
        "A job whose memory plan does not fit is refused before anything starts",
    )
    u.add_argument(
        "--no-neurons",
        action="store_true",
        help="do not start the neurons service (by default it serves the live parameters)",
    )
    u.set_defaults(func=_cmd_up)
    return u


def add_status_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``downpour status`` to a ``downpour`` subparsers object."""
    st = subparsers.add_parser("status", help="the state of a running cluster")
    st.add_argument("--coordinator", default="127.0.0.1:7070", help="the coordinator's address")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_status)
    return st


def _cmd_up(args: argparse.Namespace) -> int:
    overrides = jobflags.overrides(
        args,
        (
            "preset",
            "replicas",
            "shards",
            "steps",
            "max_seconds",
            "data",
            "partitions",
            "batch_size",
            "init_from",
            "device",
        ),
    )
    if args.resume:
        # Continue a run: its own job spec, flags on top (e.g. more --steps).
        job = os.path.join(args.resume, "job.yaml")
        if not os.path.exists(job):
            raise ValueError(f"--resume {args.resume}: no job.yaml there; is it a downpour run directory?")
        cfg = jobconfig.load(job, overrides=overrides)
        out = args.resume
        with open(job, "w", encoding="utf-8") as f:
            f.write(cfg.to_yaml())
    else:
        cfg = jobconfig.load(args.config, overrides=overrides)
        out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    return run(
        cfg,
        out,
        resume=bool(args.resume),
        quiet=args.quiet,
        secure=args.secure,
        neurons=not args.no_neurons,
        memory=args.memory or "",
    )


def _cmd_status(args: argparse.Namespace) -> int:
    st = job_status(args.coordinator, timeout=5.0)
    if args.json:
        print(json.dumps(MessageToDict(st, preserving_proto_field_name=True), indent=2))
        return 0
    print(
        f"job {st.job.job_id}: {coordinator_pb2.JobState.Name(st.state)}, step {st.step}/{st.job.max_steps}, "
        f"{st.examples_per_second:.0f} examples/s, last checkpoint {st.last_checkpoint_id or '-'}"
    )
    budget = ending_line(st)
    if budget:
        print(budget)
    if st.message:
        print(f"why: {st.message}")
    print("shards: " + ", ".join(st.shard_addresses))
    print(f"{'replica':>7} {'part':>4} {'step':>7} {'loss':>10} {'heartbeat':>10}  member @ address")
    for s in st.slots:
        hb = f"{s.seconds_since_heartbeat:.1f}s" if s.seconds_since_heartbeat >= 0 else "-"
        print(
            f"{s.replica:>7} {s.partition:>4} {s.step:>7} {s.loss:>10.4g} {hb:>10}  "
            f"{s.member_id or '(free)'} @ {s.address or '-'}"
        )
    for line in objective_lines(st):
        print(line)
    return 0


def ending_line(st: coordinator_pb2.JobStatusResponse) -> str:
    """How the training ended (its step count or its time budget, and at which step), or how much of
    its time budget it has used; empty for a job without a budget that has not ended."""
    limit = st.job.max_seconds
    if st.end_reason == coordinator_pb2.END_REASON_TIME_BUDGET:
        return f"ended on its time budget ({limit:g} s of training) at step {st.end_step}"
    if st.end_reason == coordinator_pb2.END_REASON_STEPS:
        return f"ended at its step count, step {st.end_step}, after {st.training_seconds:.1f} s of training"
    if limit > 0:
        return f"time budget: {st.training_seconds:.1f} s of {limit:g} s of training used"
    return ""


def objective_lines(st: coordinator_pb2.JobStatusResponse) -> list[str]:
    """Per replica with scalars, per stage: the sparsity/reconstruction ratio, both terms, and the
    fractions of dead and dense pooled units (a model-parallel replica's partitions combined)."""
    parts: dict[int, list[dict[str, float]]] = {}
    for s in st.slots:
        if s.scalars:
            parts.setdefault(s.replica, []).append(dict(s.scalars))
    if not parts:
        return []
    out = [f"{'replica':>7} {'stage':>6} {'sp/rec':>9} {'recon':>10} {'sparsity':>10} {'dead':>6} {'dense':>6}"]
    for r in sorted(parts):
        for stage, d in scalars.by_stage(scalars.with_ratios(scalars.combine(parts[r]))).items():

            def num(key: str, fmt: str, d: dict[str, float] = d) -> str:
                return format(d[key], fmt) if key in d else "-"

            out.append(
                f"{r:>7} {stage:>6} {num('ratio', '.4g'):>9} {num('reconstruction', '.4g'):>10} "
                f"{num('sparsity', '.4g'):>10} {num('dead', '.1%'):>6} {num('dense', '.1%'):>6}"
            )
    return out
