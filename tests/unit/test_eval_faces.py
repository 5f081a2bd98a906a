"""eval faces: the scoring measures against naive implementations, the video-like
pool (no held-out image or view of one in it), the validation/test cut, ZCA,
a user's test folder, and the whole eval on the tiny preset in seconds."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from downpour.evals import facedata as D
from downpour.evals import neuronscore as S
from downpour.feeder import bundled
from downpour.feeder.datasets import ArrayDataset
from downpour.feeder.preprocess import PreprocessSpec

# -- measures ------------------------------------------------------------------------


def test_paper_thresholds_match_a_naive_loop():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((60, 30)).astype(np.float32)
    A[:, 3] = 2.0  # a constant neuron: every threshold equals its value, all predict negative
    y = rng.random(60) < 0.35
    thr, acc = S.paper_thresholds(A, y, chunk=7)  # chunks that do not divide the columns
    A64 = A.astype(np.float64)
    for j in range(A.shape[1]):
        best_t, best_a = None, -1.0
        for k in range(20):
            t = A64[:, j].min() + (A64[:, j].max() - A64[:, j].min()) * k / 19
            a = np.mean((A64[:, j] > t) == y)
            if a > best_a + 1e-12:
                best_t, best_a = t, a
        assert acc[j] == pytest.approx(best_a)
        assert thr[j] == pytest.approx(best_t, rel=1e-6, abs=1e-6)
    assert acc[3] == pytest.approx(1 - y.mean())  # the majority rate: chance for this measure


def test_auc_matches_counting_pairs():
    rng = np.random.default_rng(1)
    A = rng.integers(0, 5, size=(40, 12)).astype(np.float32)  # many ties
    y = rng.random(40) < 0.4
    got = S.auc(A, y)
    for j in range(A.shape[1]):
        pos, neg = A[y, j], A[~y, j]
        want = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
        assert got[j] == pytest.approx(want)
    with pytest.raises(ValueError, match="both positive and negative"):
        S.auc(A, np.zeros(40, bool))


def test_choose_and_test_picks_on_validation_and_measures_on_test():
    rng = np.random.default_rng(2)
    n = 300
    y = np.r_[np.ones(60, bool), np.zeros(240, bool)]
    val = np.zeros(n, bool)
    val[::2] = True
    layers = {
        "a": rng.standard_normal((n, 200)).astype(np.float32),
        "b": rng.standard_normal((n, 40)).astype(np.float32),
    }
    layers["b"][:, 7] += 3.0 * y  # a real detector
    # a neuron that is perfect on the test half only: it must never be chosen
    layers["a"][~val, 11] = np.where(y[~val], 10.0, -10.0)
    ch = S.choose_and_test(layers, y, val)
    for m in S.MEASURES:
        assert (ch[m].layer, ch[m].index) == ("b", 7)
        assert 0.8 < ch[m].test <= 1.0
    assert ch["auc"].threshold is None and ch["paper"].threshold is not None


# -- data --------------------------------------------------------------------------------


def test_pool_uses_no_heldout_lfw_image(monkeypatch):
    """Poison every held-out LFW image (odd positions) with NaN: no frame may contain one."""
    lfw = bundled.lfw().copy()
    lfw[1::2] = np.nan
    rng = np.random.default_rng(3)
    natural = rng.random((bundled.N_TRAIN_PATCHES, 1, 16, 16)).astype(np.float32)
    monkeypatch.setattr(bundled, "lfw", lambda: lfw)
    monkeypatch.setattr(D, "_splits", lambda size, channels: SimpleNamespace(train=ArrayDataset(natural)))
    pool = D.video_pool((16, 16), 1, per_face=3, per_nonface=2)
    assert np.isfinite(pool.x).all()
    assert len(pool.x) == bundled.N_TRAIN_PATCHES + 50 * 3 + 50 * 2
    assert int(pool.has_face.sum()) == 150 and pool.face_fraction == pytest.approx(150 / len(pool.x))
    control = D.video_pool((16, 16), 1, per_face=3, per_nonface=2, faces=False)
    assert not control.has_face.any() and len(control.x) == len(pool.x) - 150
    # same seed: the control is the pool less its face frames, frame for frame
    np.testing.assert_array_equal(control.x, pool.x[~pool.has_face])


def test_pool_frames_are_views_of_the_training_faces(monkeypatch):
    from downpour.feeder import preprocess

    # with every jitter switched off, each face frame is its training face (or its mirror image)
    for name in ("MAX_SHIFT", "LOG_SCALE", "MAX_ROTATION", "LOG_CONTRAST", "MAX_BRIGHTNESS"):
        monkeypatch.setattr(D, name, 0.0)
    pool = D.video_pool((16, 16), 1, per_face=4, per_nonface=1)
    # the natural crops are the bundled train split's, which never touch held-out columns
    train = bundled.build(PreprocessSpec(channels=1, size=(16, 16))).train
    nat, _ = train.get(np.arange(bundled.N_TRAIN_PATCHES))
    np.testing.assert_array_equal(pool.x[pool.source == 0], nat)
    lfw = bundled.lfw()
    faces = np.stack([preprocess.resize(f, (16, 16)) for f in lfw[0 : bundled.N_FACES : 2]])
    nonfaces = np.stack([preprocess.resize(f, (16, 16)) for f in lfw[bundled.N_FACES :: 2]])
    for frames, want, k in ((pool.x[pool.source == 1], faces, 4), (pool.x[pool.source == 2], nonfaces, 1)):
        assert len(frames) == 50 * k
        for i, f in enumerate(frames):
            w = want[i // k]
            err = min(np.abs(f - w).max(), np.abs(f - w[:, :, ::-1]).max())
            assert err < 1e-4, (i, err)


def test_zca_whitens_and_is_symmetric():
    rng = np.random.default_rng(4)
    mix = rng.standard_normal((16, 16))
    x = (rng.standard_normal((4000, 16)) @ mix).reshape(4000, 1, 4, 4).astype(np.float32)
    z = D.ZCA(x, eps=1e-6)
    np.testing.assert_allclose(z.matrix, z.matrix.T, atol=1e-9)
    w = z(x).reshape(len(x), -1)
    np.testing.assert_allclose(np.cov(w, rowvar=False), np.eye(16), atol=0.02)
    # ZCA, of all whitening matrices, stays closest to the input
    assert np.corrcoef(w[:, 5], x.reshape(len(x), -1)[:, 5])[0, 1] > 0.1


def _save(path, arr, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(arr)
    im = im.convert(mode) if mode else im
    im.save(path)


def test_load_test_dir_any_format_any_size(tmp_path):
    rng = np.random.default_rng(5)
    _save(tmp_path / "faces" / "a.png", rng.integers(0, 256, (40, 30), dtype=np.uint8))
    _save(tmp_path / "faces" / "b.jpg", rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
    _save(tmp_path / "other" / "c.png", rng.integers(0, 256, (10, 12, 3), dtype=np.uint8), "RGBA")
    _save(tmp_path / "other" / "d.bmp", rng.integers(0, 256, (300, 200), dtype=np.uint8))
    x, y, names = D.load_test_dir(str(tmp_path), (32, 32), 1)
    assert x.shape == (4, 1, 32, 32) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert y.tolist() == [1, 1, 0, 0] and names == ["faces/a.png", "faces/b.jpg", "other/c.png", "other/d.bmp"]


def test_load_test_dir_names_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        D.load_test_dir(str(tmp_path / "nope"), (32, 32))
    _save(tmp_path / "faces" / "a.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="other/ is missing"):
        D.load_test_dir(str(tmp_path), (32, 32))
    os.makedirs(tmp_path / "other")
    with pytest.raises(ValueError, match="other/ holds no images"):
        D.load_test_dir(str(tmp_path), (32, 32))
    (tmp_path / "other" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="other/broken.png"):
        D.load_test_dir(str(tmp_path), (32, 32))


# -- the eval ----------------------------------------------------------------------------

QUICK = {"kmeans": {"k": 8}, "autoencoder": {"steps": 5}}


def _quick(out, **kw):
    from downpour.evals import faces

    args = dict(
        preset="tiny",
        budget=1.0,
        steps=4,
        in_process=True,
        per_face=1,
        per_nonface=1,
        baselines=QUICK,
        stimulus_steps=3,
        log=lambda *a: None,
    )
    args.update(kw)
    return faces.run(str(out), **args)


def test_eval_faces_on_tiny(tmp_path):
    from downpour.evals import facefold

    out = tmp_path / "faces"
    res = _quick(out)
    keys = [r["key"] for r in res["rows"]]
    assert keys == ["chance"] + [k for k, *_ in facefold.ROWS]
    # two folds by identity: every face held out exactly once, never on both sides of a fold
    f0, f1 = res["folds"]
    assert sorted(f0["heldout_identities"] + f1["heldout_identities"]) == list(range(100))
    assert f0["training_identities"] == f1["heldout_identities"]
    assert not set(f0["training_identities"]) & set(f0["heldout_identities"])
    for r in res["rows"][1:]:
        for t in ("B", "A"):
            b = r[t]["balanced"]
            assert 0.0 <= b["lo"] <= b["mean"] <= b["hi"] <= 1.0 and b["se"] >= 0
            assert len(r[t]["neurons"]) == 2 and len(r[t]["selection_balanced"]) == 2
    by_key = {r["key"]: r for r in res["rows"]}
    top = "stage3.pool#" if "stage3.pool" in str(res["network"]) else "stage3."
    assert all(n.startswith(("stage3.",)) for n in by_key["trained_top"]["B"]["neurons"]), top
    assert all(n.startswith("stage1.") for n in by_key["first_stage"]["B"]["neurons"])
    assert all(n.startswith("kmeans.") for n in by_key["kmeans"]["B"]["neurons"])
    assert all(n.startswith("ae.") for n in by_key["autoencoder"]["B"]["neurons"])
    d = res["differences"]["B"]["trained - random weights (top stage)"]["balanced"]
    want = by_key["trained_top"]["B"]["balanced"]["mean"] - by_key["random_top"]["B"]["balanced"]["mean"]
    assert d["mean"] == pytest.approx(want) and d["lo"] <= d["mean"] <= d["hi"]
    assert set(res["best_neuron_by_stage"]) == {"trained", "random", "no_lcn", "no_faces"}
    assert set(res["best_neuron_by_stage"]["trained"]) == {"stage1", "stage2", "stage3"}
    assert "trained_minus_random_points" in res["targets"] and res["power"]["B"]["paired_detectable_points"]
    assert set(res["training"]) == {f"{n}/fold{k}" for n in ("trained", "no_lcn", "no_faces") for k in (0, 1)}
    n = res["neuron"]
    assert n["layer"].startswith("stage3.")
    assert n["optimal_stimulus"]["activation"] >= n["optimal_stimulus"]["random_max"]
    assert len(n["top_inputs"]) == 16 and len(n["invariance"]) == 4
    for f in (
        "report.html",
        "results.json",
        "filters.png",
        "table.png",
        "params.npz",
        "top_inputs.png",
        "optimal_stimulus.png",
        "invariance.png",
    ):
        assert (out / f).stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["targets"] == res["targets"]
    assert "Paired differences" in (out / "report.html").read_text()


def test_eval_faces_on_a_users_category_and_test_folder(tmp_path):
    """--positives/--negatives: any category (the coins of the bundled coins photo against the cloth
    between them, written as image files), built into a pool and both tests the same way."""
    from downpour.evals.facecategory import write_category_folders

    lfw = bundled.lfw()
    coins, cloth = write_category_folders(str(tmp_path), n_positives=8, n_negatives=8)
    for i in range(3):  # an aligned test A of the user's own
        _save(tmp_path / "mine" / "faces" / f"{i}.png", (255 * lfw[2 * i + 1, 0]).astype(np.uint8))
        _save(tmp_path / "mine" / "other" / f"{i}.jpg", (255 * lfw[101 + 2 * i, 0]).astype(np.uint8))
    res = _quick(
        tmp_path / "out",
        positives=coins,
        negatives=cloth,
        test_dir=str(tmp_path / "mine"),
        whiten="zca",
    )
    assert res["category"]["name"] == "coins" and res["category"]["source"].startswith(coins)
    assert (res["category"]["positives"], res["category"]["negatives"]) == (8, 8)
    f0, f1 = res["folds"]
    assert sorted(f0["heldout_identities"] + f1["heldout_identities"]) == list(range(8))
    assert res["user_test"] == str(tmp_path / "mine") and res["whiten"] == "zca"
    assert f0["test_A"]["heldout"]["aligned objects"] == 3
    assert f0["test_B"]["heldout"]["hard negatives"] == 0  # the face cascade's hits only mean something for faces
    with pytest.raises(ValueError, match="--negatives needs --positives"):
        _quick(tmp_path / "x", negatives=cloth)
    from downpour.evals import faces

    with pytest.raises(ValueError, match="--whiten"):
        faces.Prep("standardize", "pca")


def test_eval_faces_from_a_checkpoint_directory(tmp_path):
    """--checkpoint reads the blocks named by the newest MANIFEST.json."""
    from downpour import config as jobconfig
    from downpour.checkpoint import shardfile as ckpt
    from downpour.evals import faces
    from downpour.nn import Network, presets
    from downpour.paramserver.store import OptimizerConfig, ShardStore

    spec = presets.get("tiny")
    params = Network(spec).init_params(0)  # the random-weights row's init in fold 0
    cfg = jobconfig.load(None, env={}, overrides={"preset": "tiny", "shards": 1})
    store = ShardStore(0, OptimizerConfig())
    for k, v in params.items():
        store.create(k, (np.size(v),), np.asarray(v))
    path = ckpt.shard_path(tmp_path, "step-7", 0)
    path.parent.mkdir(parents=True)
    ckpt.save(store, path)
    (path.parent / "MANIFEST.json").write_text(
        json.dumps(
            {
                "checkpoint_id": "step-7",
                "step": 7,
                "created": 1.0,
                "config": cfg.to_yaml(),
                "shards": [{"shard": 0, "path": str(path)}],
                "placement": {k: 0 for k in params},
            }
        )
    )
    spec2, normalize, blocks, m = faces.load_checkpoint_dir(str(tmp_path))
    assert spec2 == spec and normalize == "standardize" and m["step"] == 7
    for k, v in params.items():
        np.testing.assert_array_equal(blocks[k], v)
    res = _quick(tmp_path / "out", checkpoint=str(tmp_path), whiten="zca")
    assert res["checkpoint"]["id"] == "step-7" and res["whiten"] == "none"
    assert not any(k.startswith("trained/") for k in res["training"])
    # the checkpoint holds fold 0's random init: in fold 0 the trained and random networks choose alike
    by_key = {r["key"]: r for r in res["rows"]}
    assert by_key["trained_top"]["B"]["neurons"][0] == by_key["random_top"]["B"]["neurons"][0]


def test_scored_picks_as_choose_and_test_does_for_every_candidate_set():
    """facefold.Scored scores the selection side once and lets each candidate set pick: the same
    neuron, threshold and figures as neuronscore.choose_and_test on those layers alone."""
    from downpour.evals import facefold

    rng = np.random.default_rng(3)
    y_sel, y_held = rng.random(80) < 0.3, rng.random(70) < 0.3
    shapes = {"stage1.filter": 50, "stage1.pool": 30, "stage2.pool": 12, "stage3.pool": 4}
    sel = {
        k: (rng.normal(size=(80, n)) + 0.8 * y_sel[:, None] * rng.random(n)).astype(np.float32)
        for k, n in shapes.items()
    }
    held = {k: (rng.normal(size=(70, n)) + 0.8 * y_held[:, None]).astype(np.float32) for k, n in shapes.items()}
    scored = facefold.Scored(sel, held, y_sel, y_held)
    for layers in (list(shapes), ["stage3.pool"], ["stage1.filter", "stage1.pool"]):
        got = scored.pick(layers)
        both = {k: np.concatenate([sel[k], held[k]]) for k in layers}
        want = S.choose_and_test(both, np.r_[y_sel, y_held], np.r_[np.ones(80, bool), np.zeros(70, bool)])
        for m in S.MEASURES:
            w = want[m]
            assert (got.choice[m]["layer"], got.choice[m]["index"]) == (w.layer, w.index)
            assert got.choice[m]["val"] == pytest.approx(w.val) and got.choice[m]["test"] == pytest.approx(w.test)
        b = want["balanced"]
        np.testing.assert_array_equal(got.correct, (held[b.layer][:, b.index] > b.threshold) == y_held)
        np.testing.assert_array_equal(got.scores, held[want["auc"].layer][:, want["auc"].index])


def test_the_default_baselines_are_the_measured_ones():
    """docs/experiments.md's table was measured with k-means on whole frames (k = 1,024) and
    1,000 autoencoder steps: the eval pins them, whatever the learners' own defaults become."""
    from downpour.evals import faces
    from downpour.evals.facebaselines import KMeansFeatures

    assert faces.BASELINES["autoencoder"] == {"steps": 1000} and faces.BASELINES["kmeans"]["k"] == 1024
    x = np.random.default_rng(0).normal(size=(40, 1, 12, 12)).astype(np.float32)
    km = KMeansFeatures(**{**faces.BASELINES["kmeans"], "k": 4}).fit(x)
    assert km.info()["patch"] == "frame"  # one unit per centroid over the whole frame, no pooling
    assert km.activations(x)["kmeans.centroid"].shape == (40, 4)
