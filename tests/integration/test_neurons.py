"""The Neurons service against real processes on 127.0.0.1.

The service runs as `python -m downpour.cli serve neurons` processes (tests/harness.py; with
random weights, live parameter shards, or a checkpoint directory) and is
queried by the gRPC client of this process and by `downpour query` in a third
process. Results are compared with the same network evaluated in-process.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from PIL import Image

import harness
from downpour import config as jobconfig
from downpour.client import NeuronsClient
from downpour.evals.common import preprocess_for
from downpour.feeder import bundled, preprocess
from downpour.neurons.model import NeuronModel, Unit, layer_shapes
from downpour.nn import Network, presets
from downpour.paramserver.client import ParamClient, balanced_placement
from downpour.partition import plan, split_params
from downpour.rpc import codec
from downpour.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from downpour.v1 import neurons_pb2 as pb

SPEC = presets.get("tiny")
H, W = SPEC.input[1:]


def client(p: harness.Service) -> NeuronsClient:
    nc = NeuronsClient(p.address, timeout=60)
    nc.wait_ready(60)
    return nc


@pytest.fixture(scope="module")
def random_server(tmp_path_factory):
    with harness.Procs(tmp_path_factory.mktemp("neurons")) as procs:
        yield procs.serve("neurons", "--preset", "tiny", "--random-seed", "3", "--max-images", "8")


@pytest.fixture(scope="module")
def local_model():
    return NeuronModel(SPEC, Network(SPEC).init_params(3))


def images(n: int, seed: int = 0) -> np.ndarray:
    """n random uint8 images [n, H, W, 1]."""
    return np.random.default_rng(seed).integers(0, 256, (n, H, W, 1), dtype=np.uint8)


def png(img_hw: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(img_hw)
    (im.convert(mode) if mode != "L" else im).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (w, h)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def expected(model: NeuronModel, u8: np.ndarray, layer: str) -> np.ndarray:
    x = preprocess.normalize(np.moveaxis(u8.astype(np.float32) / 255.0, -1, 1), "standardize")
    return model.layer_activations(x, layer)


# -- shapes and values ------------------------------------------------------------------


def test_describe_lists_every_layer_with_its_shape(random_server):
    with client(random_server) as nc:
        d = nc.describe()
    assert {l.name: tuple(l.shape) for l in d.layers} == layer_shapes(SPEC)
    assert list(d.input_shape) == [H, W, 1]
    assert d.normalize == "standardize" and d.max_images == 8
    assert "heldout_faces" in d.datasets and "random initialisation" in d.source


@pytest.mark.parametrize("layer", list(layer_shapes(SPEC)))
def test_every_unit_of_every_layer_matches_the_local_network(random_server, local_model, layer):
    u8 = images(3)
    with client(random_server) as nc:
        r = nc.activations(u8, layer)
    c, h, w = layer_shapes(SPEC)[layer]
    assert r.values.shape == (3, c * h * w) and r.layer_shape == (c, h, w)
    assert r.neuron_ids == list(range(c * h * w))
    np.testing.assert_allclose(r.values, expected(local_model, u8, layer), rtol=1e-5, atol=1e-5)


def test_encoded_png_equals_tensor_and_neuron_selection(random_server, local_model):
    u8 = images(2, seed=1)
    with client(random_server) as nc:
        by_png = nc.activations([png(u8[0, :, :, 0]), png(u8[1, :, :, 0], "RGB")], "stage2.output", [0, 5, 7])
        by_tensor = nc.activations(u8, "stage2.output", [0, 5, 7])
        by_ref = nc.activations(u8, "stage2.output", [(0, 0, 0), (1, 1, 0), (1, 1, 2)])
        raw = nc.activations(u8.astype(np.float32) / 255.0, "stage2.output", [5], raw=True)
    want = expected(local_model, u8, "stage2.output")[:, [0, 5, 7]]
    assert by_png.values.shape == (2, 3)
    np.testing.assert_allclose(by_png.values, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(by_tensor.values, want, rtol=1e-5, atol=1e-5)
    shape = layer_shapes(SPEC)["stage2.output"]
    ids = [np.ravel_multi_index(t, shape) for t in [(0, 0, 0), (1, 1, 0), (1, 1, 2)]]
    np.testing.assert_allclose(by_ref.values, expected(local_model, u8, "stage2.output")[:, ids], rtol=1e-5)
    x = np.moveaxis(u8.astype(np.float32) / 255.0, -1, 1)
    np.testing.assert_allclose(raw.values[:, 0], local_model.layer_activations(x, "stage2.output")[:, 5], rtol=1e-5)


# -- every error ---------------------------------------------------------------------------


def _err(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value


@pytest.mark.parametrize(
    "case, needle",
    [
        ("unknown layer", "unknown layer"),
        ("neuron id out of range", "outside layer"),
        ("neuron ref out of range", "outside layer"),
        ("no layer", "layer"),
        ("undecodable image", "not a decodable image"),
        ("wrong size png, resizing off", "encoded_images[0] is 20x16; the model takes 16x16"),
        ("wrong size tensor, resizing off", "images[0] is 15x16; the model takes 16x16"),
        ("wrong channels", "have 2 channels"),
        ("bomb png", "at most 40000000 are decoded"),
        ("huge tensor", "at most 40000000"),
        ("too many images", "too many images"),
        ("too many encoded images", "too many images"),
        ("no images", "no images"),
        ("both kinds of images", "not both"),
        ("not a batch", "[batch, height, width, channels]"),
        ("nan", "NaN"),
        ("bad dtype", "not supported"),
        ("short tensor", "needs"),
    ],
)
def test_get_activations_errors_are_invalid_argument(random_server, case, needle):
    u8 = images(1)
    good = codec.tensor_to_proto(u8)
    req = {
        "unknown layer": pb.GetActivationsRequest(images=good, layer="stage9.pool"),
        "neuron id out of range": pb.GetActivationsRequest(images=good, layer="stage1.pool", neuron_ids=[10**6]),
        "neuron ref out of range": pb.GetActivationsRequest(
            images=good, neurons=[pb.NeuronRef(layer="stage1.pool", map=99, y=0, x=0)]
        ),
        "no layer": pb.GetActivationsRequest(images=good),
        "undecodable image": pb.GetActivationsRequest(encoded_images=[b"\x89PNG not really"]),
        "wrong size png, resizing off": pb.GetActivationsRequest(
            encoded_images=[png(np.zeros((20, 16), np.uint8))], layer="stage1.pool", no_resize=True
        ),
        "wrong size tensor, resizing off": pb.GetActivationsRequest(
            images=codec.tensor_to_proto(np.zeros((1, 15, 16, 1), np.uint8)), layer="stage1.pool", no_resize=True
        ),
        "wrong channels": pb.GetActivationsRequest(
            images=codec.tensor_to_proto(np.zeros((1, 16, 16, 2), np.uint8)), layer="stage1.pool"
        ),
        # a 1-bit PNG whose header claims 50 M pixels: a few kB on the wire, refused before decoding
        "bomb png": pb.GetActivationsRequest(encoded_images=[bomb_png(10000, 5000)], layer="stage1.pool"),
        # the shape alone is refused: no 41 M-pixel buffer is allocated
        "huge tensor": pb.GetActivationsRequest(
            images=common_pb2.Tensor(dtype=common_pb2.DTYPE_UINT8, shape=[1, 41_000_000, 1, 1], data=b"\0" * 16),
            layer="stage1.pool",
        ),
        "too many images": pb.GetActivationsRequest(images=codec.tensor_to_proto(images(9)), layer="stage1.pool"),
        "too many encoded images": pb.GetActivationsRequest(
            encoded_images=[png(u8[0, :, :, 0])] * 9, layer="stage1.pool"
        ),
        "no images": pb.GetActivationsRequest(layer="stage1.pool"),
        "both kinds of images": pb.GetActivationsRequest(
            images=good, encoded_images=[png(u8[0, :, :, 0])], layer="stage1.pool"
        ),
        "not a batch": pb.GetActivationsRequest(images=codec.tensor_to_proto(u8[0]), layer="stage1.pool"),
        "nan": pb.GetActivationsRequest(
            images=codec.tensor_to_proto(np.full((1, 16, 16, 1), np.nan, np.float32)), layer="stage1.pool"
        ),
        "bad dtype": pb.GetActivationsRequest(
            images=codec.tensor_to_proto(np.zeros((1, 16, 16, 1), np.int32)), layer="stage1.pool"
        ),
        "short tensor": pb.GetActivationsRequest(
            images=pb.GetActivationsRequest().images.__class__(dtype=good.dtype, shape=[1, 16, 16, 1], data=b"\0" * 10),
            layer="stage1.pool",
        ),
    }[case]
    with client(random_server) as nc:
        e = _err(lambda: nc.stub.GetActivations(req, timeout=30))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, e.details())
    assert needle in e.details(), (case, e.details())


def test_other_rpcs_reject_bad_requests(random_server):
    ref = pb.NeuronRef(layer="stage3.output", map=0, y=0, x=0)
    bad = [
        (lambda s: s.TopInputs(pb.TopInputsRequest(neuron=pb.NeuronRef(layer="nope"), k=3)), "unknown layer"),
        (lambda s: s.TopInputs(pb.TopInputsRequest(neuron=ref, k=100000)), "k=100000"),
        (lambda s: s.TopInputs(pb.TopInputsRequest(neuron=ref, k=3, dataset="/etc/passwd")), "unknown dataset"),
        (
            lambda s: s.TopInputs(pb.TopInputsRequest(neuron=pb.NeuronRef(layer="stage3.output", map=0, y=50), k=3)),
            "outside layer",
        ),
        (lambda s: s.OptimalStimulus(pb.OptimalStimulusRequest(neuron=pb.NeuronRef(layer="x.y"))), "unknown layer"),
        (lambda s: s.OptimalStimulus(pb.OptimalStimulusRequest(neuron=ref, steps=10**6)), "steps="),
        (lambda s: s.OptimalStimulus(pb.OptimalStimulusRequest(neuron=ref, learning_rate=-1)), "learning_rate"),
        (lambda s: s.OptimalStimulus(pb.OptimalStimulusRequest(neuron=ref, norm=-2)), "norm="),
        (lambda s: s.OptimalStimulus(pb.OptimalStimulusRequest(neuron=ref, restarts=1000)), "restarts="),
    ]
    with client(random_server) as nc:
        for call, needle in bad:
            e = _err(lambda call=call: call(nc.stub))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
            assert needle in e.details(), e.details()
        # no checkpoint directory behind a random-weights server
        e = _err(lambda: nc.describe(checkpoint_id="step-1"))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION


# -- top inputs and optimal stimulus -------------------------------------------------------


def test_top_inputs_are_the_k_best_of_the_split(random_server, local_model):
    with client(random_server) as nc:
        top = nc.top_inputs("stage3.output", (1, 0, 1), dataset="heldout", k=5, images=True, thumbnails=True)
    ds = bundled.open_split("heldout", preprocess_for(SPEC))
    x, y = ds.get(np.arange(len(ds)))
    a = local_model.activations(x, [Unit("stage3.output", 1, 0, 1)])[:, 0]
    want = np.argsort(-a, kind="stable")[:5]
    assert [t.example_id for t in top] == list(want)
    np.testing.assert_allclose([t.activation for t in top], a[want], rtol=1e-5)
    assert [t.label for t in top] == list(y[want])
    for t in top:
        assert t.image.shape == (H, W, 1)
        np.testing.assert_allclose(np.moveaxis(t.image, -1, 0), x[t.example_id], atol=1e-6)
        assert Image.open(io.BytesIO(t.thumbnail_png)).size == (W, H)


@pytest.mark.parametrize(
    "layer, neuron", [("stage1.filter", (2, 3, 4)), ("stage2.pool", (1, 2, 2)), ("stage3.output", (0, 1, 1))]
)
def test_optimal_stimulus_has_unit_norm_and_beats_random_unit_inputs(random_server, local_model, layer, neuron):
    with client(random_server) as nc:
        s = nc.optimal_stimulus(layer, neuron, steps=60, seed=1)
        rand = np.random.default_rng(7).standard_normal((8, H, W, 1)).astype(np.float32)
        rand /= np.sqrt((rand**2).sum(axis=(1, 2, 3), keepdims=True))
        r = nc.activations(rand, layer, [neuron], raw=True)
        check = nc.activations(s.image[None], layer, [neuron], raw=True)
    assert s.image.shape == (H, W, 1)
    assert abs(float(np.sqrt((s.image.astype(np.float64) ** 2).sum())) - 1.0) < 1e-5
    assert s.activation == pytest.approx(float(check.values[0, 0]), rel=1e-4, abs=1e-5)
    assert s.activation > r.values.max() and s.activation > s.random_activation_max
    assert Image.open(io.BytesIO(s.png)).size == (W, H)


def test_downpour_query_in_another_process(random_server, local_model, tmp_path):
    u8 = images(2, seed=5)
    files = []
    for i in range(2):
        files.append(tmp_path / f"im{i}.png")
        files[-1].write_bytes(png(u8[i, :, :, 0]))
    out = harness.run_cli(
        "query",
        "--addr",
        random_server.address,
        "--image",
        *map(str, files),
        "--layer",
        "stage3.pool",
        "--neurons",
        "0,3",
        "--json",
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    want = expected(local_model, u8, "stage3.pool")[:, [0, 3]]
    np.testing.assert_allclose([im["activations"] for im in got["images"]], want, rtol=1e-5, atol=1e-5)
    bad = harness.run_cli(
        "query",
        "--addr",
        random_server.address,
        "--image",
        str(files[0]),
        "--layer",
        "stage7.pool",
        timeout=120,
    )
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "unknown layer" in bad.stderr


# -- live shards and checkpoints -------------------------------------------------------------


def test_live_shards_are_refreshed_and_checkpoints_are_served(procs, tmp_path):
    ckdir = tmp_path / "checkpoints"
    shards = [
        procs.serve("paramserver", "--shard-index", str(i), "--checkpoint-dir", str(ckdir), "--lr", "0.5")
        for i in range(2)
    ]
    addrs = [s.address for s in shards]
    net = Network(SPEC)
    params = net.init_params(11)
    ps = ParamClient(addrs, worker_id="test", placement=balanced_placement(net.block_sizes(), 2))
    ps.wait_ready(30)
    ps.init({k: np.asarray(v) for k, v in params.items()})
    cfg_path = tmp_path / "job.yaml"
    cfg = jobconfig.load(None, env={}, overrides={"preset": "tiny", "shards": 2})
    cfg_path.write_text(cfg.to_yaml())
    live = procs.serve(
        "neurons",
        "--shards",
        ",".join(addrs),
        "--config",
        str(cfg_path),
        "--refresh-seconds",
        "0.2",
        "--checkpoint-dir",
        str(ckdir),
    )
    u8 = images(2, seed=9)
    with client(live) as nc:
        a0 = nc.activations(u8, "stage3.output")
        np.testing.assert_allclose(
            a0.values, expected(NeuronModel(SPEC, params), u8, "stage3.output"), rtol=1e-5, atol=1e-5
        )
        # a committed checkpoint of the current parameters, as the coordinator writes it
        parts = ps.checkpoint("ck-1")
        (ckdir / "ck-1").mkdir(parents=True, exist_ok=True)
        (ckdir / "ck-1" / "MANIFEST.json").write_text(
            json.dumps(
                {
                    "checkpoint_id": "ck-1",
                    "step": 1,
                    "created": time.time(),
                    "config": cfg.to_yaml(),
                    "placement": ps.placement,
                    "shards": [{"shard": i, "path": p.path} for i, p in enumerate(parts)],
                }
            )
        )
        # training moves the shards; the service picks it up on its refresh interval
        ps.wait(ps.push({k: np.ones(np.size(v), np.float32) for k, v in params.items()}))
        a1 = harness.wait_for(
            lambda: (a := nc.activations(u8, "stage3.output")).parameters_version != a0.parameters_version and a,
            20,
            "the service to refresh its parameters",
            every=0.1,
        )
        assert a1.parameters_version > a0.parameters_version
        assert not np.allclose(a1.values, a0.values)
        old = nc.activations(u8, "stage3.output", checkpoint_id="ck-1")
        np.testing.assert_allclose(old.values, a0.values, rtol=1e-6)
        e = _err(lambda: nc.activations(u8, "stage3.output", checkpoint_id="nope"))
        assert e.code() == grpc.StatusCode.NOT_FOUND
    ps.close()
    # a server on the checkpoint directory alone serves the newest committed checkpoint
    ck = procs.serve("neurons", "--checkpoint-dir", str(ckdir))
    with client(ck) as nc:
        d = nc.describe()
        assert d.checkpoint_id == "ck-1" and d.step == 1
        np.testing.assert_allclose(nc.activations(u8, "stage3.output").values, a0.values, rtol=1e-6)


def test_coordinator_source_reads_the_job_and_its_shards(procs, tmp_path):
    """`--coordinator` (how `downpour up` starts the service): spec and shard addresses from JobStatus."""
    shard = procs.serve("paramserver", "--shard-index", "0")
    net = Network(SPEC)
    params = net.init_params(2)
    ps = ParamClient([shard.address], worker_id="test", placement=balanced_placement(net.block_sizes(), 1))
    ps.wait_ready(30)
    ps.init({k: np.asarray(v) for k, v in params.items()})
    ps.close()
    cfg = jobconfig.load(None, env={}, overrides={"preset": "tiny", "shards": 1, "normalize": "minmax"})

    class Coordinator(coordinator_pb2_grpc.CoordinatorServicer):
        def JobStatus(self, request, context):
            return coordinator_pb2.JobStatusResponse(
                job=common_pb2.JobSpec(job_id="j", spec_yaml=cfg.to_yaml(), checkpoint_dir=str(tmp_path)),
                shard_addresses=[shard.address],
            )

    srv = grpc.server(futures.ThreadPoolExecutor(2))
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(Coordinator(), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        p = procs.serve("neurons", "--coordinator", f"127.0.0.1:{port}")
        u8 = images(2, seed=4)
        with client(p) as nc:
            d = nc.describe()
            assert d.normalize == "minmax" and d.source == f"shards {shard.address}"
            got = nc.activations(u8, "stage2.pool").values
        x = preprocess.normalize(np.moveaxis(u8.astype(np.float32) / 255.0, -1, 1), "minmax")
        np.testing.assert_allclose(
            got, NeuronModel(SPEC, params).layer_activations(x, "stage2.pool"), rtol=1e-5, atol=1e-5
        )
    finally:
        srv.stop(0)


def test_partitioned_job_blocks_are_joined(procs, tmp_path):
    """A 2x2 model-parallel job keeps one block per partition on the shards; the service joins them."""
    shard = procs.serve("paramserver", "--shard-index", "0")
    params = Network(SPEC).init_params(8)
    blocks = split_params(plan(SPEC, 2, 2), params)
    ps = ParamClient([shard.address], worker_id="test", placement={k: 0 for k in blocks})
    ps.wait_ready(30)
    ps.init(blocks)
    ps.close()
    cfg = jobconfig.load(None, env={}, overrides={"preset": "tiny", "shards": 1, "partitions": "2x2"})
    (tmp_path / "job.yaml").write_text(cfg.to_yaml())
    p = procs.serve("neurons", "--shards", shard.address, "--config", str(tmp_path / "job.yaml"))
    u8 = images(2, seed=6)
    with client(p) as nc:
        got = nc.activations(u8, "stage3.output").values
    np.testing.assert_allclose(got, expected(NeuronModel(SPEC, params), u8, "stage3.output"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", list(layer_shapes(presets.get("tiny"))) + ["head.logits"])
def test_input_gradient_of_a_unit_matches_central_differences(layer):
    """The gradient OptimalStimulus climbs, for a unit of every layer (float64 network)."""
    spec = dataclasses.replace(SPEC, classes=3)
    model = NeuronModel(spec, Network(spec).init_params(1))
    model.net = Network(spec, dtype=np.float64)
    model.params = {k: v.astype(np.float64) for k, v in model.params.items()}
    shape = layer_shapes(spec)[layer]
    u = model.unit(layer, int(np.prod(shape)) // 2 + 1 if layer != "head.logits" else 2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2,) + spec.input)
    v, g = model.input_gradient(x, u)
    np.testing.assert_allclose(v, model.activations(x, [u])[:, 0], rtol=1e-6)
    d = rng.standard_normal(x.shape)
    h = 1e-5
    fd = (model.input_gradient(x + h * d, u)[0] - model.input_gradient(x - h * d, u)[0]) / (2 * h)
    np.testing.assert_allclose((g * d).reshape(2, -1).sum(1), fd, rtol=1e-4, atol=1e-7)
