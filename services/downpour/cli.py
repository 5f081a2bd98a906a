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
import sys

from downpour.parent import die_with_launcher

ROLES = ("coordinator", "paramserver", "worker", "feeder", "neurons")

# Each command's module, imported only when that command is asked for (all of them for the
# full --help or a mistyped command). Imported together they take ~2 s on a loaded machine
# (grpc, protobuf, the explorer's web stack, the evaluations): `downpour --help` measured 2.0 s,
# `downpour serve --help` 0.07 s, and every service process starts through this module
# (`downpour serve`, which needs none of them). command -> (module, function adding its parser).
COMMANDS: dict[str, tuple[str, str]] = {
    "model": ("downpour.model_command", "add_model_parser"),
    "up": ("downpour.up.command", "add_up_parser"),
    "status": ("downpour.up.command", "add_status_parser"),
    "query": ("downpour.client", "add_query_parser"),
    "export": ("downpour.export", "add_export_parser"),
    "explore": ("downpour.neurons.explore_cli", "add_explore_parser"),
    "eval": ("downpour.evals.cli", "add_eval_parser"),
}


def _cmd_serve(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: downpour serve {{{','.join(ROLES)}}} [options]")
        return 0 if argv else 2
    role = argv[0]
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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``downpour`` parser; with ``command`` one of COMMANDS, only that command's (see COMMANDS)."""
    p = argparse.ArgumentParser(prog="downpour", description=(__doc__ or "").splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, (module, add_parser) in COMMANDS.items():
        if command in COMMANDS and name != command:
            continue
        getattr(importlib.import_module(module), add_parser)(sub)
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
