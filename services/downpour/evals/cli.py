"""The ``downpour eval`` command: its sub-commands and their arguments.

    downpour eval faces [--positives DIR] [--checkpoint DIR]   the object-neuron table, curves and report.html
    downpour eval supervised [--data D]        linear on features / from random / fine-tuned

``add_eval_parser(subparsers)`` adds both to the ``downpour`` command;
``main`` runs them alone (``python -m downpour.evals``).
"""

from __future__ import annotations

import argparse

from downpour.evals import faces, supervised


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``downpour eval {faces,supervised}`` to a ``downpour`` subparsers object."""
    e = subparsers.add_parser("eval", help="reproduce the paper's evaluations (faces, supervised)")
    sub = e.add_subparsers(dest="eval_command", required=True)
    f = sub.add_parser("faces", help="best single face (or any category) neuron vs baselines, by identity; report.html")
    faces.add_arguments(f)
    f.set_defaults(func=faces.cmd)
    s = sub.add_parser("supervised", help="unsupervised pretraining then supervised fine-tuning")
    supervised.add_arguments(s)
    s.set_defaults(func=supervised.cmd)
    return e


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="downpour")
    add_eval_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return int(args.func(args) or 0)
