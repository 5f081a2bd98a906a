"""Views of an object the way a video shows it: scaled, turned, moved, lit differently and
mirrored, over whatever scene surrounds it.

One function (``views``) draws every view of the faces experiment: the
training pool's frames (``facedata.video_pool``, ``faceviews.fold_pool``) and
the jittered test views (``faceviews.test_b``). A ``Jitter`` says how far each
view may move; the defaults live with their callers.

Where the moved object no longer covers the frame, a natural-image crop shows
through: the object is composited over it with the bilinear coverage of its
own warp, so its border blends like a real edge, and a NaN anywhere in the
object stays NaN in the frame (a poisoned image can never vanish from a test).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from downpour.feeder import preprocess


@dataclass(frozen=True)
class Jitter:
    """How far one view of an object may differ from the aligned object.

    The object, first resized to the frame, is scaled about the frame's centre
    by ``s = exp(uniform(*log_scale))`` (its side over the frame's side),
    rotated by up to ``max_rotation`` degrees, and shifted along each axis by
    up to ``shift_slack * max(0, (1 - s) / 2) + shift_frac`` of the side plus
    ``shift_px`` pixels; its contrast is multiplied by up to ``exp(+-log_contrast)``
    about its mean, ``+-max_brightness`` is added, and the frame is mirrored
    half the time when ``mirror``.
    """

    log_scale: tuple[float, float]
    max_rotation: float
    shift_slack: float
    shift_frac: float
    shift_px: float
    log_contrast: float
    max_brightness: float
    mirror: bool = True

    def max_shift(self, s: float, side: int) -> float:
        """The largest shift, in pixels, along an axis of ``side`` pixels for an object of scale ``s``."""
        return (self.shift_slack * max(0.0, (1.0 - s) / 2) + self.shift_frac) * side + self.shift_px


NONE = Jitter((0.0, 0.0), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, mirror=False)  # every view is the aligned object


def views(
    images: np.ndarray, per_image: int, backgrounds: np.ndarray, rng: np.random.Generator, jitter: Jitter
) -> np.ndarray:
    """``per_image`` views of each (C, h, w) image over random ``backgrounds`` (M, C, H, W):
    float32 (N * per_image, C, H, W); the views of image ``i`` are rows ``i * per_image`` on.

    Per view the draws come in a fixed order (scale, rotation, shift, contrast,
    brightness, mirror, background), so a seed fixes every view.
    """
    n = len(images)
    _, c, H, W = backgrounds.shape
    if n and images.shape[1] != c:
        raise ValueError(f"views: images have {images.shape[1]} channel(s), the backgrounds {c}")
    if n and per_image and not len(backgrounds):
        raise ValueError("views: no background crops to show around the moved object")
    out = np.empty((n * per_image, c, H, W), np.float32)
    ones = np.ones((H, W), np.float64)
    lo, hi = jitter.log_scale
    for i in range(n):
        img = preprocess.resize(np.asarray(images[i], np.float32), (H, W))
        for j in range(per_image):
            s = float(np.exp(rng.uniform(lo, hi)))
            degrees = rng.uniform(-jitter.max_rotation, jitter.max_rotation)
            reach = np.array([jitter.max_shift(s, W), jitter.max_shift(s, H)])
            shift = rng.uniform(-1.0, 1.0, 2) * reach
            t = preprocess.similarity((H, W), s, degrees, shift)
            gain = np.exp(rng.uniform(-jitter.log_contrast, jitter.log_contrast))
            bias = rng.uniform(-jitter.max_brightness, jitter.max_brightness)
            mirror = jitter.mirror and rng.random() < 0.5
            bg = backgrounds[rng.integers(len(backgrounds))]
            # the share of each pixel the moved object covers: the scene shows through the rest
            cover = preprocess.warp(ones, t, mode="constant", cval=0.0)
            for k in range(c):
                v = img[k]
                m = v.mean()
                v = np.clip(m + gain * (v - m) + bias, 0.0, 1.0)
                # not clipped: object and coverage are within [0, 1], so the frame is too (up to
                # rounding), and a background outside [0, 1] stays visible to the tests
                v = preprocess.warp(v, t, mode="constant", cval=0.0) + (1.0 - cover) * bg[k]
                out[i * per_image + j, k] = v[:, ::-1] if mirror else v
    return out
