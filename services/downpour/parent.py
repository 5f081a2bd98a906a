"""The child's side of ``downpour up``: a service started by the launcher dies with it.

Apart from ``downpour.up`` so that every service process (``downpour serve``) can call it
without importing the launcher.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

# Set by the launcher (downpour.up.children) in each child's environment: its own pid.
LAUNCHER_PID = "DOWNPOUR_LAUNCHER_PID"


def die_with_launcher() -> None:
    """In a child of ``downpour up`` (``serve`` calls this first): SIGTERM when the launcher dies.

    Done by the child itself rather than in a ``preexec_fn``: code run between fork and
    exec in a launcher with threads (gRPC's, an evaluation's) can deadlock on a lock some
    other thread held at the fork. Linux only; elsewhere Ctrl-C and the normal stop still work.
    """
    parent = os.environ.get(LAUNCHER_PID, "")
    if not parent.isdigit():
        return
    try:
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the launcher died before the signal was armed
        sys.exit(1)
