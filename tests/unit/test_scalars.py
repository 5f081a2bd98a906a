"""Named training scalars: the worker's means, the coordinator's validation and bounds, the per-replica
view and the gauges, and the loop handing a step's info on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from downpour import config as jobconfig
from downpour import metrics, scalars
from downpour.coordinator.messages import export_scalars
from downpour.coordinator.state import JobState
from downpour.optim import OptimizerConfig
from downpour.worker.loop import NO_INFO, DownpourLoop, LocalStore


def test_means_average_each_key_over_its_own_steps_and_drop_non_finite():
    m = scalars.Means()
    m.add({"stage1.reconstruction": 2.0, "stage1.sparsity": np.float32(1.0)})
    m.add({"stage1.reconstruction": 4.0, "stage1.sparsity": float("nan"), "stage1.dead": float("inf")})
    m.add({"stage1.reconstruction": np.array([1.0, 2.0]), "stage1.dense": "x"})  # not scalars: skipped
    m.add(None)
    assert m.take() == {"stage1.reconstruction": 3.0, "stage1.sparsity": 1.0}
    assert m.take() == {}  # started over


def test_means_keep_only_valid_keys():
    m = scalars.Means()
    m.add({"stage2.W1.norm_mean": 1.5, "accuracy": 0.5, "loss": 3.0, "stage1/x": 1.0, "stageX.y": 1.0})
    assert m.take() == {"stage2.W1.norm_mean": 1.5, "accuracy": 0.5}


@pytest.mark.parametrize(
    "key, ok",
    [
        ("stage1.reconstruction", True),
        ("stage12.W2.norm_max", True),
        ("accuracy", True),
        ("stage1.", False),
        ("stage1.a b", False),
        ("Stage1.x", False),
        ("accuracy2", False),
        ("stage1." + "x" * 80, False),
    ],
)
def test_key_pattern(key, ok):
    assert scalars.valid(key) is ok


def test_clean_is_bounded_and_keeps_the_job_stages():
    many = {f"stage1.t{i:04d}": float(i) for i in range(1000)}
    kept = scalars.clean(many)
    assert len(kept) == scalars.MAX_KEYS
    assert scalars.clean({"stage1.a": 1.0, "stage3.a": 2.0, "accuracy": 0.1}, stages=2) == {
        "stage1.a": 1.0,
        "accuracy": 0.1,
    }
    bad: dict = {"stage1.a": math.nan, "stage1.b": "1"}
    assert scalars.clean(bad) == {}


def test_combine_adds_shares_and_takes_extremes():
    a = {"stage1.reconstruction": 1.0, "stage1.sparsity": 0.5, "stage1.dead": 0.2, "stage1.W1.norm_min": 0.9}
    b = {"stage1.reconstruction": 3.0, "stage1.sparsity": 0.5, "stage1.dead": 0.4, "stage1.W1.norm_min": 0.7}
    b["stage1.W1.norm_max"] = 2.0
    got = scalars.combine([a, b, {}])
    assert got == pytest.approx(
        {
            "stage1.reconstruction": 4.0,
            "stage1.sparsity": 1.0,
            "stage1.dead": 0.3,
            "stage1.W1.norm_min": 0.7,
            "stage1.W1.norm_max": 2.0,
        }
    )
    assert scalars.combine([a]) == a and scalars.combine([a]) is not a
    assert scalars.combine([]) == {}


def test_ratios_stages_and_gauge_series():
    s = {
        "stage1.reconstruction": 2.0,
        "stage1.sparsity": 1.0,
        "stage2.reconstruction": 0.0,
        "stage2.sparsity": 1.0,
        "stage10.dead": 0.5,
        "stage1.W1.norm_mean": 1.0,
        "stage1.W2.rms": 0.1,
        "stage1.W1.other": 3.0,
        "accuracy": 0.9,
    }
    r = scalars.with_ratios(s)
    assert r["stage1.ratio"] == 0.5 and "stage2.ratio" not in r  # no ratio over a zero reconstruction
    assert list(scalars.by_stage(s)) == ["stage1", "stage2", "stage10"]
    terms, norms = scalars.gauges(s)
    assert ("stage1", "ratio", 0.5) in terms and ("stage10", "dead", 0.5) in terms
    assert sorted(norms) == [("stage1", "W1", "mean", 1.0), ("stage1", "W2", "rms", 0.1)]


def _state(partitions: str = "1x1") -> JobState:
    cfg = jobconfig.JobConfig(replicas=2, steps=100, partitions=partitions)
    return JobState(cfg)


def test_coordinator_keeps_each_slots_latest_scalars():
    st = _state()
    m = st.register("a:1")
    assert st.report(m.member_id, 5, 1.0, 10, {"stage1.reconstruction": 2.0, "stage1.sparsity": 1.0, "bad key": 1})
    assert st.slot_scalars[(m.replica, m.partition)] == {"stage1.reconstruction": 2.0, "stage1.sparsity": 1.0}
    st.report(m.member_id, 6, 1.0, 10)  # a report without scalars keeps the last ones
    assert st.replica_scalars(m.replica) == {"stage1.reconstruction": 2.0, "stage1.sparsity": 1.0}
    st.report(m.member_id, 7, 1.0, 10, {"stage1.reconstruction": 4.0, "stage9.dead": 0.5})  # stage9: not in the job
    assert st.replica_scalars(m.replica) == {"stage1.reconstruction": 4.0}
    assert st.replica_scalars(1 - m.replica) == {}


def test_coordinator_combines_a_model_parallel_replicas_tiles():
    st = _state("1x2")
    a, b = st.register("a:1"), st.register("b:1")
    assert (a.replica, b.replica) == (0, 0) and {a.partition, b.partition} == {0, 1}
    st.report(a.member_id, 1, 1.0, 1, {"stage1.reconstruction": 1.0, "stage1.dense": 0.2})
    st.report(b.member_id, 1, 1.0, 1, {"stage1.reconstruction": 2.0, "stage1.dense": 0.4})
    assert st.replica_scalars(0) == pytest.approx({"stage1.reconstruction": 3.0, "stage1.dense": 0.3})


def test_export_sets_the_objective_and_norm_gauges():
    export_scalars("7", {"stage1.reconstruction": 4.0, "stage1.sparsity": 1.0, "stage1.W2.norm_max": 1.25})
    assert metrics.OBJECTIVE_TERM.labels("7", "stage1", "ratio")._value.get() == 0.25
    assert metrics.OBJECTIVE_TERM.labels("7", "stage1", "reconstruction")._value.get() == 4.0
    assert metrics.WEIGHT_NORM.labels("7", "stage1", "W2", "max")._value.get() == 1.25


def _batches():
    while True:
        yield np.ones((2, 1), np.float32), None


def test_the_loop_hands_a_steps_info_on_and_takes_two_tuples_too():
    store = LocalStore({"w": np.zeros(1, np.float32)}, OptimizerConfig(lr=0.1))
    info = {"stage1.reconstruction": 1.0}
    loop = DownpourLoop(lambda p, x, y: (0.5, {"w": np.ones(1, np.float32)}, info), store, ["w"], _batches())
    assert loop.step(0, first=True).info is info
    loop.close()
    loop = DownpourLoop(lambda p, x, y: (0.5, {"w": np.ones(1, np.float32)}), store, ["w"], _batches())
    assert loop.step(0, first=True).info is NO_INFO
    loop.close()
