"""The ``downpour`` command.

    downpour model --preset small [--json]     layer shapes, parameters, FLOPs
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


def _cmd_serve(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: downpour serve {%s} [options]" % ",".join(ROLES))
        return 0 if argv else 2
    role = argv[0]
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
