"""``downpour up``'s outputs: the status snapshot's scalars, metrics.json's final_objective,
loss.png's panels and filters.png from the last checkpoint."""

from __future__ import annotations

import io
import json
import struct
from contextlib import nullcontext

import numpy as np
import pytest
from shard_fakes import FakeShards

from downpour.config import JobConfig
from downpour.coordinator.manager import CheckpointManager
from downpour.coordinator.params import Parameters
from downpour.coordinator.state import JobState
from downpour.nn.spec import FilterSpec, NetworkSpec, StageSpec
from downpour.up import filters, plot
from downpour.up.command import objective_lines
from downpour.up.display import Bars
from downpour.up.outputs import final_objective, write_outputs
from downpour.up.status import snapshot
from downpour.v1 import coordinator_pb2 as pb


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _scalars(step: int) -> dict[str, float]:
    s = {}
    for n in (1, 2):
        s[f"stage{n}.reconstruction"] = 10.0 / (step + n)
        s[f"stage{n}.sparsity"] = 1.0 + n
        s[f"stage{n}.dead"] = 0.1
        s[f"stage{n}.dense"] = 0.05
        for b in ("W1", "W2"):
            s.update({f"stage{n}.{b}.norm_mean": 1.0, f"stage{n}.{b}.norm_min": 0.5, f"stage{n}.{b}.norm_max": 2.0})
            s[f"stage{n}.{b}.rms"] = 0.1
    return s


def _status(step: int, partitions: int = 1) -> pb.JobStatusResponse:
    r = pb.JobStatusResponse(step=step, examples_per_second=100.0)
    for rep in range(2):
        for p in range(partitions):
            r.slots.add(replica=rep, partition=p, step=step, loss=3.0 / (step + 1), scalars=_scalars(step))
    return r


def test_snapshot_rows_carry_each_replicas_scalars_with_ratios():
    row = snapshot(_status(4))
    assert len(row["replicas"]) == 2
    sc = row["replicas"][1]["scalars"]
    assert sc["stage1.reconstruction"] == 2.0 and sc["stage1.ratio"] == pytest.approx(1.0)
    assert sc["stage2.W1.norm_max"] == 2.0
    # a model-parallel replica: the tiles' shares of the terms add up, fractions average
    sc = snapshot(_status(4, partitions=2))["replicas"][0]["scalars"]
    assert sc["stage1.reconstruction"] == 4.0 and sc["stage1.dead"] == pytest.approx(0.1)
    # a replica without reports yet has no scalars
    empty = snapshot(pb.JobStatusResponse(slots=[pb.SlotStatus(replica=0, partition=0, loss=float("nan"))]))
    assert empty["replicas"][0]["scalars"] == {}


def test_final_objective_per_stage_at_the_last_row():
    history = [snapshot(_status(s)) for s in range(5)]
    fo = final_objective(history)
    assert list(fo) == ["stage1", "stage2"]
    assert list(fo["stage1"])[:5] == ["reconstruction", "sparsity", "ratio", "dead", "dense"]
    assert fo["stage1"]["reconstruction"] == pytest.approx(2.0) and fo["stage2"]["ratio"] == pytest.approx(3 / (10 / 6))
    assert fo["stage1"]["W1.norm_mean"] == 1.0 and fo["stage1"]["W2.rms"] == 0.1
    assert final_objective([]) == {}


def _checkpoint(root) -> None:
    cfg = JobConfig(preset="tiny", replicas=1, steps=50, warm_start=0)
    params = Parameters(cfg, 2)
    shards = FakeShards(root, params.sizes, params.place)
    rng = np.random.default_rng(0)
    for name, i in params.place.items():
        shards.stores[i].create(name, (params.sizes[name],), rng.standard_normal(params.sizes[name]), overwrite=True)
    state = JobState(cfg, None)
    state.progress[0].step = 50
    CheckpointManager(state, params.place, str(root), lambda: nullcontext(shards)).checkpoint("last")


def test_write_outputs_metrics_loss_panels_and_filters(tmp_path):
    cfg = JobConfig(preset="tiny", replicas=2, steps=5)
    _checkpoint(tmp_path / "checkpoints")
    history = [snapshot(_status(s)) for s in range(5)]
    write_outputs(str(tmp_path), history, cfg, checkpoint_dir=str(tmp_path / "checkpoints"))
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert all("stage1.sparsity" in r["scalars"] for h in m["history"] for r in h["replicas"])
    assert m["final_objective"]["stage2"]["dense"] == 0.05
    w, h = png_size(tmp_path / "loss.png")
    assert (w, h) == (plot.WIDTH * plot.DPI, round((plot.HEIGHT + 2 * plot.PANEL_HEIGHT) * plot.DPI))
    assert png_size(tmp_path / "filters.png")[0] == 600


def test_without_scalars_or_checkpoint_one_panel_and_no_filters(tmp_path):
    cfg = JobConfig(preset="tiny", replicas=1, steps=5)
    history = [
        {"time": 0.0, "step": s, "examples_per_second": 1.0, "replicas": [{"step": s, "loss": 1.0}]} for s in range(3)
    ]
    write_outputs(str(tmp_path), history, cfg, checkpoint_dir=str(tmp_path / "none"))
    assert png_size(tmp_path / "loss.png") == (plot.WIDTH * plot.DPI, plot.HEIGHT * plot.DPI)
    assert not (tmp_path / "filters.png").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["final_objective"] == {}


def test_patches_are_the_centre_locations_rows_or_the_tied_set():
    spec = NetworkSpec(input=(1, 8, 8), stages=(StageSpec(filter=FilterSpec(maps=3, field=3), pool=None, lcn=None),))
    ho = wo = 6
    w1 = np.zeros((ho * wo, 3, 9))
    w1[3 * wo + 3, 1, 4] = -2.0  # map 1 at the centre location: one weight, negative
    patches, where = filters.stage1_patches(spec, w1.reshape(-1))
    assert patches.shape == (3, 3, 3, 1) and "(3, 3) of 6 x 6" in where
    assert patches[1, 1, 1, 0] == 0.0 and patches[1, 0, 0, 0] == 0.5 and np.all(patches[0] == 0.5)
    tied = NetworkSpec(
        input=(3, 8, 8), stages=(StageSpec(filter=FilterSpec(maps=70, field=3, tied=True), pool=None, lcn=None),)
    )
    patches, where = filters.stage1_patches(tied, np.ones(70 * 27))
    assert patches.shape == (filters.MAX_MAPS, 3, 3, 3) and where.startswith("tied")
    img = filters.mosaic(patches)
    assert img.shape == (8 * 4 + 1, 8 * 4 + 1, 3)


def test_status_prints_each_stages_ratio_and_fractions():
    lines = objective_lines(_status(3, partitions=2))
    assert lines[0].split() == ["replica", "stage", "sp/rec", "recon", "sparsity", "dead", "dense"]
    assert lines[1].split() == ["0", "stage1", "0.8", "5", "4", "10.0%", "5.0%"]
    assert len(lines) == 1 + 2 * 2
    assert objective_lines(pb.JobStatusResponse(slots=[pb.SlotStatus(replica=0)])) == []


def test_the_progress_bars_show_stage_ones_ratio():
    from rich.console import Console

    bars = Bars(Console(file=io.StringIO()), 2, 10, disable=True)
    bars.update(snapshot(_status(4)))
    info = bars._progress.tasks[0].fields["info"]
    assert "s1 sp/rec 1" in info and "loss" in info and "ex/s" in info


def test_a_unit_encoder_stage_shows_its_effective_rows():
    stage = StageSpec(filter=FilterSpec(maps=2, field=2, tied=True), pool=None, lcn=None, constraint="unit_encoder")
    spec = NetworkSpec(input=(1, 4, 4), stages=(stage,))
    w1 = np.array([[3.0, 0.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    patches, _ = filters.stage1_patches(spec, w1.reshape(-1))
    assert patches[0, :, :, 0] == pytest.approx(0.5 + 0.5 * np.array([[0.75, 0.0], [0.0, 1.0]]))
    assert np.all(patches[1] == 0.5)  # an all-zero row stays zero (mid grey)
