"""The data feeder against real `downpour serve feeder` processes on 127.0.0.1.

Each feeder is a real process on a free port (tests/harness.py), used once gRPC health
answers SERVING and stopped by the fixture's finaliser.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

import harness
from downpour.feeder.client import batch_stream, dataset_info
from downpour.rpc import codec
from downpour.rpc.channel import open_channel
from downpour.v1 import common_pb2, feeder_pb2_grpc
from downpour.v1 import feeder_pb2 as pb


@pytest.fixture
def feeders(procs):
    """Start a `downpour serve feeder FLAGS` (SERVING when returned, unless wait=False)."""

    def start(*flags: str, **kw) -> harness.Service:
        return procs.serve("feeder", *flags, **kw)

    return start


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("job") / "job.yaml"
    path.write_text("preset: tiny\nbatch_size: 8\nreplicas: 2\n")
    return path


@pytest.fixture(scope="module")
def default_feeder(tmp_path_factory, tiny_job):
    """The bundled default dataset at the tiny preset's 1x16x16, prefetch 3."""
    with harness.Procs(tmp_path_factory.mktemp("default")) as procs:
        yield procs.serve("feeder", "--config", str(tiny_job), "--prefetch", "3", metrics=True)


def stream(address: str, **fields) -> list[pb.StreamBatchesResponse]:
    """Every response of one StreamBatches call (max_batches must be set)."""
    with open_channel(address) as ch:
        return list(feeder_pb2_grpc.DataFeederStub(ch).StreamBatches(pb.StreamBatchesRequest(**fields), timeout=30))


# -- the bundled default --------------------------------------------------------------


def test_default_shapes_dtypes_and_info(default_feeder):
    info = dataset_info(default_feeder.address)
    assert (info.name, info.num_examples, info.channels, info.height, info.width, info.num_classes) == (
        "default:train",
        2100,
        1,
        16,
        16,
        0,
    )
    test = dataset_info(default_feeder.address, split=pb.SPLIT_TEST)
    assert (test.name, test.num_examples, test.num_classes) == ("default:heldout", 300, 2)
    assert list(test.class_names) == ["not a face", "face"]

    resp = stream(default_feeder.address, replica=0, num_replicas=2, batch_size=8, max_batches=2)
    assert [r.batch_index for r in resp] == [0, 1]
    ex = resp[0].examples
    assert ex.dtype == common_pb2.DTYPE_FLOAT32 and list(ex.shape) == [8, 1, 16, 16]
    assert len(resp[0].labels.data) == 0 and len(resp[0].example_ids) == 8

    got = list(batch_stream(default_feeder.address, 0, 2, 8, max_batches=3))
    assert len(got) == 3
    for x, y in got:
        assert x.shape == (8, 1, 16, 16) and x.dtype == np.float32 and y is None
        # normalize: standardize (the job default): every example has mean 0, std 1
        np.testing.assert_allclose(x.reshape(8, -1).mean(1), 0, atol=1e-5)
        np.testing.assert_allclose(x.reshape(8, -1).std(1), 1, atol=1e-3)

    x, y = next(
        batch_stream(
            default_feeder.address, 0, 1, 16, with_labels=True, split=pb.SPLIT_TEST, deterministic=True, max_batches=1
        )
    )
    assert y.dtype == np.int64 and y.shape == (16,) and set(np.unique(y)) <= {0, 1}


def test_two_replicas_get_disjoint_shards(default_feeder):
    # 2100 examples / 2 replicas = 1050 each = 21 batches of 50: exactly one epoch
    ids = [
        np.concatenate(
            [
                r.example_ids
                for r in stream(
                    default_feeder.address, replica=k, num_replicas=2, batch_size=50, max_batches=21, seed=7
                )
            ]
        )
        for k in range(2)
    ]
    a, b = (set(i.tolist()) for i in ids)
    assert len(a) == len(ids[0]) == 1050 and len(b) == len(ids[1]) == 1050  # no repeat within an epoch
    assert not a & b
    assert a | b == set(range(2100))
    # the next epoch is the same shard in another order
    nxt = stream(
        default_feeder.address, replica=0, num_replicas=2, batch_size=50, start_batch=21, max_batches=21, seed=7
    )
    assert nxt[0].epoch == 1
    ep1 = np.concatenate([r.example_ids for r in nxt])
    assert set(ep1.tolist()) == a and not np.array_equal(ep1, ids[0])


def test_start_batch_resumes_the_same_sequence(default_feeder):
    # replica 1 of 3: 700 examples; batches of 64 cross the epoch boundary at batch 10
    kw = dict(replica=1, num_replicas=3, batch_size=64, seed=3)
    full = stream(default_feeder.address, max_batches=14, **kw)
    part = stream(default_feeder.address, start_batch=8, max_batches=6, **kw)
    assert [r.batch_index for r in part] == list(range(8, 14))
    for a, b in zip(full[8:], part):
        assert list(a.example_ids) == list(b.example_ids)
        assert a.examples.data == b.examples.data
        assert a.epoch == b.epoch
    assert [r.epoch for r in full[9:12]] == [0, 0, 1]  # batch 10 starts in epoch 0 and ends in 1


def test_bad_requests_name_the_field(default_feeder):
    cases = [
        (dict(replica=0, num_replicas=0, batch_size=8), grpc.StatusCode.INVALID_ARGUMENT, "num_replicas"),
        (dict(replica=2, num_replicas=2, batch_size=8), grpc.StatusCode.INVALID_ARGUMENT, "replica"),
        (dict(replica=-1, num_replicas=2, batch_size=8), grpc.StatusCode.INVALID_ARGUMENT, "replica"),
        (dict(replica=0, num_replicas=1, batch_size=0), grpc.StatusCode.INVALID_ARGUMENT, "batch_size"),
        (dict(replica=0, num_replicas=1, batch_size=4097), grpc.StatusCode.INVALID_ARGUMENT, "batch_size"),
        (
            dict(replica=0, num_replicas=1, batch_size=8, start_batch=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "start_batch",
        ),
        (
            dict(replica=0, num_replicas=1, batch_size=8, with_labels=True),
            grpc.StatusCode.FAILED_PRECONDITION,
            "with_labels",
        ),
    ]
    for fields, code, name in cases:
        with pytest.raises(grpc.RpcError) as e:
            stream(default_feeder.address, max_batches=1, **fields)
        assert e.value.code() == code, fields
        assert name in e.value.details(), (fields, e.value.details())
    # the client does not retry a rejected request
    with pytest.raises(grpc.RpcError) as e:
        next(batch_stream(default_feeder.address, 0, 1, 8, with_labels=True))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_prefetch_is_bounded_and_cancel_stops_the_stream(default_feeder):
    it = batch_stream(default_feeder.address, 0, 1, 64)  # endless
    next(it)
    # the client reads no more: the producer fills its queue of --prefetch 3 and blocks
    harness.wait_for(lambda: default_feeder.metric("downpour_feeder_queue_depth") == 3, 10, "a full queue")
    assert default_feeder.metric("downpour_feeder_streams") == 1
    time.sleep(0.3)  # the behaviour under test: a while without reads, and the queue grows no further
    assert default_feeder.metric("downpour_feeder_queue_depth") == 3
    it.close()  # cancels the call
    harness.wait_for(lambda: default_feeder.metric("downpour_feeder_streams") == 0, 10, "the stream to end")
    assert default_feeder.metric("downpour_feeder_queue_depth") == 0


# -- other datasets -------------------------------------------------------------------


def test_labels_from_npz(feeders, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(40, 8, 8), dtype=np.uint8)
    y = np.arange(40) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y)
    f = feeders("--data", str(tmp_path / "d.npz"), "--shape", "1,8,8", "--normalize", "none")
    info, test = dataset_info(f.address), dataset_info(f.address, split=pb.SPLIT_TEST)
    assert (info.num_examples, test.num_examples, info.num_classes, info.height) == (36, 4, 4, 8)

    resp = stream(f.address, replica=0, num_replicas=1, batch_size=12, max_batches=3, with_labels=True)
    train_ids = np.concatenate([r.example_ids for r in resp])
    assert len(set(train_ids.tolist())) == 36
    for r in resp:
        ids = np.array(r.example_ids)
        labels = codec.tensor_from_proto(r.labels)
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(labels, y[ids])
        np.testing.assert_allclose(codec.tensor_from_proto(r.examples)[:, 0], x[ids] / 255.0, rtol=1e-6)

    held = stream(
        f.address,
        replica=0,
        num_replicas=1,
        batch_size=4,
        max_batches=1,
        split=pb.SPLIT_TEST,
        with_labels=True,
        deterministic=True,
    )
    test_ids = list(held[0].example_ids)
    assert test_ids == sorted(test_ids) and not set(test_ids) & set(train_ids.tolist())

    xb, yb = next(batch_stream(f.address, 0, 1, 5, with_labels=True))
    assert xb.shape == (5, 1, 8, 8) and yb.dtype == np.int64 and yb.shape == (5,)


def test_corrupt_image_is_skipped_and_counted(feeders, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "img3b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    f = feeders("--data", str(folder), "--shape", "1,8,8", metrics=True)
    assert dataset_info(f.address).num_examples == 7  # fewer than 10: no held-out split
    assert dataset_info(f.address, split=pb.SPLIT_TEST).num_examples == 0
    got = list(batch_stream(f.address, 0, 1, 7, max_batches=3))
    assert len(got) == 3 and all(x.shape == (7, 1, 8, 8) and np.isfinite(x).all() for x, _ in got)
    assert f.metric("downpour_feeder_skipped_files_total") == 1  # once, however often it was met
    with pytest.raises(grpc.RpcError) as e:
        stream(f.address, replica=0, num_replicas=1, batch_size=1, max_batches=1, split=pb.SPLIT_TEST)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "split" in e.value.details()


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_missing_or_empty_dataset_fails_at_startup(feeders, tmp_path, kind):
    path = tmp_path / ("nowhere.npz" if kind == "missing" else "empty")
    if kind == "empty":
        path.mkdir()
    f = feeders("--data", str(path), "--shape", "1,8,8", wait=False)
    assert f.wait(60) == 2
    # The exit code says it refused; only its message can say it named the path (and did not crash).
    out = f.text()
    assert str(path) in out and "Traceback" not in out


# -- a feeder that dies -------------------------------------------------------------------


def test_batch_stream_survives_a_killed_feeder(feeders, tiny_job):
    port = harness.free_port()
    first = feeders("--config", str(tiny_job), port=port)
    kw = dict(replica=1, num_replicas=2, batch_size=16, seed=5)
    want = [r.examples.data for r in stream(first.address, max_batches=12, **kw)]

    it = batch_stream(first.address, 1, 2, 16, seed=5, reconnect_timeout=60)
    got = [next(it)[0].tobytes() for _ in range(5)]
    first.kill()

    restarted: list[harness.Service] = []
    # The feeder stays down for a second (the behaviour under test): the stream must wait it out.
    starter = threading.Timer(1.0, lambda: restarted.append(feeders("--config", str(tiny_job), port=port, wait=False)))
    starter.start()
    t0 = time.monotonic()
    got.append(next(it)[0].tobytes())  # waits for the new feeder
    waited = time.monotonic() - t0
    got += [next(it)[0].tobytes() for _ in range(6)]
    it.close()
    starter.join()
    assert waited >= 1.0
    assert got == want  # batches 0..11: none skipped, none repeated
