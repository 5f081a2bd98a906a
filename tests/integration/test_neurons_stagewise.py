"""The neurons service holds one stage's blocks at a time, and answers as the whole network does.

Real parameter shards (gRPC servers on 127.0.0.1, in this process) hold a
3-stage network with a head, and a committed checkpoint of it is written by
those shards. Every source the service offers (live shards, the checkpoint,
a seeded initialisation, an .npz file) must give, for every layer, the very
bits ``Network.forward`` computes from the same parameters, while its meter
(``downpour_neurons_param_bytes_peak``) never counts more than the largest
stage's blocks.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest

from downpour import config as jobconfig
from downpour.client import NeuronsClient
from downpour.neurons import sources
from downpour.neurons.model import NeuronModel, layer_shapes
from downpour.nn import Network, presets
from downpour.nn.spec import to_dict
from downpour.paramserver.client import ParamClient, balanced_placement
from downpour.paramserver.server import SERVICE, ParameterServer
from downpour.paramserver.store import OptimizerConfig, ShardStore
from downpour.partition import plan, split_params
from downpour.rpc.server import Server, ServerConfig
from downpour.trained import TrainedNetwork

SPEC = dataclasses.replace(presets.get("tiny"), classes=3)  # three stages and a head
SEED = 7
LAYERS = list(layer_shapes(SPEC))


def job(grid: str = "1x1", shards: int = 2) -> jobconfig.JobConfig:
    return jobconfig.JobConfig(model=to_dict(SPEC), partitions=grid, shards=shards, seed=SEED, replicas=1)


def inputs(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SPEC.input)).astype(np.float32)


def largest_stage(model: NeuronModel) -> int:
    return max(model.stage_bytes())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two shards holding the network's blocks, and a committed checkpoint of them."""
    ckdir = tmp_path_factory.mktemp("checkpoints")
    servers, addresses = [], []
    for i in range(2):
        ps = ParameterServer(
            ShardStore(i, OptimizerConfig("adagrad", 0.5, 1e-8, 0.0)), str(ckdir), 1 << 20, 64 << 20, 0
        )
        srv = Server(f"paramserver-{i}", ServerConfig(host="127.0.0.1", port=0))
        srv.add(lambda s, ps=ps: s.add_generic_rpc_handlers((ps.handlers(),)), SERVICE)
        addresses.append(f"127.0.0.1:{srv.start(install_signal_handlers=False)}")
        srv.set_serving()
        servers.append(srv)
    params = Network(SPEC).init_params(SEED)
    client = ParamClient(addresses, worker_id="test", placement=balanced_placement(Network(SPEC).block_sizes(), 2))
    client.wait_ready(30)
    client.init({k: np.asarray(v) for k, v in params.items()})
    parts = client.checkpoint("ck-1")
    (ckdir / "ck-1" / "MANIFEST.json").write_text(
        json.dumps(
            {
                "checkpoint_id": "ck-1",
                "step": 1,
                "created": time.time(),
                "config": job().to_yaml(),
                "placement": client.placement,
                "shards": [{"shard": i, "path": p.path} for i, p in enumerate(parts)],
            }
        )
    )
    yield {"addresses": addresses, "params": params, "ckdir": str(ckdir), "client": client}
    client.close()
    for srv in servers:
        srv.stop(0)


def make_source(kind: str, cluster, tmp_path) -> sources.Source:
    if kind == "shards":
        src: sources.Source = sources.ShardSource(cluster["addresses"], job(), timeout=30)
        sources.wait_for_first(src, 30)
        return src
    if kind == "checkpoint":
        return sources.CheckpointSource(cluster["ckdir"])
    if kind == "random":
        return sources.random_source(SPEC, SEED)
    path = tmp_path / "p.npz"
    np.savez(path, **{k: np.asarray(v) for k, v in cluster["params"].items()})
    return sources.npz_source(str(path), SPEC)


@pytest.mark.parametrize("kind", ["shards", "checkpoint", "random", "npz"])
def test_every_layer_is_bit_identical_to_the_whole_network_and_one_stage_is_held(cluster, tmp_path, kind):
    src = make_source(kind, cluster, tmp_path)
    try:
        model = src.model
        x = inputs()
        want = Network(SPEC).forward(cluster["params"], x)
        for layer in LAYERS:
            got = model.layer_activations(x, layer)
            np.testing.assert_array_equal(got, np.asarray(want[layer]).reshape(len(x), -1), err_msg=layer)
        assert model.meter.resident == 0  # nothing is kept between queries
        assert 0 < model.meter.peak <= largest_stage(model) < sum(model.stage_bytes())
    finally:
        src.close()


def test_a_query_reads_the_stages_up_to_its_layer_one_at_a_time(cluster, tmp_path):
    src = make_source("shards", cluster, tmp_path)
    model, fetch = src.model, src.model.store.fetch
    asked: list[list[str]] = []

    def recording(names, meter=None):
        asked.append(list(names))
        assert model.meter.resident == 0, "a stage was still held when the next one was asked for"
        return fetch(names, meter)

    model.store.fetch = recording  # type: ignore[method-assign]  # the real store, its calls recorded
    try:
        model.layer_activations(inputs(3), "stage2.pool")
        assert asked == [["stage1.W1"], ["stage2.W1"]]  # never stage 3, the head or a decoder
        asked.clear()
        model.layer_activations(inputs(3), "head.logits")
        assert asked == [["stage1.W1"], ["stage2.W1"], ["stage3.W1"], ["head.W", "head.b"]]
    finally:
        src.close()


@pytest.mark.parametrize("kind", ["shards", "checkpoint"])
def test_optimal_stimulus_and_top_inputs_hold_one_stage_and_match_the_held_model(cluster, tmp_path, kind):
    src = make_source(kind, cluster, tmp_path)
    whole = TrainedNetwork(sources.StaticSource(SPEC, cluster["params"], "in memory"))
    try:
        net = TrainedNetwork(src)
        for layer, neuron in (("stage3.output", (1, 0, 0)), ("head.logits", (2, 0, 0)), ("stage1.pool", (0, 2, 2))):
            s, w = (t.optimal_stimulus(layer, neuron, steps=4, restarts=2) for t in (net, whole))
            np.testing.assert_array_equal(s.image, w.image)
            assert s.activation == w.activation
        top, want = (t.top_inputs("stage2.pool", (1, 1, 1), k=5, max_examples=600) for t in (net, whole))
        assert [(t.example_id, t.activation) for t in top] == [(t.example_id, t.activation) for t in want]
        model = src.model
        assert 0 < model.meter.peak <= largest_stage(model)
    finally:
        src.close()


def test_a_checkpoint_named_in_a_query_is_read_stage_by_stage_too(cluster, tmp_path):
    src = make_source("shards", cluster, tmp_path)
    src.checkpoint_dir = cluster["ckdir"]
    try:
        old = TrainedNetwork(src).model("ck-1")
        x = inputs()
        np.testing.assert_array_equal(
            old.layer_activations(x, "head.logits"),
            np.asarray(Network(SPEC).forward(cluster["params"], x)["head.logits"]),
        )
        assert old.meter is src.meter and src.meter.peak <= largest_stage(old)
    finally:
        src.close()


def test_a_partitioned_job_is_joined_one_parameter_at_a_time(cluster):
    pl = plan(SPEC, 2, 2)
    blocks = split_params(pl, Network(SPEC).init_params(SEED + 1))
    with ParamClient(cluster["addresses"][:1], worker_id="test-2x2", placement={k: 0 for k in blocks}) as c:
        c.init(blocks, overwrite=True)
    src = sources.ShardSource(cluster["addresses"][:1], job("2x2", 1), timeout=30)
    try:
        sources.wait_for_first(src, 30)
        x = inputs()
        want = Network(SPEC).forward(Network(SPEC).init_params(SEED + 1), x)
        for layer in ("stage1.filter", "stage3.output", "head.logits"):
            np.testing.assert_array_equal(
                src.model.layer_activations(x, layer), np.asarray(want[layer]).reshape(len(x), -1), err_msg=layer
            )
        # while a parameter's pieces are joined, they and the whole parameter exist together
        assert src.meter.peak <= 2 * largest_stage(src.model)
    finally:
        src.close()


def test_hold_encoder_keeps_the_whole_encoder_and_answers_the_same(cluster, tmp_path):
    src = sources.ShardSource(cluster["addresses"], job(), timeout=30, hold=True)
    try:
        sources.wait_for_first(src, 30)
        x = inputs()
        want = Network(SPEC).forward(cluster["params"], x)["head.logits"]
        np.testing.assert_array_equal(src.model.layer_activations(x, "head.logits"), np.asarray(want))
        assert src.meter.resident == sum(src.model.stage_bytes())  # the opt-in cache: all of it, kept
    finally:
        src.close()


def test_the_service_exports_its_peak_parameter_bytes(cluster, tmp_path, procs):
    """`downpour serve neurons --shards`: a query at the top layer, then /metrics."""
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(job().to_yaml())
    svc = procs.serve("neurons", "--shards", ",".join(cluster["addresses"]), "--config", str(cfg_path), metrics=True)
    u8 = np.random.default_rng(1).integers(0, 256, (4, *SPEC.input[1:], 1), dtype=np.uint8)
    with NeuronsClient(svc.address, timeout=60) as nc:
        nc.activations(u8, "head.logits")
    peak = svc.metric("downpour_neurons_param_bytes_peak")
    assert peak is not None
    model = NeuronModel(SPEC, cluster["params"])
    assert 0 < peak <= largest_stage(model) < sum(model.stage_bytes())
