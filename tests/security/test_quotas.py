"""Byte and block quotas of a shard, checked before anything is allocated, on real processes.

A client used to be able to make a shard hold any number of blocks
(CreateBlocks buffered whatever a stream declared) or allocate whatever a job
spec asked for (InitBlocks). Over --max-store-bytes or --max-blocks a request
is now refused with RESOURCE_EXHAUSTED naming the quota; the shard's memory
does not grow and the blocks it holds are untouched.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from downpour import config as jobconfig
from downpour.paramserver.client import ParamClient
from downpour.rpc.channel import open_channel
from downpour.v1 import common_pb2
from downpour.v1 import paramserver_pb2 as pb

MIB = 1 << 20
# One untied stage of 128x128 filters over a 2048x2048 image: about 1.9 TB of weights.
HUGE = {
    "input": [1, 2048, 2048],
    "stages": [
        {
            "filter": {"maps": 8, "field": 128, "stride": 1, "tied": False},
            "pool": {"size": 2, "stride": 1, "kind": "l2", "eps": 0.01},
            "lcn": {"size": 3, "sigma": 0.0, "eps": 1e-4},
            "lam": 0.1,
        }
    ],
    "classes": 0,
}


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _create(ch, messages):
    call = ch.stream_unary(
        "/downpour.v1.ParameterServer/CreateBlocks",
        request_serializer=pb.CreateBlocksRequest.SerializeToString,
        response_deserializer=pb.CreateBlocksResponse.FromString,
    )
    return call(iter(messages), timeout=30)


def _blocks(count: int, values: int, prefix: str):
    data = np.ones(values, np.float32).tobytes()
    for i in range(count):
        chunk = common_pb2.TensorChunk(
            name=f"{prefix}{i}", dtype=common_pb2.DTYPE_FLOAT32, shape=[values], offset=0, last=True, data=data
        )
        yield pb.CreateBlocksRequest(chunk=chunk)
    yield pb.CreateBlocksRequest(commit=True)


def _held(address: str) -> dict[str, np.ndarray]:
    with ParamClient([address], worker_id="reader") as ps:
        names = [b.name for b in ps.list_blocks()[0].blocks]
        ps.placement.update(dict.fromkeys(names, 0))
        return ps.pull(names) if names else {}


def test_create_streams_over_the_quota_are_refused_and_change_nothing(procs):
    s = procs.serve("paramserver", "--max-store-bytes", str(MIB), "--max-blocks", "64")
    kept = {"keep": np.arange(1000, dtype=np.float32)}
    with ParamClient([s.address], worker_id="init") as ps:
        ps.init(kept)
    ch = open_channel(s.address)
    try:
        rss = _rss(s.pid)
        # Many small blocks: the count quota.
        with pytest.raises(grpc.RpcError) as e:
            _create(ch, _blocks(10_000, 4, "tiny"))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-blocks=64" in e.value.details()
        # Fewer, larger blocks: the byte quota (8 bytes a value: weights and accumulators).
        with pytest.raises(grpc.RpcError) as e:
            _create(ch, _blocks(40, 4096, "mid"))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"--max-store-bytes={MIB}" in e.value.details()
        # One block declaring more than the quota: refused at its first chunk.
        huge = common_pb2.TensorChunk(name="huge", dtype=common_pb2.DTYPE_FLOAT32, shape=[1 << 28], data=b"\0" * 64)
        with pytest.raises(grpc.RpcError) as e:
            _create(ch, [pb.CreateBlocksRequest(chunk=huge), pb.CreateBlocksRequest(commit=True)])
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _rss(s.pid) - rss < 16 * MIB
        # What fits is still created, and counts against the quota from then on.
        r = _create(ch, _blocks(20, 4096, "fits"))
        assert len(r.blocks) == 20
        with pytest.raises(grpc.RpcError) as e:
            _create(ch, _blocks(20, 4096, "more"))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        ch.close()
    held = _held(s.address)
    assert sorted(held) == sorted(["keep", *(f"fits{i}" for i in range(20))])
    np.testing.assert_array_equal(held["keep"], kept["keep"])


def test_init_blocks_of_a_terabyte_spec_is_refused_at_once(procs):
    s = procs.serve("paramserver")  # the default quota: from this machine's memory
    kept = {"stage1.W1": np.linspace(0, 1, 500, dtype=np.float32)}
    with ParamClient([s.address], worker_id="init") as ps:
        ps.init(kept)
    cfg = jobconfig.JobConfig(model=HUGE, partitions="1x1", shards=1, seed=5, replicas=1)
    ch = open_channel(s.address)
    init = ch.unary_unary(
        "/downpour.v1.ParameterServer/InitBlocks",
        request_serializer=pb.InitBlocksRequest.SerializeToString,
        response_deserializer=pb.InitBlocksResponse.FromString,
    )
    try:
        # The same spec with a name it has no block of: the shard loads the code that reads specs
        # (its own memory, not the request's) and refuses; the RSS is measured after that.
        with pytest.raises(grpc.RpcError) as e:
            init(pb.InitBlocksRequest(job_yaml=cfg.to_yaml(), names=["nope"], overwrite=True), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        rss = _rss(s.pid)
        with pytest.raises(grpc.RpcError) as e:
            init(pb.InitBlocksRequest(job_yaml=cfg.to_yaml(), names=["stage1.W1"], overwrite=True), timeout=60)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
        assert "--max-store-bytes=" in e.value.details()
        # Reading a spec of a 2048x2048 input costs the shard some tens of MiB of its own, for a
        # moment; the 3.9 TB the request asks for (weights and accumulators) is never touched.
        assert _rss(s.pid) - rss < 256 * MIB
    finally:
        ch.close()
    assert s.alive()
    held = _held(s.address)
    assert list(held) == ["stage1.W1"]
    np.testing.assert_array_equal(held["stage1.W1"], kept["stage1.W1"])
