"""The object categories the faces experiment can look for: the bundled faces, or a user's
folders of images of any other object.

A category is a set of aligned images of the object (one per identity: one
person, one coin, one cat) and, optionally, images of the same photographs
without the object (LFW's non-faces are the backgrounds of the same photos as
its faces). ``faceviews`` splits both by index into folds and draws every
training frame and test image from them.

- ``face_category``: lfw_subset's 100 faces and 100 non-faces, plus the bundled
  200 distractors matched to the held-out faces' brightness and contrast.
- ``load_category``: a user's folder of positives and optional folder of
  negatives (any image Pillow reads, any size, fitted to the frame).
- ``bundled_test_category``: a small non-face category (the coins of
  scikit-image's ``coins`` photo, and the dark cloth between them) written to
  image files and read back through ``load_category``: what the tests use.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np

from downpour.evals import facedata
from downpour.feeder import bundled, preprocess

MIN_POSITIVES = 4  # two folds, each with at least two identities to choose on and two to test
# the coins photo (303x384): centres (row, col) of its 4 rows x 6 columns of coins, and the side
# of a square that holds one coin with a little of the cloth around it
COIN_ROWS = (52, 125, 195, 262)
COIN_COLS = (45, 100, 155, 215, 275, 338)
COIN_SIDE = 64
GAP_SIDE = 40  # the negatives: squares centred between four coins, mostly cloth


@dataclass
class Category:
    """One object category: raw [0, 1] float32 images (N, C, H, W), already fitted to the frame."""

    name: str
    positives: np.ndarray  # the aligned object, one image per identity
    negatives: np.ndarray  # the same photos without the object; may be 0 long
    source: str  # where the images came from (a folder, or the bundled data)
    hard_negatives: bool  # True only for faces: the face cascade's hits mean something only for faces
    # distractors test A halves (matched to the positives' brightness and contrast); None: test A
    # draws them from natural crops matched to the positives
    distractors: np.ndarray | None = None

    def __post_init__(self) -> None:
        for what, a in (("positives", self.positives), ("negatives", self.negatives)):
            if a.ndim != 4:
                raise ValueError(f"category {self.name!r}: {what} must be (N, C, H, W), got shape {a.shape}")
        if len(self.positives) < MIN_POSITIVES:
            raise ValueError(
                f"category {self.name!r}: {len(self.positives)} positives; need at least {MIN_POSITIVES} "
                "(two folds of at least two identities each)"
            )
        if len(self.negatives) and self.negatives.shape[1:] != self.positives.shape[1:]:
            raise ValueError(
                f"category {self.name!r}: negatives are {self.negatives.shape[1:]}, positives "
                f"{self.positives.shape[1:]}; both must be fitted to one frame"
            )

    @property
    def size(self) -> tuple[int, int]:
        return (int(self.positives.shape[2]), int(self.positives.shape[3]))

    @property
    def channels(self) -> int:
        return int(self.positives.shape[1])


def _fitted(images: np.ndarray, size: tuple[int, int], channels: int) -> np.ndarray:
    conv = preprocess.convert_channels(np.asarray(images, np.float32), channels)
    return np.stack([preprocess.resize(x, size) for x in conv]).astype(np.float32)


def face_category(size: tuple[int, int] = (32, 32), channels: int = 1) -> Category:
    """lfw_subset's 100 faces and 100 non-faces resized to ``size``, with the bundled distractors."""
    lfw = bundled.lfw()
    splits = facedata._splits((int(size[0]), int(size[1])), channels)
    distractors, _ = splits.distractors.get(np.arange(len(splits.distractors)))
    return Category(
        name="faces",
        positives=_fitted(lfw[: bundled.N_FACES], size, channels),
        negatives=_fitted(lfw[bundled.N_FACES :], size, channels),
        source="bundled lfw_subset (scikit-image)",
        hard_negatives=True,
        distractors=np.asarray(distractors, np.float32),
    )


def load_category(
    positives_dir: str,
    negatives_dir: str | None = None,
    size: tuple[int, int] = (32, 32),
    channels: int = 1,
    name: str = "",
) -> Category:
    """A user's category: every image in ``positives_dir`` (one per identity), and in
    ``negatives_dir`` if given (the same photos without the object; omitted: none).

    Any image Pillow reads, any size, each fitted to ``size``. Errors name the
    folder or file: a missing folder, one without images, an unreadable file,
    fewer than ``MIN_POSITIVES`` positives.
    """
    name = name or os.path.basename(os.path.normpath(positives_dir)) or "object"
    pos, _ = facedata.read_folder(positives_dir, size, channels, what="positives:")
    if len(pos) < MIN_POSITIVES:
        raise ValueError(
            f"positives: {positives_dir} holds {len(pos)} image(s); need at least {MIN_POSITIVES} "
            "(two folds of at least two identities each)"
        )
    if negatives_dir:
        neg, _ = facedata.read_folder(negatives_dir, size, channels, what="negatives:")
    else:
        neg = np.zeros((0, channels, *size), np.float32)
    source = positives_dir + (f" (negatives {negatives_dir})" if negatives_dir else "")
    return Category(name, pos, neg, source, hard_negatives=False)


def write_category_folders(dirpath: str, n_positives: int = 12, n_negatives: int = 6) -> tuple[str, str]:
    """Write the bundled test category's images into ``dirpath``/coins and ``dirpath``/cloth.

    Positives: ``n_positives`` coins of the ``coins`` photo, each cropped with a
    little cloth around it at its native size (PNG); negatives: squares of the
    cloth between four coins (JPEG). Returns the two folders.
    """
    from PIL import Image  # noqa: PLC0415 - only the tests write images
    from skimage import data  # noqa: PLC0415 - heavy (~0.4 s), loaded only when the test category is built

    coins = data.coins()
    centres = [(r, c) for r in COIN_ROWS for c in COIN_COLS]
    gaps = [
        ((r0 + r1) // 2, (c0 + c1) // 2)
        for r0, r1 in zip(COIN_ROWS, COIN_ROWS[1:])
        for c0, c1 in zip(COIN_COLS, COIN_COLS[1:])
    ]
    if not (0 < n_positives <= len(centres) and 0 <= n_negatives <= len(gaps)):
        raise ValueError(f"the coins photo has {len(centres)} coins and {len(gaps)} gaps between them")
    pos_dir, neg_dir = os.path.join(dirpath, "coins"), os.path.join(dirpath, "cloth")
    os.makedirs(pos_dir, exist_ok=True)
    os.makedirs(neg_dir, exist_ok=True)

    def cut(r: int, c: int, side: int) -> np.ndarray:
        t = int(np.clip(r - side // 2, 0, coins.shape[0] - side))
        l = int(np.clip(c - side // 2, 0, coins.shape[1] - side))
        return coins[t : t + side, l : l + side]

    for i, (r, c) in enumerate(centres[:n_positives]):
        Image.fromarray(cut(r, c, COIN_SIDE)).save(os.path.join(pos_dir, f"coin{i:02d}.png"))
    for i, (r, c) in enumerate(gaps[:n_negatives]):
        Image.fromarray(cut(r, c, GAP_SIDE)).save(os.path.join(neg_dir, f"cloth{i:02d}.jpg"), quality=95)
    return pos_dir, neg_dir


def bundled_test_category(size: tuple[int, int] = (32, 32), channels: int = 1, dirpath: str = "") -> Category:
    """The coins category, written as image files (into ``dirpath``, or a fresh temporary
    folder) and read back with ``load_category``: the user's path, end to end."""
    dirpath = dirpath or tempfile.mkdtemp(prefix="downpour-coins-")
    pos_dir, neg_dir = write_category_folders(dirpath)
    return load_category(pos_dir, neg_dir, size, channels, name="coins")
