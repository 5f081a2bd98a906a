"""Dataset readers on small data made here: folders, .npy/.npz, IDX, bad input."""

import gzip
import logging
import struct

import numpy as np
import pytest
from PIL import Image

from downpour.feeder import idx
from downpour.feeder.datasets import ArrayDataset, FolderDataset, open_dataset
from downpour.feeder.preprocess import PreprocessSpec

IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def write_idx(path, arr, compress=False):
    """A naive IDX writer, independent of the reader under test."""
    arr = np.asarray(arr)
    header = bytes([0, 0, IDX_CODES[arr.dtype.type], arr.ndim])
    header += b"".join(struct.pack(">I", d) for d in arr.shape)
    body = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + body)


def save_img(path, value, size=(12, 10), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size
    arr = np.full((h, w) if mode == "L" else (h, w, 3), value, np.uint8)
    Image.fromarray(arr).save(path)


# ---- IDX ----


@pytest.mark.parametrize("dtype", list(IDX_CODES))
@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, dtype, compress):
    a = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    if np.issubdtype(dtype, np.unsignedinteger):
        a = np.arange(24, dtype=dtype).reshape(2, 3, 4)
    p = tmp_path / ("a.idx" + (".gz" if compress else ""))
    write_idx(p, a, compress)
    b = idx.read_idx(p)
    assert b.shape == a.shape and b.dtype == np.dtype(dtype) and np.array_equal(a, b)
    assert idx.is_idx(p)


def test_idx_rejects_garbage_and_truncation(tmp_path):
    p = tmp_path / "bad-idx3-ubyte"
    p.write_bytes(b"PK\x03\x04 definitely not idx")
    assert not idx.is_idx(p)
    with pytest.raises(ValueError, match="not an IDX file"):
        idx.read_idx(p)
    write_idx(p, np.zeros((4, 5, 5), np.uint8))
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        idx.read_idx(p)


def test_mnist_style_files_pair_images_with_labels(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    y = np.array([3, 1, 4, 1, 5, 9, 2], np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", x, compress=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", y)
    ds = open_dataset(tmp_path / "train-images-idx3-ubyte.gz")
    assert len(ds) == 7 and ds.shape == (1, 28, 28) and ds.num_classes == 10
    xb, yb = ds.get([6, 0])
    assert xb.dtype == np.float32 and yb.dtype == np.int64 and yb.tolist() == [2, 3]
    assert np.allclose(xb[1, 0], x[0] / 255.0)
    # without a labels file the images are unlabeled
    write_idx(tmp_path / "t10k-images-idx3-ubyte", x)
    solo = open_dataset(tmp_path / "t10k-images-idx3-ubyte")
    assert solo.get([0])[1] is None and solo.num_classes == 0


# ---- arrays ----


def test_npz_with_labels_and_layouts(tmp_path):
    x = np.random.default_rng(1).random((5, 8, 9, 3)).astype(np.float32)  # NHWC
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2, 1, 0]))
    ds = open_dataset(tmp_path / "d.npz", PreprocessSpec(channels=3))
    assert ds.shape == (3, 8, 9) and ds.num_classes == 3 and len(ds) == 5
    xb, yb = ds.get(np.array([4, 2]))
    assert np.allclose(xb[0], np.moveaxis(x[4], -1, 0)) and yb.tolist() == [0, 2]


def test_npy_is_unlabeled_and_memory_mapped(tmp_path):
    x = np.random.default_rng(2).integers(0, 256, (6, 1, 10, 10), dtype=np.uint8)  # NCHW
    np.save(tmp_path / "d.npy", x)
    ds = open_dataset(str(tmp_path / "d.npy"), {"size": [5, 5], "normalize": "standardize"})
    assert isinstance(ds.x, np.memmap)
    xb, yb = ds.get(range(6))
    assert yb is None and xb.shape == (6, 1, 5, 5)
    assert np.allclose(xb.reshape(6, -1).mean(1), 0, atol=1e-5)


def test_npz_without_x_or_broken_names_the_problem(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="'x'"):
        open_dataset(tmp_path / "d.npz")
    (tmp_path / "e.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="e.npz"):
        open_dataset(tmp_path / "e.npz")
    np.savez(tmp_path / "f.npz", x=np.zeros((0, 4, 4)))
    with pytest.raises(ValueError, match="no examples"):
        open_dataset(tmp_path / "f.npz")
    np.savez(tmp_path / "g.npz", x=np.zeros((3, 4, 4)), y=np.zeros(2, int))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        open_dataset(tmp_path / "g.npz")


def test_random_crops_are_seeded(tmp_path):
    x = np.random.default_rng(3).random((4, 16, 16)).astype(np.float32)
    a = ArrayDataset(x, spec=PreprocessSpec(crop=8, seed=7)).get(range(4))[0]
    b = ArrayDataset(x, spec=PreprocessSpec(crop=8, seed=7)).get(range(4))[0]
    assert a.shape == (4, 1, 8, 8) and np.array_equal(a, b)


def test_get_rejects_out_of_range_and_handles_empty():
    ds = ArrayDataset(np.zeros((3, 4, 4)))
    with pytest.raises(IndexError):
        ds.get([3])
    x, y = ds.get([])
    assert x.shape == (0, 1, 4, 4) and y is None


# ---- folders ----


def test_folder_with_class_subfolders(tmp_path):
    save_img(tmp_path / "dogs" / "a.png", 10)
    save_img(tmp_path / "cats" / "b.jpg", 200, mode="RGB")
    save_img(tmp_path / "cats" / "deeper" / "c.PNG", 100)
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    ds = open_dataset(tmp_path, PreprocessSpec(channels=3, size=(6, 5)))
    assert isinstance(ds, FolderDataset)
    assert ds.classes == ["cats", "dogs"] and ds.num_classes == 2 and len(ds) == 3
    x, y = ds.get(range(3))
    assert x.shape == (3, 3, 6, 5) and ds.shape == (3, 6, 5)
    assert y.tolist() == [0, 0, 1]  # sorted paths: cats/b.jpg, cats/deeper/c.PNG, dogs/a.png
    assert abs(x[2].mean() - 10 / 255) < 1e-3 and abs(x[0].mean() - 200 / 255) < 0.02  # JPEG is lossy


def test_flat_folder_is_unlabeled_and_sized_by_first_image(tmp_path):
    save_img(tmp_path / "1.png", 0, size=(8, 8))
    save_img(tmp_path / "2.png", 255, size=(16, 4))
    ds = open_dataset(tmp_path)
    assert ds.num_classes == 0 and ds.shape == (1, 8, 8)
    x, y = ds.get([0, 1])
    assert y is None and x.shape == (2, 1, 8, 8) and np.allclose(x[1], 1.0)


def test_corrupt_file_is_skipped_counted_logged_once_and_reported(tmp_path, caplog):
    save_img(tmp_path / "a" / "0.png", 50)
    (tmp_path / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    save_img(tmp_path / "b" / "2.png", 150)
    seen = []
    ds = open_dataset(tmp_path, PreprocessSpec(size=4), on_skip=lambda p, r: seen.append((p, r)))
    with caplog.at_level(logging.WARNING, logger="downpour.feeder.datasets"):
        for _ in range(3):
            x, y = ds.get([1, 1, 0])
    assert x.shape == (3, 1, 4, 4)
    # the bad slot is filled by the next readable file (b/2.png), with its label
    assert y.tolist() == [1, 1, 0] and np.allclose(x[0], 150 / 255, atol=1e-3)
    assert ds.skipped == 1 and len(seen) == 1 and seen[0][0].endswith("1.png")
    assert sum("1.png" in r.getMessage() for r in caplog.records) == 1


def test_folder_of_only_corrupt_files_raises(tmp_path):
    (tmp_path / "x.png").write_bytes(b"nope")
    ds = open_dataset(tmp_path, {"size": 4})
    with pytest.raises(ValueError, match="none of its 1 image files is readable"):
        ds.get([0])


# ---- open_dataset errors ----


def test_missing_and_empty_and_unknown(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "data.csv").write_text("1,2,3")
    with pytest.raises(ValueError, match="unknown kind.*default.*npz.*IDX"):
        open_dataset(tmp_path / "data.csv")
    with pytest.raises(ValueError, match="normalize"):
        open_dataset(tmp_path / "empty", {"normalize": "sphere"})
    with pytest.raises(ValueError, match="unknown split"):
        open_dataset("default:validation")


def test_folder_reads_16bit_rgba_and_palette_images(tmp_path):
    Image.fromarray(np.full((6, 6), 40000, np.uint16)).save(tmp_path / "a.png")  # 16-bit grey
    Image.fromarray(np.full((6, 6, 4), 255, np.uint8)).save(tmp_path / "b.png")  # RGBA
    Image.fromarray(np.full((6, 6), 128, np.uint8)).convert("P").save(tmp_path / "c.gif")  # palette
    x, _ = open_dataset(tmp_path).get(range(3))
    assert np.allclose(x.reshape(3, -1).mean(1), [40000 / 65535, 1.0, 128 / 255], atol=1e-4)
