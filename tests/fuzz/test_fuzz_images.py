"""Corrupt and hostile images against the feeder (a dataset folder) and the neurons service (encoded_images).

Truncated files, random bytes, empty files, a PNG whose header claims
100000 x 100000 pixels (a decompression bomb), a valid 6000 x 6000 PNG, and
images in every awkward mode (CMYK, 16-bit, palette, RGBA, 1-bit, LA). The
feeder must skip what it cannot read (and count it) and serve the rest; the
neurons service must answer each with OK or INVALID_ARGUMENT; both must live on.
"""

from __future__ import annotations

import io
import struct
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image

from downpour.rpc.codec import tensor_to_proto
from downpour.v1 import common_pb2, feeder_pb2, feeder_pb2_grpc, neurons_pb2, neurons_pb2_grpc

pytestmark = pytest.mark.slow


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(w=100_000, h=100_000) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
        + _png_chunk(b"IEND", b"")
    )


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def hostile(size=16) -> dict[str, bytes]:
    """name -> bytes; names say whether a reader should manage (ok_*) or refuse (bad_*)."""
    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8))
    png = _encode(grey, "PNG")
    return {
        "bad_truncated.png": png[: len(png) // 2],
        "bad_header_only.png": png[:33],
        "bad_empty.jpg": b"",
        "bad_random.png": rng.bytes(500),
        "bad_text.png": b"this is not an image\n" * 10,
        "bad_bomb.png": bomb_png(),
        "bad_huge_valid.png": _encode(Image.new("L", (6000, 6000)), "PNG"),
        "ok_cmyk.jpg": _encode(grey.convert("CMYK"), "JPEG"),
        "ok_16bit.png": _encode(Image.fromarray(np.asarray(grey).astype(np.uint16) * 257), "PNG"),
        "ok_palette.gif": _encode(grey.convert("P"), "GIF"),
        "ok_rgba.png": _encode(grey.convert("RGBA"), "PNG"),
        "ok_bilevel.bmp": _encode(grey.convert("1"), "BMP"),
        "ok_la.png": _encode(grey.convert("LA"), "PNG"),
    }


def test_the_feeder_skips_hostile_files_and_serves_the_rest(procs, tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    rng = np.random.default_rng(1)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(d / f"good_{i:02d}.png")
    files = hostile(20)
    for name, data in files.items():
        (d / name).write_bytes(data)
    p = procs.serve("feeder", "--data", str(d), "--shape", "1,16,16", metrics=True, deadline=90)
    addr = p.address
    with grpc.insecure_channel(addr) as ch:
        stub = feeder_pb2_grpc.DataFeederStub(ch)
        info = stub.DatasetInfo(feeder_pb2.DatasetInfoRequest(), timeout=10)
        seen = 0
        for split in (feeder_pb2.SPLIT_TRAIN, feeder_pb2.SPLIT_TEST):
            req = feeder_pb2.StreamBatchesRequest(
                replica=0, num_replicas=1, batch_size=4, split=split, deterministic=True, max_batches=12
            )
            for resp in stub.StreamBatches(req, timeout=120):
                x = np.frombuffer(resp.examples.data, "<f4").reshape(tuple(resp.examples.shape))
                assert x.shape[1:] == (1, 16, 16) and np.all(np.isfinite(x))
                seen += x.shape[0]
        assert seen > 0 and info.num_examples > 0
    skipped = p.metric("downpour_feeder_skipped_files_total")
    bad = sum(n.startswith("bad_") for n in files)
    assert skipped is not None and skipped >= bad - 1, (skipped, bad)  # the 6000x6000 one may decode
    assert p.alive()


def test_the_neurons_service_refuses_hostile_images_cleanly(procs):
    p = procs.serve("neurons", "--random-seed", "0", "--preset", "tiny", metrics=True, deadline=90)
    addr = p.address
    codes = {}
    with grpc.insecure_channel(addr, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = neurons_pb2_grpc.NeuronsStub(ch)
        desc = stub.DescribeModel(neurons_pb2.DescribeModelRequest(), timeout=30)
        layer = desc.layers[0].name

        def ask(req):
            try:
                stub.GetActivations(req, timeout=60)
                return grpc.StatusCode.OK
            except grpc.RpcError as e:
                return e.code()

        for name, data in hostile(16).items():
            codes[name] = ask(neurons_pb2.GetActivationsRequest(encoded_images=[data], layer=layer))
        # Tensors that lie about their size, or claim absurd dimensions.
        lies = {
            "tensor_huge_dims": common_pb2.Tensor(
                dtype=common_pb2.DTYPE_FLOAT32, shape=[2**31, 2**31, 16, 1], data=b"\x00" * 64
            ),
            "tensor_short_data": common_pb2.Tensor(
                dtype=common_pb2.DTYPE_FLOAT32, shape=[1, 16, 16, 1], data=b"\x00" * 10
            ),
            "tensor_wrong_dtype": common_pb2.Tensor(dtype=99, shape=[1, 16, 16, 1], data=b"\x00" * 1024),
            "tensor_nan": tensor_to_proto(np.full((1, 16, 16, 1), np.nan, np.float32)),
            "tensor_wrong_size": tensor_to_proto(np.zeros((1, 17, 5, 1), np.float32)),
        }
        for name, t in lies.items():
            # other sizes are fitted to the model's input unless the request refuses resizing
            codes[name] = ask(
                neurons_pb2.GetActivationsRequest(images=t, layer=layer, no_resize=name == "tensor_wrong_size")
            )
        # each within the per-image limit, together past the request's (8 x 36 M pixels)
        codes["many_huge_valid"] = ask(
            neurons_pb2.GetActivationsRequest(encoded_images=[hostile(16)["bad_huge_valid.png"]] * 8, layer=layer)
        )
        codes["tensor_other_size_fitted"] = ask(
            neurons_pb2.GetActivationsRequest(images=tensor_to_proto(np.zeros((1, 17, 5, 1), np.float32)), layer=layer)
        )
        stub.DescribeModel(neurons_pb2.DescribeModelRequest(), timeout=30)  # still answering
    assert p.alive()
    print("\nneurons answers:", {k: v.name for k, v in codes.items()})
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
    assert all(c in allowed for c in codes.values()), codes
    # a 6000x6000 photo is a photo to the neurons service (fitted to the input); eight at once are refused
    assert codes["bad_huge_valid.png"] == grpc.StatusCode.OK
    for name, c in codes.items():
        if (name.startswith("bad_") and name != "bad_huge_valid.png") or name in (
            "tensor_huge_dims",
            "tensor_short_data",
            "tensor_wrong_dtype",
            "tensor_wrong_size",
            "many_huge_valid",
        ):
            assert c == grpc.StatusCode.INVALID_ARGUMENT, (name, c)
    assert codes["bad_bomb.png"] == grpc.StatusCode.INVALID_ARGUMENT
    assert codes["tensor_other_size_fitted"] == grpc.StatusCode.OK
