"""The launcher's calls to the coordinator: the job's status (and the progress snapshot taken
from it each poll) and the last checkpoint on the way out."""

from __future__ import annotations

import time
from typing import Any

from downpour import scalars
from downpour.rpc.channel import ChannelConfig, open_channel
from downpour.v1 import coordinator_pb2, coordinator_pb2_grpc


def job_status(
    address: str, timeout: float = 2.0, chcfg: ChannelConfig | None = None
) -> coordinator_pb2.JobStatusResponse:
    with open_channel(address, chcfg) as ch:
        return coordinator_pb2_grpc.CoordinatorStub(ch).JobStatus(coordinator_pb2.JobStatusRequest(), timeout=timeout)


def request_checkpoint(
    address: str, timeout: float = 60.0, chcfg: ChannelConfig | None = None
) -> coordinator_pb2.CreateCheckpointResponse:
    with open_channel(address, chcfg) as ch:
        return coordinator_pb2_grpc.CoordinatorStub(ch).CreateCheckpoint(
            coordinator_pb2.CreateCheckpointRequest(), timeout=timeout
        )


def ended_by(status: coordinator_pb2.JobStatusResponse) -> str:
    """What ended the training, as the coordinator's state names it: "steps", "time_budget", or ""
    while it goes on."""
    if status.end_reason == coordinator_pb2.END_REASON_UNSPECIFIED:
        return ""
    return coordinator_pb2.EndReason.Name(status.end_reason).removeprefix("END_REASON_").lower()


def snapshot(status: coordinator_pb2.JobStatusResponse) -> dict[str, Any]:
    """One row of the run's history (metrics.json): time, step, rate, seconds of training, what
    ended it and at which step (once it has), and each replica's step, loss and named scalars (its
    partitions' combined, as its loss is, with each stage's sparsity/reconstruction ratio:
    ``downpour.scalars``)."""
    reps: dict[int, dict[str, Any]] = {}
    parts: dict[int, list[dict[str, float]]] = {}
    for s in status.slots:
        if s.scalars:
            parts.setdefault(s.replica, []).append(dict(s.scalars))
        if s.partition == 0:
            reps[s.replica] = {"step": int(s.step), "loss": float(s.loss), "member": s.member_id}
    for r, rep in reps.items():
        rep["scalars"] = dict(sorted(scalars.with_ratios(scalars.combine(parts.get(r, []))).items()))
    n = max(reps) + 1 if reps else 0
    return {
        "time": time.time(),
        "step": int(status.step),
        "examples_per_second": float(status.examples_per_second),
        "training_seconds": float(status.training_seconds),
        "ended_by": ended_by(status),
        "end_step": int(status.end_step),
        "replicas": [reps.get(r, {"step": 0, "loss": float("nan"), "member": "", "scalars": {}}) for r in range(n)],
    }
