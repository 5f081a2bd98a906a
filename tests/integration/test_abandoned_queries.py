"""A query whose caller is gone stops: abandoned optimal-stimulus searches do not hold the service.

Four ``OptimalStimulus`` calls of 5,000 steps x 64 restarts with a 0.3 s deadline used to run to
their end (about half a minute each on ``tiny``) and hold all four ``--max-concurrent-rpcs``
slots: every other caller got RESOURCE_EXHAUSTED meanwhile.
"""

from __future__ import annotations

import time

import grpc
import pytest

import harness
from downpour.rpc.channel import open_channel
from downpour.v1 import neurons_pb2, neurons_pb2_grpc

pytestmark = pytest.mark.slow


def test_abandoned_optimal_stimulus_searches_stop_and_free_their_slots(procs):
    # no cost budget (--max-stimulus-gflop 0), no queue (each call its own slot): the searches must
    # start and run, as an operator who raised the limits would let them, for their stop to be seen
    s = procs.serve(
        "neurons",
        *("--preset", "tiny", "--random-seed", "3", "--max-concurrent-rpcs", "4"),
        *("--max-stimulus-gflop", "0", "--max-running-queries", "4"),
        metrics=True,
    )
    with open_channel(s.address) as ch:
        stub = neurons_pb2_grpc.NeuronsStub(ch)
        layer = stub.DescribeModel(neurons_pb2.DescribeModelRequest(), timeout=30).layers[-1].name
        heavy = neurons_pb2.OptimalStimulusRequest(neuron=neurons_pb2.NeuronRef(layer=layer), steps=5000, restarts=64)
        # one connection each: a connection may hold only --max-streams-per-connection of the slots
        conns = [grpc.insecure_channel(s.address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(4)]
        calls = [neurons_pb2_grpc.NeuronsStub(c).OptimalStimulus.future(heavy, timeout=0.3) for c in conns]
        for c in calls:
            with pytest.raises(grpc.RpcError) as exc:
                c.result()
            assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gone = time.monotonic()
        # Within a few seconds every slot is free again: a fresh query is answered, not refused.
        answered = None
        while time.monotonic() - gone < 5.0:
            try:
                answered = stub.DescribeModel(neurons_pb2.DescribeModelRequest(), timeout=2)
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                time.sleep(0.1)
        assert answered is not None, "abandoned searches still hold every slot 5 s after their callers left"
        for c in conns:
            c.close()
    harness.wait_for(
        lambda: (s.metric("downpour_neurons_cancelled_total", method="OptimalStimulus") or 0) >= 4,
        10,
        "the four searches counted as stopped",
        0.2,
    )
    assert "the caller is gone" in s.text()
