"""The messages the coordinator answers with, built from its configuration and state, and the
gauges of a replica's reported objective."""

from __future__ import annotations

from downpour import config as jobconfig
from downpour import metrics, optim, scalars
from downpour.coordinator.ending import STEPS, TIME_BUDGET
from downpour.coordinator.state import Checkpoint
from downpour.v1 import common_pb2
from downpour.v1 import coordinator_pb2 as pb


def job_spec(c: jobconfig.JobConfig, job_id: str, num_shards: int, checkpoint_dir: str) -> common_pb2.JobSpec:
    """The job as every member sees it."""
    rows, cols = c.grid()
    return common_pb2.JobSpec(
        job_id=job_id,
        spec_yaml=c.to_yaml(),
        num_replicas=c.replicas,
        partition_rows=rows,
        partition_cols=cols,
        num_shards=num_shards,
        optimizer=optim.to_proto(c.optimizer),
        n_fetch=c.n_fetch,
        n_push=c.n_push,
        batch_size=c.batch_size,
        max_steps=c.steps,
        dataset=c.data,
        supervised=c.supervised,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every_steps=c.checkpoint_every,
        seed=c.seed,
        max_seconds=c.max_seconds,
    )


# ``ending``'s reasons on the wire
END_REASONS = {STEPS: pb.END_REASON_STEPS, TIME_BUDGET: pb.END_REASON_TIME_BUDGET}


def checkpoint_info(ck: Checkpoint) -> pb.CheckpointInfo:
    info = pb.CheckpointInfo(
        checkpoint_id=ck.checkpoint_id, step=ck.step, manifest_path=ck.manifest_path, created_unix_seconds=ck.created
    )
    for s in ck.shards:
        info.shards.add(shard=s["shard"], path=s["path"], num_bytes=s["num_bytes"], crc32=s["crc32"])
    return info


def export_scalars(replica: str, named: dict[str, float]) -> None:
    """One replica's objective terms and weight norms as gauges (``downpour.scalars.gauges``)."""
    terms, norms = scalars.gauges(named)
    for stage, term, v in terms:
        metrics.OBJECTIVE_TERM.labels(replica, stage, term).set(v)
    for stage, block, stat, v in norms:
        metrics.WEIGHT_NORM.labels(replica, stage, block, stat).set(v)
