"""Using a trained network: a photo of any size, in process, through the service, the CLI and exported weights.

One real `downpour up` run (tiny preset, 20 steps, two shards) gives the run
folder; the service runs as `downpour serve neurons --checkpoint-dir` in its own
process, `downpour query` and `downpour export` in others. Every path is
compared against one independent evaluation written here: the checkpoint's
blocks read with `downpour.checkpoint`, the photo turned into the input with
Pillow and NumPy directly (float luma, bilinear scale so that it covers the
input, centre cut, per-example standardisation), and `downpour.nn.Network`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

import downpour
import harness
from downpour import checkpoint as checkpoints
from downpour.client import NeuronsClient
from downpour.nn import Network
from downpour.rpc import codec
from downpour.v1 import common_pb2
from downpour.v1 import neurons_pb2 as pb

LAYER = "stage2.output"


@pytest.fixture(scope="module")
def service(trained_run, tmp_path_factory):
    with harness.Procs(tmp_path_factory.mktemp("svc")) as procs:
        yield procs.serve("neurons", "--checkpoint-dir", str(trained_run / "checkpoints"))


def reference(trained_run: Path, photo_bytes: bytes, layer: str = LAYER) -> np.ndarray:
    """The expected activations, computed without downpour's image or query code."""
    m = checkpoints.newest_valid(trained_run / "checkpoints")
    cfg, params = checkpoints.load_params(trained_run / "checkpoints", m)
    spec = cfg.network_spec()
    c, h, w = spec.input
    assert c == 1
    im = Image.open(io.BytesIO(photo_bytes)).convert("RGB")
    a = np.asarray(im, np.float32) / 255.0
    grey = a @ np.array([0.299, 0.587, 0.114], np.float32)
    sh, sw = grey.shape
    s = max(h / sh, w / sw)
    rh, rw = max(h, round(sh * s)), max(w, round(sw * s))
    big = np.asarray(Image.fromarray(grey, mode="F").resize((rw, rh), Image.Resampling.BILINEAR), np.float32)
    top, left = (rh - h) // 2, (rw - w) // 2
    x = big[top : top + h, left : left + w].astype(np.float64)
    x = ((x - x.mean()) / x.std()).astype(np.float32)[None, None]
    return np.asarray(Network(spec).forward(params, x)[layer]).reshape(1, -1)


# -- 1. any image -------------------------------------------------------------------------


def test_a_photo_of_any_size_gives_the_same_activations_everywhere(trained_run, photo, service):
    want = reference(trained_run, photo.read_bytes())
    net = downpour.load(trained_run)
    np.testing.assert_allclose(net.activations([photo], LAYER).values, want, rtol=1e-4, atol=1e-5)
    with NeuronsClient(service.address) as nc:
        nc.wait_ready(60)
        remote = nc.activations([photo], LAYER)
        with pytest.raises(grpc.RpcError) as e:
            nc.activations([photo], LAYER, resize=False)
    np.testing.assert_allclose(remote.values, want, rtol=1e-4, atol=1e-5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "encoded_images[0] is 90x120; the model takes 16x16" in e.value.details()
    q = harness.run_cli("query", "--addr", service.address, "--image", str(photo), "--layer", LAYER, "--json")
    assert q.returncode == 0, q.stderr
    np.testing.assert_allclose([json.loads(q.stdout)["images"][0]["activations"]], want, rtol=1e-4, atol=1e-5)
    q = harness.run_cli("query", "--addr", service.address, "--image", str(photo), "--layer", LAYER, "--no-resize")
    assert q.returncode == 1 and "INVALID_ARGUMENT" in q.stderr and "90x120" in q.stderr


def test_modes_and_orientation_are_converted_as_decoded(trained_run, service, tmp_path):
    """Palette and RGBA give what their RGB pixels give; an EXIF-rotated photo what the upright one gives."""
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    pal = rgb.quantize(64)
    as_rgb = pal.convert("RGB")
    rgba = as_rgb.copy()
    rgba.putalpha(128)
    upright = Image.fromarray(rng.integers(0, 256, (30, 50), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the viewer turns the stored pixels 90 degrees clockwise
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera stores for that tag

    def enc(im, **kw):
        buf = io.BytesIO()
        im.save(buf, format="PNG", **kw)
        return buf.getvalue()

    with NeuronsClient(service.address) as nc:
        nc.wait_ready(60)
        got = nc.activations([enc(pal), enc(rgba), enc(as_rgb), enc(stored, exif=exif), enc(upright)], LAYER).values
    np.testing.assert_allclose(got[0], got[2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], got[2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[3], got[4], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[2], reference(trained_run, enc(as_rgb))[0], rtol=1e-4, atol=1e-5)


def test_bfloat16_tensors_are_read_as_bfloat16(service):
    """A bf16 0.5 is 0x3F00; it must act as 0.5 (float32), not as 0x3F00 / 65535."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 16, 16, 1)).astype(np.float32) / 256.0  # exact in bfloat16 (8 bits of mantissa)
    bits = (x.view(np.uint32) >> 16).astype("<u2")
    assert bits[0].flat[0] == np.float32(x[0].flat[0]).view(np.uint32) >> 16
    bf16 = common_pb2.Tensor(dtype=common_pb2.DTYPE_BFLOAT16, shape=list(x.shape), data=bits.tobytes())
    with NeuronsClient(service.address) as nc:
        nc.wait_ready(60)
        got = codec.tensor_from_proto(
            nc.stub.GetActivations(pb.GetActivationsRequest(images=bf16, layer=LAYER, raw=True), timeout=60).activations
        )
        f32 = nc.activations(x, LAYER, raw=True).values
        half = nc.activations(np.full((1, 16, 16, 1), 0.5, np.float32), LAYER, raw=True).values
        bf_half = codec.tensor_from_proto(
            nc.stub.GetActivations(
                pb.GetActivationsRequest(
                    images=common_pb2.Tensor(
                        dtype=common_pb2.DTYPE_BFLOAT16,
                        shape=[1, 16, 16, 1],
                        data=np.full(256, 0x3F00, "<u2").tobytes(),
                    ),
                    layer=LAYER,
                    raw=True,
                ),
                timeout=60,
            ).activations
        )
        with pytest.raises(grpc.RpcError) as e:
            nc.stub.GetActivations(
                pb.GetActivationsRequest(images=codec.tensor_to_proto(np.zeros((1, 16, 16, 1), np.int64)), layer=LAYER),
                timeout=60,
            )
    np.testing.assert_array_equal(got, f32)
    np.testing.assert_array_equal(bf_half, half)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "DTYPE_BFLOAT16" in e.value.details() and "DTYPE_UINT8 (0..255)" in e.value.details()
    assert "uint16" not in e.value.details()


# -- 2. in process ----------------------------------------------------------------------------


def test_in_process_answers_equal_the_service(trained_run, service):
    net = downpour.load(trained_run)
    info = net.describe()
    with NeuronsClient(service.address) as nc:
        nc.wait_ready(60)
        rinfo = nc.describe()
        assert [(l.name, l.shape) for l in info.layers] == [(l.name, l.shape) for l in rinfo.layers]
        assert (info.input_shape, info.checkpoint_id, info.step, info.normalize) == (
            rinfo.input_shape,
            rinfo.checkpoint_id,
            rinfo.step,
            rinfo.normalize,
        )
        u8 = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
        a, ra = net.activations(u8, "stage3.pool", [0, 5]), nc.activations(u8, "stage3.pool", [0, 5])
        np.testing.assert_array_equal(a.values, ra.values)
        assert a.neuron_ids == ra.neuron_ids == [0, 5] and a.layer_shape == ra.layer_shape
        top, rtop = (x.top_inputs("stage3.pool", (1, 0, 1), dataset="heldout", k=4, thumbnails=True) for x in (net, nc))
        assert [(t.example_id, t.label, t.thumbnail_png) for t in top] == [
            (t.example_id, t.label, t.thumbnail_png) for t in rtop
        ]
        np.testing.assert_allclose([t.activation for t in top], [t.activation for t in rtop], rtol=1e-6)
        h, rh = (x.activation_histogram("stage3.pool", 5, dataset="heldout", bins=7) for x in (net, nc))
        np.testing.assert_array_equal(h.counts, rh.counts)
        np.testing.assert_allclose(h.edges, rh.edges, rtol=1e-6)
        s, rs = (x.optimal_stimulus("stage3.pool", (1, 0, 1), steps=15, seed=2) for x in (net, nc))
        np.testing.assert_allclose(s.image, rs.image, rtol=1e-5, atol=1e-6)
    # the histogram counts every scanned example; its range is the activations' range
    assert h.counts.sum() == h.examples_scanned == len(downpour.load(trained_run).dataset("heldout", net.model()))
    assert h.edges[0] == pytest.approx(
        min(t.activation for t in net.top_inputs("stage3.pool", 5, dataset="heldout", k=1000)), rel=1e-6
    )
    assert h.edges[-1] == pytest.approx(top_activation(net, 5), rel=1e-6)


def top_activation(net, flat: int) -> float:
    return net.top_inputs("stage3.pool", flat, dataset="heldout", k=1)[0].activation


def test_load_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        downpour.load(tmp_path / "nope")
    with pytest.raises(ValueError, match="no committed checkpoint"):
        downpour.load(tmp_path)
    np.savez(tmp_path / "plain.npz", w=np.zeros(3))
    with pytest.raises(ValueError, match="__metadata__"):
        downpour.load(tmp_path / "plain.npz")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(ValueError, match="safetensors"):
        downpour.load(tmp_path / "junk.safetensors")


# -- 3. export --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_export_is_self_describing_and_loads_to_the_same_activations(trained_run, photo, tmp_path, fmt):
    out = tmp_path / f"w.{fmt}"
    r = harness.run_cli("export", "--checkpoint", str(trained_run), "--format", fmt, "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    m = checkpoints.newest_valid(trained_run / "checkpoints")
    cfg, params = checkpoints.load_params(trained_run / "checkpoints", m)
    shapes = Network(cfg.network_spec()).param_shapes()
    if fmt == "safetensors":
        from safetensors.numpy import load_file, safe_open

        arrays = load_file(str(out))
        with safe_open(str(out), framework="np") as f:
            meta = f.metadata()
    else:
        with np.load(out) as z:  # NumPy alone, no pickle
            arrays = {k: z[k] for k in z.files if k != "__metadata__"}
            meta = json.loads(z["__metadata__"].item())
    assert sorted(arrays) == sorted(shapes)
    for k, shape in shapes.items():
        assert arrays[k].shape == tuple(shape) and arrays[k].dtype == np.float32
        np.testing.assert_array_equal(arrays[k].reshape(-1), np.asarray(params[k]).reshape(-1))
    assert json.loads(meta["downpour.network_spec"])["input"] == list(cfg.network_spec().input)
    assert "preset: tiny" in meta["downpour.job_config"]
    assert meta["downpour.checkpoint_id"] == m["checkpoint_id"] and meta["downpour.step"] == str(m["step"])
    assert json.loads(r.stdout)["parameters"] == sum(int(np.prod(s)) for s in shapes.values())
    images = [photo, np.random.default_rng(4).integers(0, 256, (16, 16), dtype=np.uint8)]
    want = downpour.load(trained_run).activations(images, "stage3.output").values
    np.testing.assert_array_equal(downpour.load(out).activations(images, "stage3.output").values, want)
    assert downpour.load(out).describe().checkpoint_id == m["checkpoint_id"]


def test_export_errors_name_the_problem(tmp_path):
    r = harness.run_cli("export", "--checkpoint", str(tmp_path), "--format", "npz", "--out", str(tmp_path / "x.npz"))
    assert r.returncode == 2 and "no committed checkpoint" in r.stderr
    assert not (tmp_path / "x.npz").exists()


# -- CuPy where there is a GPU -------------------------------------------------------------


def test_cupy_backend_matches_numpy(trained_run, photo):
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - any CUDA error means: no usable GPU here
        pytest.skip(f"no usable GPU: {e}")
    cpu, gpu = downpour.load(trained_run), downpour.load(trained_run, backend="cupy")
    np.testing.assert_allclose(
        gpu.activations([photo], LAYER).values, cpu.activations([photo], LAYER).values, rtol=1e-4, atol=1e-5
    )
    a, b = (n.optimal_stimulus("stage3.pool", (0, 0, 0), steps=10) for n in (cpu, gpu))
    assert b.activation == pytest.approx(a.activation, rel=1e-3)


def test_a_client_with_nothing_but_reflection_gets_the_same_activations(trained_run, photo, service):
    """What grpcurl or a client generated in another language sees: the contract from server reflection,
    no downpour stubs. The photo goes as encoded bytes; the answer is a Tensor of float32 bytes."""
    with grpc.insecure_channel(service.address) as ch:
        grpc.channel_ready_future(ch).result(timeout=60)
        db = ProtoReflectionDescriptorDatabase(ch)
        assert "downpour.v1.Neurons" in db.get_services()
        pool = descriptor_pool.DescriptorPool(db)
        method = pool.FindServiceByName("downpour.v1.Neurons").FindMethodByName("GetActivations")
        Req = message_factory.GetMessageClass(method.input_type)
        Resp = message_factory.GetMessageClass(method.output_type)
        call = ch.unary_unary(
            "/downpour.v1.Neurons/GetActivations",
            request_serializer=Req.SerializeToString,
            response_deserializer=Resp.FromString,
        )
        r = call(Req(encoded_images=[photo.read_bytes()], layer=LAYER), timeout=60)
    assert pool.FindEnumTypeByName("downpour.v1.Dtype").values_by_number[r.activations.dtype].name == "DTYPE_FLOAT32"
    got = np.frombuffer(r.activations.data, "<f4").reshape(list(r.activations.shape))
    np.testing.assert_allclose(got, reference(trained_run, photo.read_bytes()), rtol=1e-4, atol=1e-5)


def test_cupy_backend_without_cupy_says_how_to_get_it(trained_run):
    try:
        import cupy  # noqa: F401 - only whether it imports matters here
    except ImportError:
        with pytest.raises(ValueError, match="needs CuPy"):
            downpour.load(trained_run, backend="cupy")
    else:
        pytest.skip("CuPy is installed here: test_cupy_backend_matches_numpy covers it")
