"""``downpour model``: a preset's layers, parameters and FLOPs, or (``--plan``) each process's
expected peak memory for a job of it against this machine's memory."""

from __future__ import annotations

import argparse
import json
from typing import Any

from downpour import config as jobconfig
from downpour import jobflags, memplan
from downpour.nn import presets
from downpour.nn.summary import format_summary, summarize


def add_model_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``downpour model`` to a ``downpour`` subparsers object."""
    m = subparsers.add_parser("model", help="print a preset's layers, parameters and FLOPs")
    m.add_argument("--preset", default="small", help="tiny, small, medium or le2012")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.add_argument(
        "--plan",
        action="store_true",
        help="each process's expected peak memory for a job of this model (with the job's "
        "replicas, partitions, shards and batch size below), against this machine's memory",
    )
    m.add_argument("--config", help="with --plan: the job config (YAML) to plan for")
    jobflags.add_layout_flags(m, ("replicas", "partitions", "shards", "batch_size"), prefix="with --plan: ")
    m.add_argument("--no-neurons", action="store_true", help="with --plan: without the neurons service")
    m.add_argument(
        "--memory",
        metavar="SIZE",
        help="with --plan: plan for a machine of this memory (e.g. 24G) instead of this one's",
    )
    m.set_defaults(func=_cmd_model)
    return m


def _cmd_model(args: argparse.Namespace) -> int:
    if args.plan:
        return _print_plan(args)
    spec = presets.get(args.preset)
    info = summarize(spec)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_summary(args.preset, info))
    return 0


def _print_plan(args: argparse.Namespace) -> int:
    cfg = jobconfig.load(
        args.config,
        overrides=jobflags.overrides(args, ("preset", "replicas", "shards", "partitions", "batch_size")),
    )
    p = memplan.plan(cfg, neurons=not args.no_neurons)
    have, where = memplan.machine_memory(args.memory or "")
    if args.json:
        print(json.dumps(dict(p.to_dict(), machine_bytes=have, machine_source=where), indent=2))
        return 0
    print(p.format())
    verdict = "fits" if p.total <= have else "does NOT fit"
    print(f"this machine: {memplan._fmt(have)} ({where}): the job {verdict}")
    if p.total > have:
        fit = memplan.smallest_layout(cfg, have, neurons=not args.no_neurons)
        if fit is None:
            print(f"no layout puts every process in {memplan._fmt(have)}")
        else:
            fp, machines = fit
            print(
                f"smallest layout that fits: {fp.layout()} on {machines} machine(s) of {memplan._fmt(have)} "
                f"(largest process {memplan._fmt(fp.largest.total)}, all together {memplan._fmt(fp.total)})"
            )
    return 0
