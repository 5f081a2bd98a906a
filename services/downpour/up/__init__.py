"""``downpour up``: the whole cluster as local processes on 127.0.0.1.

Starts S parameter shards, the data feeder, the coordinator, R x P model
workers and the neurons service (the live parameters, re-pulled every 5 s, for
``downpour query`` while the job trains), each its own ``downpour serve
<role>`` process on free ports; waits for their health checks; shows the
training progress per replica; restarts a child that dies (a killed worker's
slot is taken by its replacement, which resumes the replica's step); and when
the job reaches its step count or its time budget (``--max-seconds``) runs out
(the coordinator then takes the last checkpoint), or on Ctrl-C (a last
checkpoint asked for here), stops every child with SIGTERM.

The run directory (``--out``) gets the job spec (``job.yaml``), the
checkpoints, every child's log, ``metrics.json`` (loss and examples/s per
replica over time) and ``loss.png``. ``--resume DIR`` continues a run from its
last committed checkpoint, step count included.

``--secure`` runs the cluster with mutual TLS and a bearer token: a CA, a
node certificate and a token are made in ``<out>/tls`` and every child gets
them through ``DOWNPOUR_TLS_*`` / ``DOWNPOUR_TOKEN_FILE``; the launcher's own
calls (health, status, the last checkpoint) use them too.

A child that is alive but hung (stopped, deadlocked, swapped out) is treated
as dead: a watch thread asks every child's health service twice a second, and
one that has not answered for the job's ``hang_seconds`` is killed (SIGKILL)
and restarted like any child that died.

Failures are the cluster's business, not the launcher's: a shard restarted
here comes back empty and the coordinator refills it from the last valid
checkpoint; a restarted coordinator re-adopts the running cluster from its
state directory (a restart never repeats ``--resume``); workers wait for a
restarted feeder or shard and carry on.

The package, one module per concern: ``children`` (one child process), ``cluster`` (all of
them: start order, restarts, stop), ``health`` (the start-up wait and the hang watch), ``tls``
(``--secure``), ``status`` (the launcher's calls to the coordinator), ``scrape`` (the shards'
metrics), ``display`` (the terminal), ``outputs`` and ``plot`` (metrics.json, loss.png),
``checks`` (what is refused before anything starts) and ``launch`` (``run``, all of it in order).
"""

from downpour.parent import LAUNCHER_PID, die_with_launcher
from downpour.up.checks import preflight
from downpour.up.children import Child, free_port
from downpour.up.cluster import ROLE_ORDER, Cluster
from downpour.up.health import HangWatch, wait_healthy
from downpour.up.launch import run
from downpour.up.outputs import steady_rate, write_outputs
from downpour.up.status import job_status, request_checkpoint
from downpour.up.tls import secure_setup

__all__ = [
    "LAUNCHER_PID",
    "ROLE_ORDER",
    "Child",
    "Cluster",
    "HangWatch",
    "die_with_launcher",
    "free_port",
    "job_status",
    "preflight",
    "request_checkpoint",
    "run",
    "secure_setup",
    "steady_rate",
    "wait_healthy",
    "write_outputs",
]
