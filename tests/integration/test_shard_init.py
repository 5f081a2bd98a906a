"""Shards create their own initial blocks (InitBlocks): real shard processes on 127.0.0.1.

The same job on 1, 2 and 4 shards, with and without a partition grid, starts
from identical parameters, and those are ``Network.init_params``'s (what an
in-process run starts from); the coordinator sends block names only.
"""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest

import harness
from downpour import config as jobconfig
from downpour.coordinator.server import Coordinator
from downpour.coordinator.state import JobState
from downpour.neurons.model import NeuronModel
from downpour.neurons.sources import ShardSource
from downpour.nn import Network, presets
from downpour.nn.spec import to_dict
from downpour.paramserver.client import ParamClient
from downpour.partition import join_params, plan
from downpour.rpc.channel import open_channel
from downpour.v1 import paramserver_pb2 as pb
from downpour.v1 import paramserver_pb2_grpc


@pytest.fixture(scope="module")
def shard_addresses(tmp_path_factory):
    with harness.Procs(tmp_path_factory.mktemp("shards")) as procs:
        started = [procs.serve("paramserver", "--shard-index", str(i), wait=False) for i in range(4)]
        yield [s.wait_serving().address for s in started]  # the four start side by side


def job(grid: str, shards: int) -> jobconfig.JobConfig:
    spec = dataclasses.replace(presets.get("tiny"), classes=3)  # a head too: blocks of every kind
    return jobconfig.JobConfig(model=to_dict(spec), partitions=grid, shards=shards, seed=5, replicas=1)


def start_params(cfg, addresses):
    """Every block as the shards created it (the coordinator's InitBlocks), pulled back."""
    coord = Coordinator(JobState(cfg, None), addresses[: cfg.shards], "127.0.0.1:1", "")
    coord.init_parameters()
    with ParamClient(addresses[: cfg.shards], placement=coord.place) as client:
        blocks = client.pull(list(coord.place))
    return coord, {k: np.array(v).reshape(-1) for k, v in blocks.items()}


@pytest.mark.parametrize("grid", ["1x1", "2x2"])
def test_the_same_job_on_1_2_and_4_shards_starts_from_identical_parameters(shard_addresses, grid):
    cfg1 = job(grid, 1)
    reference = Network(cfg1.network_spec()).init_params(cfg1.seed)  # what an in-process run starts from
    seen = {}
    for n in (1, 2, 4):
        coord, blocks = start_params(job(grid, n), shard_addresses)
        assert len(set(coord.place.values())) == min(n, len(coord.place))  # every shard holds blocks
        full = blocks if grid == "1x1" else join_params(plan(cfg1.network_spec(), 2, 2), blocks)
        assert set(full) == set(reference)
        for k in reference:
            np.testing.assert_array_equal(full[k], reference[k], err_msg=f"{k} on {n} shards")
        seen[n] = blocks
    for k in seen[1]:
        assert np.array_equal(seen[1][k], seen[2][k]) and np.array_equal(seen[1][k], seen[4][k]), k
    # and the values are not trivially equal: another seed draws other ones
    other = Network(cfg1.network_spec()).init_params(cfg1.seed + 1)
    assert not np.array_equal(other["stage1.W1"], reference["stage1.W1"])


def test_init_blocks_refuses_an_unknown_block_and_a_bad_job(shard_addresses):
    stub = paramserver_pb2_grpc.ParameterServerStub(open_channel(shard_addresses[0]))
    yaml_text = job("1x1", 1).to_yaml()
    with pytest.raises(grpc.RpcError) as e:
        stub.InitBlocks(pb.InitBlocksRequest(job_yaml=yaml_text, names=["stage9.W1"], overwrite=True), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "stage9.W1" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.InitBlocks(
            pb.InitBlocksRequest(job_yaml="preset: nosuch\n", names=["stage1.W1"], overwrite=True), timeout=30
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nosuch" in e.value.details()
    stub.InitBlocks(pb.InitBlocksRequest(job_yaml=yaml_text, names=["stage1.W1"], overwrite=True), timeout=30)
    with pytest.raises(grpc.RpcError) as e:  # without overwrite an existing block is never replaced
        stub.InitBlocks(pb.InitBlocksRequest(job_yaml=yaml_text, names=["stage1.W1"]), timeout=30)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    bad = yaml_text + "init_from: /nonexistent/dir\n"
    with pytest.raises(grpc.RpcError) as e:
        stub.InitBlocks(pb.InitBlocksRequest(job_yaml=bad, names=["stage1.W1"], overwrite=True), timeout=30)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no committed checkpoint" in e.value.details()


def test_a_shard_that_restarts_empty_before_any_checkpoint_makes_its_initial_blocks_again(
    tmp_path, shard_addresses, procs
):
    cfg = job("2x2", 2)
    coord, before = start_params(cfg, shard_addresses)
    # shard 1 "restarted": a new, empty process in its place
    fresh = procs.serve("paramserver", "--shard-index", "1").address
    addresses = [shard_addresses[0], fresh]
    state = JobState(cfg, None)
    state.initialized = True
    coord = Coordinator(state, addresses, "127.0.0.1:1", str(tmp_path / "no-checkpoints"))
    with ParamClient(addresses, placement=coord.place) as client:
        assert coord.check_shards(client) == [1]
        after = {k: np.array(v).reshape(-1) for k, v in client.pull(list(coord.place)).items()}
    assert set(after) == set(before)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def test_the_neurons_service_pulls_and_keeps_the_encoders_only(shard_addresses):
    cfg = job("2x2", 2)
    coord, blocks = start_params(cfg, shard_addresses)
    net = Network(cfg.network_spec())
    src = ShardSource(shard_addresses[:2], cfg)
    try:
        assert src.names and not any(".W2" in n for n in src.names)
        assert src.refresh()
        model = src.model
        assert (
            set(model.params) == set(net.encoder_names()) == {"stage1.W1", "stage2.W1", "stage3.W1", "head.W", "head.b"}
        )
        full = net.init_params(cfg.seed)
        for k in model.params:
            np.testing.assert_array_equal(model.params[k], full[k], err_msg=k)
        # and its answers are the whole network's: forward never reads a decoder
        x = np.random.default_rng(0).random((2, *cfg.network_spec().input), dtype=np.float32)
        want = net.forward(full, x)["head.logits"]
        got = NeuronModel(cfg.network_spec(), full).layer_activations(x, "head.logits")
        np.testing.assert_allclose(model.layer_activations(x, "head.logits"), want.reshape(2, -1), rtol=1e-6)
        np.testing.assert_allclose(got, want.reshape(2, -1), rtol=1e-6)
    finally:
        src.close()
