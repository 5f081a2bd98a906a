"""The flags that set a job's layout (``--replicas``, ``--shards``, ``--partitions``,
``--steps``, ``--batch-size``), for every command that takes them: ``downpour up``
and ``downpour model --plan``.

Each flag overrides the ``config.JobConfig`` field of the same name (``--batch-size``
sets ``batch_size``); a flag not given is None, which ``config.load`` skips, so the
YAML file and the ``DOWNPOUR_*`` variables still apply.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

# field -> (the flag's type, what it sets)
LAYOUT_FLAGS: dict[str, tuple[type, str]] = {
    "replicas": (int, "model replicas"),
    "shards": (int, "parameter server shards"),
    "partitions": (str, "model-parallel grid per replica, RxC"),
    "steps": (int, "minibatch steps per replica"),
    "batch_size": (int, "examples per minibatch"),
}


def add_layout_flags(ap: Any, fields: Sequence[str], prefix: str = "", notes: Mapping[str, str] | None = None) -> None:
    """Add the flags of ``fields`` (keys of ``LAYOUT_FLAGS``) to an argparse parser, in that
    order; each help is ``prefix``, what the flag sets, then its entry in ``notes``."""
    for name in fields:
        kind, what = LAYOUT_FLAGS[name]
        ap.add_argument("--" + name.replace("_", "-"), type=kind, help=prefix + what + (notes or {}).get(name, ""))


def overrides(args: argparse.Namespace, fields: Sequence[str]) -> dict[str, Any]:
    """The job fields ``fields`` as the flags set them (None where a flag was not given), for
    ``config.load(..., overrides=...)``."""
    return {name: getattr(args, name) for name in fields}
