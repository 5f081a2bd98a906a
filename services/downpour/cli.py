"""The ``downpour`` command.

    downpour model --preset small [--json]     layer shapes, parameters, FLOPs
    downpour model --preset P --plan [--replicas R --partitions RxC --shards S]   memory per process
    downpour up [options]                      the whole cluster as local processes
    downpour status --coordinator ADDR         a running cluster's state
    downpour query --addr ADDR --image F ...   neuron activations from a neurons service
    downpour export --checkpoint DIR --format {safetensors,npz} --out FILE   weights, self-describing
    downpour explore --addr ADDR | --checkpoint DIR   the neuron explorer web page
    downpour eval {faces,supervised}           the paper's experiments
    downpour serve <role> [options]            run one service (paramserver, ...)

Each role lives in ``downpour.<role>.server`` and exposes ``main(argv)``; this
module only dispatches, so that a service's flags stay next to its code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

ROLES = ("coordinator", "paramserver", "worker", "feeder", "neurons")


def _cmd_model(args: argparse.Namespace) -> int:
    from downpour.nn import presets
    from downpour.nn.summary import summarize, format_summary

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
    from downpour import config as jobconfig
    from downpour import memplan

    cfg = jobconfig.load(args.config, overrides={"preset": args.preset, "replicas": args.replicas,
                                                 "shards": args.shards, "partitions": args.partitions,
                                                 "batch_size": args.batch_size})
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
            print(f"smallest layout that fits: {fp.layout()} on {machines} machine(s) of {memplan._fmt(have)} "
                  f"(largest process {memplan._fmt(fp.largest.total)}, all together {memplan._fmt(fp.total)})")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    import os
    import time as _time

    from downpour import config as jobconfig
    from downpour.up import run

    overrides = {"preset": args.preset, "replicas": args.replicas, "shards": args.shards, "steps": args.steps,
                 "data": args.data, "partitions": args.partitions, "batch_size": args.batch_size,
                 "init_from": args.init_from, "device": args.device}
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
        out = args.out or os.path.join("runs", _time.strftime("%Y%m%d-%H%M%S"))
    return run(cfg, out, resume=bool(args.resume), quiet=args.quiet, secure=args.secure,
               neurons=not args.no_neurons, memory=args.memory or "")


def _cmd_status(args: argparse.Namespace) -> int:
    from downpour.up import job_status
    from downpour.v1 import coordinator_pb2

    st = job_status(args.coordinator, timeout=5.0)
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(st, preserving_proto_field_name=True), indent=2))
        return 0
    print(f"job {st.job.job_id}: {coordinator_pb2.JobState.Name(st.state)}, step {st.step}/{st.job.max_steps}, "
          f"{st.examples_per_second:.0f} examples/s, last checkpoint {st.last_checkpoint_id or '-'}")
    if st.message:
        print(f"why: {st.message}")
    print("shards: " + ", ".join(st.shard_addresses))
    print(f"{'replica':>7} {'part':>4} {'step':>7} {'loss':>10} {'heartbeat':>10}  member @ address")
    for s in st.slots:
        hb = f"{s.seconds_since_heartbeat:.1f}s" if s.seconds_since_heartbeat >= 0 else "-"
        print(f"{s.replica:>7} {s.partition:>4} {s.step:>7} {s.loss:>10.4g} {hb:>10}  "
              f"{s.member_id or '(free)'} @ {s.address or '-'}")
    return 0


def _cmd_serve(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: downpour serve {%s} [options]" % ",".join(ROLES))
        return 0 if argv else 2
    role = argv[0]
    from downpour.up import die_with_launcher

    die_with_launcher()
    if role not in ROLES:
        print(f"downpour serve: unknown role {role!r}; choose one of {', '.join(ROLES)}", file=sys.stderr)
        return 2
    try:
        mod = importlib.import_module(f"downpour.{role}.server")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith(f"downpour.{role}"):
            print(f"downpour serve: the {role} service is not available in this build", file=sys.stderr)
            return 2
        raise
    return int(mod.main(argv[1:]) or 0)


# Commands whose parsers import nothing heavy: for them the others' parsers (which import the
# explorer's web stack and the evaluations) are left out, so that e.g. `downpour up` refusing a job
# that does not fit answers in about a second even on a loaded machine.
LIGHT = ("model", "up", "status")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="downpour", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("model", help="print a preset's layers, parameters and FLOPs")
    m.add_argument("--preset", default="small", help="tiny, small, medium or le2012")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.add_argument("--plan", action="store_true",
                   help="each process's expected peak memory for a job of this model (with the job's "
                        "replicas, partitions, shards and batch size below), against this machine's memory")
    m.add_argument("--config", help="with --plan: the job config (YAML) to plan for")
    m.add_argument("--replicas", type=int, help="with --plan: model replicas")
    m.add_argument("--partitions", help="with --plan: model-parallel grid per replica, RxC")
    m.add_argument("--shards", type=int, help="with --plan: parameter server shards")
    m.add_argument("--batch-size", type=int, help="with --plan: examples per minibatch")
    m.add_argument("--no-neurons", action="store_true", help="with --plan: without the neurons service")
    m.add_argument("--memory", metavar="SIZE", help="with --plan: plan for a machine of this memory (e.g. 24G) "
                                                    "instead of this one's")
    m.set_defaults(func=_cmd_model)

    u = sub.add_parser("up", help="run the whole cluster as local processes and train")
    u.add_argument("--config", help="job config (YAML); flags and DOWNPOUR_* variables override it")
    u.add_argument("--preset", help="network preset: tiny, small (default), medium or le2012")
    u.add_argument("--replicas", type=int, help="model replicas (data parallelism)")
    u.add_argument("--shards", type=int, help="parameter server shards")
    u.add_argument("--partitions", help="model-parallel grid per replica, RxC")
    u.add_argument("--steps", type=int, help="minibatch steps per replica")
    u.add_argument("--batch-size", type=int, help="examples per minibatch")
    u.add_argument("--data", help="'default' (bundled), a folder of images, .npy/.npz or IDX")
    u.add_argument("--init-from", metavar="DIR",
                   help="start from the newest checkpoint in DIR (its blocks this model shares, e.g. "
                        "runs/a/checkpoints under a supervised head); the rest fresh")
    u.add_argument("--device", choices=["cpu", "gpu"],
                   help="where workers and the neurons service compute: cpu (default) or gpu (CuPy)")
    u.add_argument("--out", help="run directory (default runs/<time>)")
    u.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    u.add_argument("--quiet", action="store_true", help="no progress display")
    u.add_argument("--secure", action="store_true", help="mutual TLS and a bearer token between every service")
    u.add_argument("--memory", metavar="SIZE",
                   help="the memory the job may use (e.g. 24G); default: what this machine has available. "
                        "A job whose memory plan does not fit is refused before anything starts")
    u.add_argument("--no-neurons", action="store_true",
                   help="do not start the neurons service (by default it serves the live parameters)")
    u.set_defaults(func=_cmd_up)

    st = sub.add_parser("status", help="the state of a running cluster")
    st.add_argument("--coordinator", default="127.0.0.1:7070", help="the coordinator's address")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_status)

    if command not in LIGHT:
        from downpour.client import add_query_parser
        from downpour.evals.cli import add_eval_parser
        from downpour.export import add_export_parser
        from downpour.neurons.explorer import add_explore_parser

        add_query_parser(sub)
        add_export_parser(sub)
        add_explore_parser(sub)
        add_eval_parser(sub)

    sub.add_parser("serve", help="run one service: " + ", ".join(ROLES), add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `serve` forwards everything after the role to the service's own parser.
    if argv and argv[0] == "serve":
        return _cmd_serve(argv[1:])
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError) as e:
        print(f"downpour {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
