"""The ``downpour`` command.

    downpour model --preset small [--json]     layer shapes, parameters, FLOPs
    downpour up [options]                      the whole cluster as local processes
    downpour status --coordinator ADDR         a running cluster's state
    downpour query --addr ADDR --image F ...   neuron activations from a neurons service
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

    spec = presets.get(args.preset)
    info = summarize(spec)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_summary(args.preset, info))
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
               neurons=not args.no_neurons)


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="downpour", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("model", help="print a preset's layers, parameters and FLOPs")
    m.add_argument("--preset", default="small", help="tiny, small or le2012")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=_cmd_model)

    u = sub.add_parser("up", help="run the whole cluster as local processes and train")
    u.add_argument("--config", help="job config (YAML); flags and DOWNPOUR_* variables override it")
    u.add_argument("--preset", help="network preset: tiny, small (default) or le2012")
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
    u.add_argument("--no-neurons", action="store_true",
                   help="do not start the neurons service (by default it serves the live parameters)")
    u.set_defaults(func=_cmd_up)

    st = sub.add_parser("status", help="the state of a running cluster")
    st.add_argument("--coordinator", default="127.0.0.1:7070", help="the coordinator's address")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_status)

    from downpour.client import add_query_parser
    from downpour.evals import add_eval_parser

    add_query_parser(sub)
    add_eval_parser(sub)

    sub.add_parser("serve", help="run one service: " + ", ".join(ROLES), add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `serve` forwards everything after the role to the service's own parser.
    if argv and argv[0] == "serve":
        return _cmd_serve(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError) as e:
        print(f"downpour {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
