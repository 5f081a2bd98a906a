"""The faces experiment's data by identity: folds that swap, a pool with no held-out identity
or column, test B of only its identities (clusters, phase scrambling, cascade hits), test A,
and a user's category read from folders, end to end."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from downpour.evals import facecategory as C
from downpour.evals import facedata as D
from downpour.evals import facenegatives as N
from downpour.evals import faceviews as V
from downpour.evals import viewjitter
from downpour.feeder import bundled, preprocess

SIZE = (16, 16)
# a NaN-poisoned image warps to NaN: scikit-image warns on the way
pytestmark = pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")


def _category(n_pos=12, n_neg=8, seed=0, hard=False) -> C.Category:
    rng = np.random.default_rng(seed)
    pos = rng.random((n_pos, 1, *SIZE)).astype(np.float32)
    neg = rng.random((n_neg, 1, *SIZE)).astype(np.float32)
    return C.Category("blobs", pos, neg, "random", hard_negatives=hard)


def _poisoned(cat: C.Category, keep_pos, keep_neg) -> C.Category:
    """The category with every image outside ``keep_pos`` / ``keep_neg`` set to NaN."""
    pos, neg = cat.positives.copy(), cat.negatives.copy()
    pos[np.setdiff1d(np.arange(len(pos)), keep_pos)] = np.nan
    neg[np.setdiff1d(np.arange(len(neg)), keep_neg)] = np.nan
    return C.Category(cat.name, pos, neg, cat.source, cat.hard_negatives, cat.distractors)


def _poison_heldout_columns(monkeypatch, value):
    """Natural images whose held-out columns hold ``value`` (an array filler) everywhere."""
    real = bundled.natural_images

    def poisoned(channels):
        out = []
        for im in real(channels):
            im = im.copy()
            c0, c1 = N.columns(im.shape[2], "heldout")
            im[:, :, c0:c1] = value(im[:, :, c0:c1].shape)
            out.append(im)
        return tuple(out)

    monkeypatch.setattr(bundled, "natural_images", poisoned)
    monkeypatch.setattr(D, "_splits", D._splits.__wrapped__)  # no cached, unpoisoned splits


def test_identity_folds_swap_and_hold_out_every_identity_once():
    for n, seed in ((100, 0), (7, 0), (9, 3), (0, 0)):
        folds = V.identity_folds(n, seed)
        assert len(folds) == 2
        (tr0, ho0), (tr1, ho1) = folds
        np.testing.assert_array_equal(tr0, ho1)
        np.testing.assert_array_equal(ho0, tr1)
        assert not set(tr0) & set(ho0)
        held = np.concatenate([ho0, ho1])
        assert sorted(held.tolist()) == list(range(n))  # each exactly once
    tr, ho = V.identity_folds(100)[0]
    assert tr.tolist() == list(range(0, 100, 2)) and ho.tolist() == list(range(1, 100, 2))  # bundled's split
    assert V.identity_folds(9, 3)[0][0].tolist() != list(range(0, 9, 2))  # another seed shuffles


def test_fold_pool_holds_no_heldout_identity_nor_heldout_column(monkeypatch):
    cat = _category()
    (tr, _), (ntr, _) = V.identity_folds(12)[0], V.identity_folds(8)[0]
    # held-out natural columns set above 1: any crop or background from them shows in the pool
    _poison_heldout_columns(monkeypatch, lambda shape: 2.0 + 0.3 * np.random.default_rng(1).random(shape))
    pool = V.fold_pool(_poisoned(cat, tr, ntr), tr, ntr, SIZE, 1, per_positive=3, per_negative=2, seed=5)
    assert np.isfinite(pool.x).all()
    assert pool.x.max() <= 1.0 + 1e-5 and pool.x.min() >= -1e-5
    assert len(pool.x) == bundled.N_TRAIN_PATCHES + 6 * 3 + 4 * 2 and int(pool.has_face.sum()) == 18
    control = V.fold_pool(cat, tr, ntr, SIZE, 1, per_positive=3, per_negative=2, with_positives=False, seed=5)
    np.testing.assert_array_equal(control.x, pool.x[~pool.has_face])
    # the check can fail: poisoning a training identity reaches the pool
    bad = V.fold_pool(_poisoned(cat, tr[1:], ntr), tr, ntr, SIZE, 1, per_positive=3, per_negative=2, seed=5)
    assert not np.isfinite(bad.x).all()


def test_video_pool_takes_given_training_images():
    pos = np.full((3, 1, 25, 25), 0.5, np.float32)
    pool = D.video_pool(SIZE, 1, per_face=2, per_nonface=1, positives=pos, negatives=pos[:2])
    assert len(pool.x) == bundled.N_TRAIN_PATCHES + 3 * 2 + 2 and int(pool.has_face.sum()) == 6


def _test_b(cat, pos_ids, neg_ids, heldout=True, **kw):
    args = {"views": 3, "neg_views": 2, "natural": 20, "scrambled_views": 2, "hard": 0} | kw
    return V.test_b(cat, pos_ids, neg_ids, SIZE, 1, heldout=heldout, seed=4, **args)


def test_b_holds_views_of_only_its_identities_with_clusters_per_identity():
    cat = _category()
    (_, ho), (_, nho) = V.identity_folds(12)[0], V.identity_folds(8)[0]
    b = _test_b(_poisoned(cat, ho, nho), ho, nho)
    assert np.isfinite(b.x).all() and b.x.min() >= -1e-5 and b.x.max() <= 1 + 1e-5
    assert b.sizes() == dict(zip(V.GROUPS_B, [6 * 3, 4 * 2, 20, 6 * 2, 0]))
    assert b.y.tolist() == [1] * 18 + [0] * (8 + 20 + 12)
    assert set(b.index[b.group == 0]) == set(ho) and set(b.index[b.group == 1]) == set(nho)
    with pytest.raises(AssertionError):  # a poisoned identity would show
        assert np.isfinite(_test_b(_poisoned(cat, ho[1:], nho), ho, nho).x).all()
    # clusters: one per identity (its views and only its views), one per photo, one per crop,
    # one per scrambled identity; none shared across groups
    for g, per in ((0, 3), (1, 2), (2, 1), (3, 2)):
        cl, idx = b.cluster[b.group == g], b.index[b.group == g]
        assert len(np.unique(cl)) == len(cl) // per
        for c in np.unique(cl):
            assert (cl == c).sum() == per and len(set(idx[cl == c])) == 1
    owners = {int(c): int(g) for c, g in zip(b.cluster, b.group)}
    assert all(owners[int(c)] == int(g) for c, g in zip(b.cluster, b.group))
    # deterministic in the seed
    np.testing.assert_array_equal(b.x, _test_b(_poisoned(cat, ho, nho), ho, nho).x)


def test_b_with_the_jitter_off_shows_the_aligned_identities():
    cat = _category()
    ho = np.array([1, 5, 7])
    b = _test_b(cat, ho, [], jitter=viewjitter.NONE)
    v = b.x[b.group == 0]
    np.testing.assert_allclose(v, cat.positives[np.repeat(ho, 3)], atol=1e-5)


def test_selection_and_test_sets_use_their_own_natural_columns(monkeypatch):
    cat = _category()
    (tr, ho), (ntr, nho) = V.identity_folds(12)[0], V.identity_folds(8)[0]
    _poison_heldout_columns(monkeypatch, lambda shape: np.full(shape, np.nan, np.float32))
    sel = _test_b(cat, tr, ntr, heldout=False)
    assert np.isfinite(sel.x).all()
    assert np.isfinite(V.test_a(cat, tr, ntr, SIZE, 1, heldout=False).x).all()
    # the held-out set does reach the poisoned columns
    assert not np.isfinite(_test_b(cat, ho, nho, heldout=True).x).all()
    monkeypatch.undo()
    test = _test_b(cat, ho, nho, heldout=True)
    images = bundled.natural_images(1)
    for boxes, split in ((sel.notes["natural_boxes"], "train"), (test.notes["natural_boxes"], "heldout")):
        for k, _, c0, _, c1 in boxes:
            lo, hi = N.columns(images[k].shape[2], split)
            assert lo <= c0 < c1 <= hi and bundled.NATURAL_IMAGES[k] not in bundled.WITH_FACES


def test_natural_crops_are_matched_to_the_views():
    cat = _category()
    b = _test_b(cat, np.arange(6), [], natural=18)
    views, crops = b.x[b.group == 0].reshape(18, -1), b.x[b.group == 2].reshape(18, -1)
    assert np.abs(crops.mean(1) - views.mean(1)).max() <= bundled.MATCH_TOL + 1e-6
    assert np.abs(crops.std(1) - views.std(1)).max() <= bundled.MATCH_TOL + 1e-6


def test_phase_scramble_keeps_the_amplitude_spectrum():
    rng = np.random.default_rng(6)
    yy, xx = np.mgrid[:24, :20]
    img = np.stack([0.5 + 0.3 * np.sin(xx / 3.0) * np.cos(yy / 5.0), rng.random((24, 20))]).astype(np.float32)
    out, raw = N.phase_scramble(img, rng)
    for k in range(2):
        want = np.abs(np.fft.fft2(img[k].astype(np.float64)))
        np.testing.assert_allclose(np.abs(np.fft.fft2(raw[k])), want, rtol=1e-6, atol=1e-6)
        assert np.corrcoef(out[k].ravel(), img[k].ravel())[0, 1] < 0.5  # not the source
    assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out.mean((1, 2)), img.mean((1, 2)), atol=0.03)
    # in test B, no scrambled image repeats an object view
    b = _test_b(_category(), np.arange(4), [])
    views, scr = b.x[b.group == 0].reshape(12, -1), b.x[b.group == 3].reshape(8, -1)
    assert np.abs(scr[:, None] - views[None]).max(-1).min() > 0.05


def test_hard_negatives_are_cascade_hits_away_from_real_faces():
    x, boxes, notes = N.hard_negatives("heldout", 200, (32, 32), 1, np.random.default_rng(0))
    assert len(x) == min(200, notes["hard_hits"]) and len(x) > 80
    if len(x) < 200:
        assert "fewer than the 200" in notes["hard_short"]
    grey = bundled.natural_images(1)
    from skimage import data
    from skimage.feature import Cascade

    cascade = Cascade(data.lbp_frontal_face_cascade_filename())
    for k in sorted(set(boxes[:, 0].tolist()))[:4]:  # re-scan a few images independently
        name = bundled.NATURAL_IMAGES[k]
        cut = int(round(grey[k].shape[2] * 0.75))
        for mirrored in (0, 1):
            region = grey[k][0, :, cut:]
            region = np.ascontiguousarray(region[:, ::-1] if mirrored else region)
            found = {
                (d["r"], cut + (region.shape[1] - d["c"] - d["width"] if mirrored else d["c"]), d["width"])
                for d in cascade.detect_multi_scale(region, **N.CASCADE)
            }
            mine = boxes[(boxes[:, 0] == k) & (boxes[:, 4] == mirrored)]
            assert {(r, c, s) for r, c, s in mine[:, 1:4].tolist()} <= found, name
    for i, (k, r, c, s, m, top, left, big) in enumerate(boxes):
        img = grey[k]
        assert bundled.NATURAL_IMAGES[k] not in bundled.WITH_FACES
        assert N.columns(img.shape[2], "heldout")[0] <= left and left + big <= img.shape[2]
        assert top <= r and left <= c and r + s <= top + big and c + s <= left + big  # the cut holds the hit
        assert not N.shows_face(int(k), int(top), int(left), int(top + big), int(left + big))
        p = img[:, top : top + big, left : left + big]
        want = preprocess.resize(np.ascontiguousarray(p[:, :, ::-1] if m else p), (32, 32))
        np.testing.assert_allclose(x[i], want, atol=1e-6)
    # the cameraman's face is found in the training columns, and left out
    cam = bundled.NATURAL_IMAGES.index("camera")
    assert N.shows_face(cam, 120, 200, 180, 260) and not N.shows_face(cam, 300, 400, 340, 440)


def test_a_aligned_images_and_the_faces_distractor_halves():
    cat = C.face_category(SIZE, 1)
    assert cat.positives.shape == (100, 1, *SIZE) and cat.negatives.shape == (100, 1, *SIZE)
    (tr, ho), (ntr, nho) = V.identity_folds(100)[0], V.identity_folds(100)[0]
    a = V.test_a(cat, ho, nho, SIZE, 1, heldout=True)
    s = V.test_a(cat, tr, ntr, SIZE, 1, heldout=False)
    assert a.sizes() == {"aligned objects": 50, "non-object photos": 50, "distractors": 100}
    lfw = bundled.lfw()
    np.testing.assert_allclose(a.x[a.group == 0], [preprocess.resize(lfw[i], SIZE) for i in ho], atol=1e-6)
    np.testing.assert_allclose(s.x[s.group == 1], [preprocess.resize(lfw[100 + i], SIZE) for i in ntr], atol=1e-6)
    da, ds = set(V.distractor_half(200, True)), set(V.distractor_half(200, False))
    assert not da & ds and da | ds == set(range(200))
    np.testing.assert_array_equal(a.x[a.group == 2], cat.distractors[sorted(da)])
    assert len(np.unique(a.cluster)) == len(a.cluster) and a.y.sum() == 50


def _save(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def test_load_category_names_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match=r"positives: .*nope/ is not a folder"):
        C.load_category(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"empty/ holds no images"):
        C.load_category(str(tmp_path / "empty"))
    for i in range(3):
        _save(str(tmp_path / "pos" / f"{i}.png"), np.full((9, 7), 40 * i, np.uint8))
    with pytest.raises(ValueError, match=r"pos holds 3 image\(s\); need at least 4"):
        C.load_category(str(tmp_path / "pos"))
    _save(str(tmp_path / "pos" / "3.jpg"), np.zeros((40, 30, 3), np.uint8))
    with pytest.raises(ValueError, match=r"negatives: .*neg/ is not a folder"):
        C.load_category(str(tmp_path / "pos"), str(tmp_path / "neg"))
    (tmp_path / "pos" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"cannot read .*pos/broken.png"):
        C.load_category(str(tmp_path / "pos"))
    os.remove(tmp_path / "pos" / "broken.png")
    cat = C.load_category(str(tmp_path / "pos"), size=(8, 8), channels=3)
    assert cat.positives.shape == (4, 3, 8, 8) and cat.negatives.shape == (0, 3, 8, 8) and not cat.hard_negatives


def test_a_bundled_non_face_category_from_folders_end_to_end(tmp_path):
    cat = C.bundled_test_category(SIZE, 1, dirpath=str(tmp_path))
    assert sorted(os.listdir(tmp_path / "coins"))[:2] == ["coin00.png", "coin01.png"]
    assert cat.positives.shape == (12, 1, *SIZE) and cat.negatives.shape == (6, 1, *SIZE)
    assert cat.name == "coins" and not cat.hard_negatives and cat.distractors is None
    for (tr, ho), (ntr, nho) in zip(V.identity_folds(12), V.identity_folds(6)):
        pool = V.fold_pool(cat, tr, ntr, SIZE, 1, per_positive=2, per_negative=1, seed=1)
        assert len(pool.x) == bundled.N_TRAIN_PATCHES + 6 * 2 + 3 and pool.has_face.sum() == 12
        for ids, nids, heldout in ((tr, ntr, False), (ho, nho, True)):
            b = _test_b(cat, ids, nids, heldout=heldout, hard=50)
            assert b.sizes() == dict(zip(V.GROUPS_B, [18, 6, 20, 12, 0]))  # no cascade for coins
            assert b.notes["split"] == ("heldout" if heldout else "train")
            a = V.test_a(cat, ids, nids, SIZE, 1, heldout=heldout)
            assert a.sizes() == {"aligned objects": 6, "non-object photos": 3, "distractors": V.N_DISTRACTORS_A}
            assert np.isfinite(a.x).all() and np.isfinite(b.x).all()
            # the distractors are matched to the aligned coins' brightness and contrast
            pos = a.x[a.group == 0].reshape(6, -1)
            d = a.x[a.group == 2].reshape(V.N_DISTRACTORS_A, -1)
            want = np.tile(pos.mean(1), V.N_DISTRACTORS_A // 6 + 1)[: V.N_DISTRACTORS_A]
            assert np.abs(d.mean(1) - want).max() <= bundled.MATCH_TOL + 1e-6
