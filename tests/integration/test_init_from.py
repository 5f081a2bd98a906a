"""A job that starts from another job's checkpoint (``init_from``): unsupervised stages under a
new supervised head, through real ``downpour up`` clusters."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

import harness
from downpour import checkpoint as cks
from downpour.nn import Network, presets
from downpour.nn.spec import NetworkSpec, to_dict

pytestmark = pytest.mark.slow


def up(args, out, env=None):
    return harness.run_cli("up", "--quiet", "--no-neurons", "--out", str(out), *args, env=env, timeout=240)


def newest_params(run):
    return cks.load_params(run / "checkpoints", cks.newest_valid(run / "checkpoints"))[1]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """An unsupervised tiny job of 40 steps on the bundled images (2 shards: blocks on both)."""
    run = tmp_path_factory.mktemp("pre") / "run"
    r = up(["--preset", "tiny", "--replicas", "1", "--shards", "2", "--steps", "40"], run)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def supervised_job(tmp_path, classes=3):
    """A supervised job spec on tiny + a softmax head, and a labeled .npz for it."""
    spec = NetworkSpec(input=presets.get("tiny").input, stages=presets.get("tiny").stages, classes=classes)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "labeled.npz", x=rng.random((64, 1, 16, 16), dtype=np.float32), y=rng.integers(0, classes, 64))
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "model": to_dict(spec),
                "supervised": True,
                "data": str(tmp_path / "labeled.npz"),
                "replicas": 1,
                "shards": 2,
                "steps": 1,
                # a vanishing learning rate: the one step leaves the start visible
                "optimizer": {"lr": 1e-7},
            }
        )
    )
    return spec, job


def test_a_supervised_job_starts_from_the_unsupervised_checkpoint_with_a_fresh_head(tmp_path, pretrained):
    spec, job = supervised_job(tmp_path)
    run = tmp_path / "sup"
    r = up(["--config", str(job), "--init-from", str(pretrained / "checkpoints")], run)
    assert r.returncode == 0, r.stderr[-3000:]
    source, fresh, got = newest_params(pretrained), Network(spec).init_params(0), newest_params(run)
    stages = [k for k in got if k.startswith("stage")]
    heads = [k for k in got if k.startswith("head")]
    assert stages and heads and set(stages) == set(source)
    for k in stages:  # the pretrained blocks, moved by at most one step of 1e-7
        assert np.abs(got[k] - source[k]).max() < 1e-5, k
        assert np.abs(source[k] - fresh[k]).max() > 1e-3, k  # (and pretraining had moved them)
    for k in heads:
        np.testing.assert_allclose(got[k], fresh[k], atol=1e-5)
    log = (run / "logs" / "coordinator.log").read_text()
    assert f"initial values of {len(stages)} of {len(got)} blocks from checkpoint" in log
    assert yaml.safe_load((run / "job.yaml").read_text())["init_from"] == str(pretrained / "checkpoints")


def test_model_parallel_blocks_are_joined_and_cut_again(tmp_path, pretrained):
    """Pretrained unpartitioned, started on a 1x2 grid: each partition's blocks are its tile of them."""
    run = tmp_path / "mp"
    r = up(
        [
            "--preset",
            "tiny",
            "--partitions",
            "1x2",
            "--replicas",
            "1",
            "--shards",
            "2",
            "--steps",
            "1",
            "--init-from",
            str(pretrained / "checkpoints"),
        ],
        run,
        env={"DOWNPOUR_OPTIMIZER__LR": "1e-7"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    source, got = newest_params(pretrained), newest_params(run)  # load_params joins the partitions back
    assert set(got) == set(source)
    for k in source:
        assert np.abs(got[k] - source[k]).max() < 1e-5, k


def test_a_bad_init_from_stops_the_start_with_its_reason(tmp_path, pretrained):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = up(["--preset", "tiny", "--steps", "1", "--init-from", str(empty)], tmp_path / "a")
    assert r.returncode == 2 and "no committed checkpoint" in r.stderr, r.stderr[-2000:]
    # another model: same block names, other shapes
    r = up(
        [
            "--preset",
            "small",
            "--steps",
            "1",
            "--replicas",
            "1",
            "--shards",
            "1",
            "--init-from",
            str(pretrained / "checkpoints"),
        ],
        tmp_path / "b",
    )
    assert r.returncode != 0
    log = (tmp_path / "b" / "logs" / "coordinator.log").read_text()
    assert "has shape" in log and "in this model" in log, log[-2000:]
    # the source checkpoint is untouched
    assert cks.newest_valid(pretrained / "checkpoints") is not None


def test_warm_start_takes_only_shared_names_and_refuses_no_overlap(pretrained):
    d = pretrained / "checkpoints"
    fresh = {"stage1.W1": Network(presets.get("tiny")).init_params(0)["stage1.W1"], "other": np.zeros(3, np.float32)}
    params, taken, m = cks.warm_start(d, fresh)
    assert taken == ["stage1.W1"] and m["checkpoint_id"]
    np.testing.assert_array_equal(params["stage1.W1"], newest_params(pretrained)["stage1.W1"])
    np.testing.assert_array_equal(params["other"], fresh["other"])
    with pytest.raises(ValueError, match="shares no block"):
        cks.warm_start(d, {"other": np.zeros(3, np.float32)})


def test_head_only_steps_keep_the_pretrained_stages_then_release_them(tmp_path, pretrained):
    """Fine-tuning's warm-up through the cluster: while head_only_steps last, the stages taken from
    init_from stay exactly as pretrained and the head learns; after them every layer learns."""
    spec, job = supervised_job(tmp_path)
    source, fresh = newest_params(pretrained), Network(spec).init_params(0)
    cfg = yaml.safe_load(job.read_text())
    for steps, head_only, stages_move in ((6, 6, False), (6, 3, True)):
        job.write_text(yaml.safe_dump(dict(cfg, steps=steps, head_only_steps=head_only, optimizer={"lr": 0.02})))
        run = tmp_path / f"sup-{head_only}"
        r = up(["--config", str(job), "--init-from", str(pretrained / "checkpoints")], run)
        assert r.returncode == 0, r.stderr[-3000:]
        got = newest_params(run)
        for k in source:  # (the decoders W2 have no part in the supervised loss: they never move)
            moved = np.abs(got[k] - source[k]).max()
            assert (moved > 1e-4) if stages_move and k.endswith("W1") else (moved == 0), (k, moved, head_only)
        for k in ("head.W", "head.b"):
            assert np.abs(got[k] - fresh[k]).max() > 1e-4, k
