"""Bounded work per request in the neurons service, against real `downpour serve neurons` processes.

A hostile client used to get whatever it asked for: a 5,000-step x 64-restart optimal stimulus
on ``tiny`` (about 30 s of CPU), any number of heavy calls at once (each one a worker thread and
its memory until it ends), a 10-megapixel, 45 kB PNG decoded into about 340 MiB of float copies
(the neurons pod may use 2 GiB), and every format Pillow has a parser for (TIFF, BMP, PSD, ...).
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

import harness
from downpour.rpc.channel import open_channel
from downpour.v1 import neurons_pb2 as pb
from downpour.v1 import neurons_pb2_grpc

pytestmark = pytest.mark.slow

LAYER = "stage3.output"
UNIT = pb.NeuronRef(layer=LAYER, map=0, y=0, x=0)


def _code(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def _health(ch) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _peak_and_now(pid: int) -> tuple[int, int]:
    """The process's peak resident memory (VmHWM) and its resident memory now (VmRSS), in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024  # "123456 kB"
    return fields["VmHWM"], fields["VmRSS"]


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """The service as an operator starts it: no limit flags."""
    with harness.Procs(tmp_path_factory.mktemp("neurons-limits")) as procs:
        yield procs.serve("neurons", "--preset", "tiny", "--random-seed", "3", metrics=True)


def test_over_budget_optimal_stimulus_is_refused_before_any_work(default_server):
    with open_channel(default_server.address) as ch:
        stub = neurons_pb2_grpc.NeuronsStub(ch)
        # ~67 GFLOP: half a minute of CPU on tiny, more than the deadline below; refused at once now
        heavy = pb.OptimalStimulusRequest(neuron=UNIT, steps=5000, restarts=64)
        code, details = _code(lambda: stub.OptimalStimulus(heavy, timeout=20))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
        assert "steps=5000 x restarts=64" in details and "67.2 GFLOP" in details, details
        assert "the limit is 20 GFLOP (--max-stimulus-gflop)" in details, details
        # the defaults and the explorer's biggest search (1,000 steps x 8 restarts) still fit
        for steps, restarts in ((0, 0), (1000, 8)):
            req = pb.OptimalStimulusRequest(neuron=UNIT, steps=steps, restarts=restarts)
            assert stub.OptimalStimulus(req, timeout=120).png
        assert _health(ch) == 1  # SERVING
    assert default_server.metric("downpour_neurons_over_budget_total", method="OptimalStimulus") == 1


def test_over_budget_scan_is_refused_and_an_open_scan_is_cut_to_the_budget(procs):
    # tiny's stage3.output costs 70,040 FLOP per example: 0.01 GFLOP is 142 examples
    s = procs.serve("neurons", "--preset", "tiny", "--random-seed", "3", "--max-scan-gflop", "0.01")
    with open_channel(s.address) as ch:
        stub = neurons_pb2_grpc.NeuronsStub(ch)
        req = pb.TopInputsRequest(neuron=UNIT, dataset="train", k=3, max_examples=1000)
        code, details = _code(lambda: stub.TopInputs(req, timeout=60))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
        assert "a scan of 1000 examples" in details and "--max-scan-gflop" in details, details
        assert "max_examples <= 142" in details, details
        # max_examples 0 ("as many as the service allows") scans what the budget allows
        r = stub.TopInputs(pb.TopInputsRequest(neuron=UNIT, dataset="train", k=3), timeout=60)
        assert r.examples_scanned == 142 and len(r.inputs) == 3
        assert stub.TopInputs(pb.TopInputsRequest(neuron=UNIT, dataset="train", k=3, max_examples=142), timeout=60)
        assert stub.DescribeModel(pb.DescribeModelRequest(), timeout=10).layers


def test_heavy_calls_beyond_the_slots_and_the_queue_are_refused_at_once(procs):
    s = procs.serve(
        "neurons",
        *("--preset", "tiny", "--random-seed", "3"),
        *("--max-running-queries", "1", "--max-queued-queries", "1", "--max-stimulus-gflop", "0"),
        metrics=True,
    )

    def gauge(name: str) -> float:
        return s.metric(name) or 0.0

    with open_channel(s.address) as ch:
        stub = neurons_pb2_grpc.NeuronsStub(ch)
        long = pb.OptimalStimulusRequest(neuron=UNIT, steps=5000, restarts=64)  # about half a minute
        running = stub.OptimalStimulus.future(long, timeout=300)
        harness.wait_for(lambda: gauge("downpour_neurons_queries_running") == 1, 30, "the first query to run", 0.05)
        queued = stub.OptimalStimulus.future(long, timeout=300)
        harness.wait_for(lambda: gauge("downpour_neurons_queries_queued") == 1, 30, "the second query queued", 0.05)
        # N + Q + 3: every one more is refused without waiting for anything
        extra = [
            lambda: stub.OptimalStimulus(long, timeout=300),
            lambda: stub.TopInputs(pb.TopInputsRequest(neuron=UNIT, k=3), timeout=300),
            lambda: stub.GetActivations(
                pb.GetActivationsRequest(encoded_images=[_encode(Image.new("L", (16, 16)), "PNG")], layer=LAYER),
                timeout=300,
            ),
        ]
        for call in extra:
            code, details = _code(call)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
            assert "--max-running-queries 1" in details and "--max-queued-queries 1" in details, details
        assert not running.done()  # refused while the first one still runs: not after its deadline
        # cheap calls do not wait behind heavy ones
        assert _health(ch) == 1
        assert stub.DescribeModel(pb.DescribeModelRequest(), timeout=10).layers
        # a queued caller that hangs up leaves the queue, and so does one whose deadline passes
        queued.cancel()
        harness.wait_for(lambda: gauge("downpour_neurons_queries_queued") == 0, 30, "the queue to empty", 0.05)
        with pytest.raises(grpc.RpcError) as e:
            stub.OptimalStimulus(long, timeout=1)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert not running.done()  # so that one waited in the queue all along
        harness.wait_for(lambda: s.text().count("while queued") == 2, 30, "both queued calls to leave the queue", 0.05)
        assert gauge("downpour_neurons_queries_queued") == 0
        running.cancel()
        harness.wait_for(lambda: gauge("downpour_neurons_queries_running") == 0, 30, "the slot to free", 0.05)
        # and the slot serves the next caller
        assert stub.OptimalStimulus(pb.OptimalStimulusRequest(neuron=UNIT, steps=5), timeout=60).png
    rejected = sum(
        s.metric("downpour_neurons_queries_rejected_total", method=m) or 0.0
        for m in ("OptimalStimulus", "TopInputs", "GetActivations")
    )
    assert rejected == 3


def test_a_10_megapixel_png_does_not_grow_the_service_by_hundreds_of_mib(default_server):
    # 3872 x 2592 RGBA, one colour: 44 kB on the wire, 40 MB of pixels, 160 MB as float32 RGBA
    big = _encode(Image.new("RGBA", (3872, 2592), (200, 120, 40, 255)), "PNG")
    assert len(big) < 64 << 10
    small = _encode(Image.new("RGBA", (16, 16), (200, 120, 40, 255)), "PNG")
    opts = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(default_server.address, options=opts) as ch:
        stub = neurons_pb2_grpc.NeuronsStub(ch)
        answers: list = []

        def ask(image: bytes, n: int) -> None:
            req = pb.GetActivationsRequest(encoded_images=[image] * n, layer=LAYER)
            answers.append(stub.GetActivations(req, timeout=120))

        def at_once(image: bytes) -> None:
            threads = [threading.Thread(target=ask, args=(image, n)) for n in (1, 2, 4, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        at_once(small)  # the service's worker threads exist before the baseline is read
        want, answers = answers[0], []
        peak_before, _ = _peak_and_now(default_server.pid)
        ask(big, 1)
        at_once(big)  # several at once
        peak_after, _ = _peak_and_now(default_server.pid)
    assert len(answers) == 5
    for a in answers:
        got = np.frombuffer(a.activations.data, "<f4").reshape(tuple(a.activations.shape))
        ref = np.frombuffer(want.activations.data, "<f4").reshape(tuple(want.activations.shape))
        np.testing.assert_allclose(got, np.repeat(ref[:1], len(got), axis=0), rtol=1e-4, atol=1e-5)  # one colour
    growth = peak_after - peak_before
    print(f"\npeak resident memory growth for the 10-megapixel PNGs: {growth / 2**20:.1f} MiB")
    assert growth < 100 << 20, f"peak resident memory grew by {growth >> 20} MiB for 10-megapixel PNGs"


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "PPM"])
def test_formats_not_listed_are_refused_unread(default_server, fmt):
    data = _encode(Image.new("L", (16, 16), 128), fmt)
    with open_channel(default_server.address) as ch:
        stub = neurons_pb2_grpc.NeuronsStub(ch)
        code, details = _code(
            lambda: stub.GetActivations(pb.GetActivationsRequest(encoded_images=[data], layer=LAYER), timeout=60)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert "accepted formats: PNG, JPEG, GIF, WEBP" in details, details
        for ok in ("PNG", "JPEG", "GIF", "WEBP"):
            req = pb.GetActivationsRequest(encoded_images=[_encode(Image.new("L", (40, 30), 128), ok)], layer=LAYER)
            assert stub.GetActivations(req, timeout=60).activations.shape
