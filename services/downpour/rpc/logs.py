"""The services' ``--log-level`` flag and the one log format they write to stderr."""

from __future__ import annotations

import argparse
import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_log_level_argument(ap: argparse.ArgumentParser) -> None:
    """``--log-level`` (debug, info, warning, ...; any case), info by default."""
    ap.add_argument("--log-level", default="info")


def configure(level: str) -> None:
    """Log to stderr at ``level`` (a name in any case) in the services' format."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format=FORMAT)
