"""Preprocessing: spec validation, channel conversion, resize, crops, normalisation."""

import numpy as np
import pytest

from downpour.feeder import preprocess
from downpour.feeder.preprocess import PreprocessSpec


def test_spec_defaults_and_coercion():
    s = PreprocessSpec(size=32, crop=[24, 20])
    assert s.size == (32, 32) and s.crop == (24, 20)
    assert PreprocessSpec().size is None and PreprocessSpec().normalize == "none"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"channels": 2}, ["channels", "(1, 3)"]),
        ({"normalize": "whiten"}, ["normalize", "standardize", "minmax"]),
        ({"size": 0}, ["size"]),
        ({"size": "big"}, ["size"]),
        ({"size": 16, "crop": 20}, ["crop", "size"]),
    ],
)
def test_spec_rejects_bad_values_by_name(kwargs, words):
    with pytest.raises(ValueError) as e:
        PreprocessSpec(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_from_dict_rejects_unknown_keys():
    assert PreprocessSpec.from_dict({"channels": 3, "size": [8, 8]}).size == (8, 8)
    with pytest.raises(ValueError, match="whitening"):
        PreprocessSpec.from_dict({"whitening": True})


def test_to_chw_layouts_and_scaling():
    hw = np.full((4, 5), 255, np.uint8)
    assert preprocess.to_chw(hw).shape == (1, 4, 5)
    assert preprocess.to_chw(hw).max() == 1.0
    hwc = np.zeros((4, 5, 3), np.uint8)
    assert preprocess.to_chw(hwc).shape == (3, 4, 5)
    chw = np.zeros((3, 4, 5), np.float32)
    assert preprocess.to_chw(chw).shape == (3, 4, 5)
    assert preprocess.to_chw(np.array([[True, False]])).tolist() == [[[1.0, 0.0]]]


def test_channel_conversion_luma_and_replication():
    rgb = np.zeros((3, 2, 2), np.float32)
    rgb[0] = 1.0  # pure red
    grey = preprocess.convert_channels(rgb, 1)
    assert grey.shape == (1, 2, 2) and np.allclose(grey, 0.299)
    batch = np.stack([rgb, rgb])
    assert preprocess.convert_channels(batch, 1).shape == (2, 1, 2, 2)
    back = preprocess.convert_channels(grey, 3)
    assert back.shape == (3, 2, 2) and np.allclose(back, 0.299)
    rgba = np.ones((4, 2, 2), np.float32)
    assert preprocess.convert_channels(rgba, 3).shape == (3, 2, 2)


def test_resize_keeps_constant_images_and_range():
    x = np.full((1, 10, 7), 0.25, np.float32)
    y = preprocess.resize(x, (5, 14))
    assert y.shape == (1, 5, 14) and y.dtype == np.float32 and np.allclose(y, 0.25)
    ramp = np.tile(np.linspace(0, 1, 40, dtype=np.float32), (3, 40, 1))
    z = preprocess.resize(ramp, (10, 10))
    assert z.min() >= 0 and z.max() <= 1 and np.all(np.diff(z[0, 0]) > 0)


def test_center_and_random_crops():
    b = np.arange(2 * 1 * 6 * 6, dtype=np.float32).reshape(2, 1, 6, 6)
    c = preprocess.crop(b, (2, 2))
    assert np.array_equal(c[0, 0], b[0, 0, 2:4, 2:4])
    r1 = preprocess.crop(b, (3, 3), np.random.default_rng(5))
    r2 = preprocess.crop(b, (3, 3), np.random.default_rng(5))
    assert r1.shape == (2, 1, 3, 3) and np.array_equal(r1, r2)
    # each crop is a genuine window of its own example
    for i in range(2):
        windows = [b[i, 0, t : t + 3, l : l + 3] for t in range(4) for l in range(4)]
        assert any(np.array_equal(r1[i, 0], w) for w in windows)
    with pytest.raises(ValueError, match="crop"):
        preprocess.crop(b, (7, 7))


def test_standardize_gives_zero_mean_unit_std_per_example():
    rng = np.random.default_rng(0)
    b = rng.uniform(0, 5, (6, 3, 8, 8)).astype(np.float32) * np.arange(1, 7)[:, None, None, None]
    out = preprocess.normalize(b, "standardize")
    flat = out.reshape(6, -1)
    assert np.allclose(flat.mean(1), 0, atol=1e-5) and np.allclose(flat.std(1), 1, atol=1e-4)


def test_minmax_gives_unit_range_per_example():
    b = np.random.default_rng(1).normal(size=(4, 1, 5, 5)).astype(np.float32)
    flat = preprocess.normalize(b, "minmax").reshape(4, -1)
    assert np.allclose(flat.min(1), 0) and np.allclose(flat.max(1), 1)


@pytest.mark.parametrize("mode", ["standardize", "minmax"])
def test_flat_examples_normalise_to_zero_not_nan(mode):
    out = preprocess.normalize(np.full((2, 1, 3, 3), 7.0, np.float32), mode)
    assert np.all(out == 0)


def test_normalize_none_is_identity_and_unknown_mode_raises():
    b = np.ones((1, 1, 2, 2), np.float32)
    assert preprocess.normalize(b, "none") is b
    with pytest.raises(ValueError, match="normalize"):
        preprocess.normalize(b, "zca")


def test_apply_pipeline_mixed_sizes():
    imgs = [np.zeros((3, 10, 12), np.uint8), np.full((1, 20, 20), 255, np.uint8)]
    spec = PreprocessSpec(channels=1, size=(8, 8), crop=(6, 6), normalize="none")
    out = preprocess.apply(imgs, spec, np.random.default_rng(0))
    assert out.shape == (2, 1, 6, 6) and out.dtype == np.float32
    assert np.allclose(out[0], 0) and np.allclose(out[1], 1)
    # without a size, images follow the first one (or the given default)
    assert preprocess.apply(imgs, PreprocessSpec(channels=3)).shape == (2, 3, 10, 12)
    assert preprocess.apply(imgs, PreprocessSpec(), default_size=(4, 4)).shape == (2, 1, 4, 4)


def test_fit_keeps_the_aspect_and_cuts_the_centre():
    """A 32x64 image, left half 0 and right half 1, fitted to 16x16: scaled by 1/2 to 16x32, then
    columns 8..23 cut out, so the left half of the result is 0 and the right half 1 (away from the edge)."""
    x = np.zeros((1, 32, 64), np.float32)
    x[:, :, 32:] = 1.0
    y = preprocess.fit(x, (16, 16))
    assert y.shape == (1, 16, 16)
    assert np.allclose(y[0, :, :7], 0.0) and np.allclose(y[0, :, 9:], 1.0)
    # a tall image scaled by 1/3: the result is source rows 30..59, the bright band (its edge rows
    # blend with the dark rows outside it: the downscale is anti-aliased)
    t = np.zeros((1, 90, 30), np.float32)
    t[:, 30:60] = 1.0
    z = preprocess.fit(t, (10, 10))
    assert z.shape == (1, 10, 10) and np.allclose(z[:, 1:9], 1.0, atol=1e-6)
    assert np.all((z[:, [0, 9]] > 0.5) & (z[:, [0, 9]] < 1.0))
    # the right size is returned as it is; an upscale covers the target
    same = x[:, :16, :16]
    assert preprocess.fit(same, (16, 16)) is same
    assert preprocess.fit(np.ones((3, 5, 7), np.float32), (16, 16)).shape == (3, 16, 16)


def test_bfloat16_bits_are_the_upper_half_of_float32():
    from downpour.neurons.images import bfloat16_to_float32

    bits = np.array([0x3F80, 0x3F00, 0xC000, 0x0000, 0x4049], np.uint16)
    np.testing.assert_array_equal(bfloat16_to_float32(bits), [1.0, 0.5, -2.0, 0.0, np.float32(3.140625)])
