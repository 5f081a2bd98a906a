"""Large images are reduced on their integer pixels before the float copy, and still fit as before.

``downpour.neurons.images.from_encoded(..., fit=)`` reduces an image over ``SHRINK_ABOVE``
pixels (JPEG by the decoder's own scaling) before any float copy; what reaches the model must
stay close to the exact fit of the full image, in every mode the reduction handles.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from downpour.neurons import images

FIT = (16, 16)


def _scene(w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    disc = ((xx - 0.6 * w) ** 2 + (yy - 0.45 * h) ** 2) < (0.2 * h) ** 2
    return np.stack([xx * 255 // w, yy * 255 // h, disc * 255], -1).astype(np.uint8)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "mode, fmt",
    [("RGB", "PNG"), ("RGBA", "PNG"), ("L", "PNG"), ("P", "PNG"), ("I;16", "PNG"), ("RGB", "JPEG"), ("1", "PNG")],
)
def test_a_large_image_is_reduced_first_and_fits_as_the_full_image_does(mode, fmt):
    rgb = Image.fromarray(_scene(1600, 1200))
    if mode == "I;16":
        im = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    else:
        im = rgb.convert(mode)
    data = _encode(im, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    full = images.from_encoded(data, "full")  # no fit: decoded at full size, as before
    small = images.from_encoded(data, "small", fit=FIT)
    assert full.shape[1:] == (1200, 1600)
    assert small.shape[0] == full.shape[0] and small.shape[1] < 1200 // 8  # reduced before the float copy
    assert min(small.shape[1:]) >= images.SHRINK_MARGIN * max(FIT)  # but never below the margin
    want = images.to_input([full], (1, *FIT))
    got = images.to_input([small], (1, *FIT))
    assert np.abs(got - want).max() < 0.03, np.abs(got - want).max()


def test_an_image_under_the_threshold_is_decoded_exactly_as_before():
    data = _encode(Image.fromarray(_scene(120, 90)), "JPEG", quality=95)
    np.testing.assert_array_equal(images.from_encoded(data, "a", fit=FIT), images.from_encoded(data, "a"))


def test_formats_outside_the_list_are_refused_by_name():
    data = _encode(Image.new("L", (8, 8)), "TIFF")
    limits = images.DecodeLimits(images.SERVICE_FORMATS)
    with pytest.raises(images.QueryError, match="accepted formats: PNG, JPEG, GIF, WEBP"):
        images.from_encoded(data, "x", limits=limits)
    assert images.from_encoded(data, "x").shape == (1, 8, 8)  # the library reads any format
