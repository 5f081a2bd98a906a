"""How many BLAS/OpenMP threads each child of ``downpour up`` may start.

NumPy's BLAS starts one thread per core in every process. ``downpour up``
runs every replica's worker, the shards, the feeder and the coordinator on
one host, so on a small machine the workers' BLAS threads outnumber the cores
several times over, and OpenBLAS's spinning threads then wait on each other:
measured on a 2-core machine, 2 workers of the faces eval's network took
0.44 s a step with the default threads and 0.09 s with one thread each
(docs/operations.md). So each worker gets an equal share of the cores; the
other children, which do little BLAS work, keep the library's default (one
thread each measured a few percent slower on a 1-replica job); a variable the
user has set is left alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def threads_env(role: str, workers: int, environ: Mapping[str, str] | None = None, ncores: int | None = None) -> dict:
    """The thread variables for one child of ``role`` among ``workers`` workers on this host:
    a worker's share of the cores; empty for other roles and when the user set any of them
    (their choice stands)."""
    environ = os.environ if environ is None else environ
    if role != "worker" or any(v in environ for v in VARIABLES):
        return {}
    n = max(1, (ncores or cores()) // max(1, workers))
    return {v: str(n) for v in VARIABLES}
