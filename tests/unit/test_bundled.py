"""The bundled default dataset: sizes, labels, a held-out split training never sees."""

import numpy as np
import pytest

from downpour.feeder import bundled
from downpour.feeder.datasets import open_dataset
from downpour.feeder.preprocess import PreprocessSpec


@pytest.fixture(scope="module")
def splits():
    return bundled.build()


def _all(ds):
    return ds.get(np.arange(len(ds)))


def test_split_sizes_shapes_and_labels(splits):
    expect = {
        "train": 2100,
        "heldout_faces": 50,
        "heldout_nonfaces": 50,
        "heldout_natural": 500,
        "distractors": 200,
        "heldout": 300,
    }
    for name, n in expect.items():
        ds = splits.split(name)
        x, y = _all(ds)
        assert len(ds) == n and x.shape == (n, 1, 32, 32) and ds.shape == (1, 32, 32), name
        assert x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1, name
    assert _all(splits.train)[1] is None and splits.train.num_classes == 0
    assert _all(splits.heldout_faces)[1].tolist() == [1] * 50
    assert _all(splits.heldout_nonfaces)[1].tolist() == [0] * 50
    assert np.bincount(_all(splits.heldout)[1]).tolist() == [250, 50]
    assert splits.heldout.num_classes == splits.heldout_nonfaces.num_classes == 2


def test_lfw_subset_is_faces_then_nonfaces():
    x = bundled.lfw()
    assert x.shape == (200, 1, 25, 25)
    # faces (the first 100) are brighter and more contrasted than the non-face crops
    flat = x.reshape(200, -1)
    assert flat[:100].std(1).mean() > flat[100:].std(1).mean()


def test_train_and_heldout_share_no_image(splits):
    train = _all(splits.train)[0].reshape(len(splits.train), -1)
    seen = {row.tobytes() for row in train}
    assert len(seen) == len(train)  # no duplicates inside train either
    for name in ("heldout_faces", "heldout_nonfaces", "heldout_natural", "distractors"):
        held = _all(splits.split(name))[0].reshape(len(splits.split(name)), -1)
        assert not any(row.tobytes() in seen for row in held), name


def test_training_faces_are_the_even_lfw_images(splits):
    # the LFW part of train is the last 100 examples, in LFW order: 0, 2, 4, ...
    x = _all(splits.train)[0][-100:]
    from downpour.feeder import preprocess

    ref = np.stack([preprocess.resize(f, (32, 32)) for f in bundled.lfw()[0::2]])
    assert np.allclose(x, ref, atol=1e-6)


def test_natural_patches_come_from_disjoint_columns(splits):
    tr, he = splits.train.parts[0], splits.heldout_natural
    for img, a, b in zip(bundled.natural_images(1), tr.regions, he.regions):
        assert a.shape[2] + b.shape[2] == img.shape[2]


def test_distractors_match_face_brightness_and_contrast(splits):
    f = _all(splits.heldout_faces)[0].reshape(50, -1)
    d = _all(splits.distractors)[0].reshape(200, -1)
    which = np.arange(200) % 50
    assert np.abs(d.mean(1) - f.mean(1)[which]).max() <= bundled.MATCH_TOL + 1e-4
    assert np.abs(d.std(1) - f.std(1)[which]).max() <= bundled.MATCH_TOL + 1e-4
    astronaut = bundled.NATURAL_IMAGES.index("astronaut")
    assert astronaut not in set(splits.distractors.positions[:, 0])


def test_build_is_deterministic_and_size_and_channels_follow_the_spec():
    a = open_dataset("default", {"size": 20, "channels": 3})
    b = open_dataset("default", {"size": 20, "channels": 3})
    xa, xb = a.get(np.arange(0, 2100, 37))[0], b.get(np.arange(0, 2100, 37))[0]
    assert xa.shape == (57, 3, 20, 20) and np.array_equal(xa, xb)
    faces = open_dataset("default:heldout_faces", PreprocessSpec(size=(40, 30), crop=24, normalize="standardize"))
    x, y = faces.get(range(5))
    assert x.shape == (5, 1, 24, 24) and faces.shape == (1, 24, 24) and y.tolist() == [1] * 5
    assert np.allclose(x.reshape(5, -1).std(1), 1, atol=1e-4)


def test_small_images_are_upscaled_for_large_patches():
    s = bundled.build(PreprocessSpec(size=100), n_train_patches=20, n_heldout_patches=20, n_distractors=4)
    x = s.heldout_natural.get(range(20))[0]
    assert x.shape == (20, 1, 100, 100)


def test_face_frames_are_jittered_views_of_the_training_faces_only(splits):
    s = bundled.build(face_frames=2)
    assert len(s.train) == 2100 + 2 * 50
    x = _all(s.train)[0]
    assert np.array_equal(x[:2100], _all(splits.train)[0])  # the plain train split comes first, unchanged
    frames = x[2100:]
    assert frames.shape == (100, 1, 32, 32) and 0 <= frames.min() and frames.max() <= 1
    seen = {row.tobytes() for row in x[:2100].reshape(2100, -1)}
    assert not any(row.tobytes() in seen for row in frames.reshape(100, -1))  # views, not copies
    # each view stays close to its own face (rows 2i, 2i+1 come from training face i)
    faces = x[2000:2050]  # the 50 training faces (train_lfw: faces, then non-faces)
    views = np.concatenate([faces, faces[..., ::-1]]).reshape(100, -1)  # a frame may be mirrored
    nearest = np.argmax(np.corrcoef(frames.reshape(100, -1), views)[:100, 100:], axis=1) % 50
    assert (nearest == np.repeat(np.arange(50), 2)).mean() > 0.8
    assert np.array_equal(bundled.face_frames(bundled.lfw()[0:100:2], 2), bundled.bundled_frames(2))
    for name in ("heldout_faces", "heldout_nonfaces", "distractors"):
        assert np.array_equal(_all(s.split(name))[0], _all(splits.split(name))[0]), name
