"""The memory plan: its parts add up to what each process holds, and the fit check refuses with numbers."""

from __future__ import annotations

import pytest

from downpour import config as jobconfig
from downpour import memplan
from downpour.nn import Network, presets


def cfg(**kw):
    base = {"preset": "small", "replicas": 1, "shards": 1, "partitions": "1x1", "batch_size": 32}
    base.update(kw)
    return jobconfig.load(None, overrides=base)


def test_the_shards_hold_every_parameter_once_with_its_accumulator():
    N = sum(Network(presets.get("medium")).block_sizes().values())
    for shards in (1, 2, 4):
        for grid in ("1x1", "2x2"):
            p = memplan.plan(cfg(preset="medium", shards=shards, partitions=grid))
            ps = [q for q in p.processes if q.role == "paramserver"]
            assert len(ps) == shards and sum(q.parameters for q in ps) == N == p.parameters
            assert sum(q.parts["weights"] + q.parts["optimizer"] for q in ps) == 8 * N


def test_a_partition_worker_holds_only_its_blocks_and_the_neurons_one_stage_of_the_encoders():
    net = Network(presets.get("medium"))
    N = sum(net.block_sizes().values())
    p = memplan.plan(cfg(preset="medium", shards=2, partitions="2x2"))
    workers = [q for q in p.processes if q.role == "worker"]
    assert len(workers) == 4 and sum(w.parameters for w in workers) == N  # no tied blocks: a partition each
    assert all(w.parameters < N / 3 for w in workers)
    for w in workers:  # gradients 4 bytes and two shared regions of 4 bytes per parameter held
        assert w.parts["gradients"] == 4 * w.parameters and w.parts["transport"] == 8 * w.parameters
        # the default tied decoder computes with W1's transposed copy: every block it holds is an encoder
        assert w.parts["copies"] == memplan.CONSTRAINT_BYTES * w.parameters
    (neurons,) = [q for q in p.processes if q.role == "neurons"]
    # one stage's encoder at a time (the largest one), never all of them, never a decoder
    sizes = net.block_sizes()
    assert neurons.parameters == max(sizes[f"{st.name}.W1"] for st in net.stages) < N // 2
    assert neurons.parts["weights"] == 4 * neurons.parameters == neurons.parts["copies"]  # 2x2: pieces joined


def test_memory_per_process_falls_with_partitions_and_shards_and_grows_with_the_model():
    def largest(role, **kw):
        return max(q.total for q in memplan.plan(cfg(**kw)).processes if q.role == role)

    assert largest("worker", preset="medium", partitions="2x2") < largest("worker", preset="medium")
    assert largest("paramserver", preset="medium", shards=4) < largest("paramserver", preset="medium", shards=2)
    assert largest("worker", preset="tiny") < largest("worker", preset="small") < largest("worker", preset="medium")
    # more replicas: more workers, each mapping the shards' blocks: the shards grow too
    assert largest("paramserver", replicas=2) > largest("paramserver", replicas=1)


def test_parse_bytes():
    assert memplan.parse_bytes("24G") == 24 << 30
    assert memplan.parse_bytes("512MiB") == 512 << 20
    assert memplan.parse_bytes("1000") == 1000
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(ValueError, match="memory size"):
            memplan.parse_bytes(bad)


def test_pack_first_fit_decreasing():
    assert memplan.pack([5, 5, 5], 10) == 2
    assert memplan.pack([6, 4, 6, 4], 10) == 2
    assert memplan.pack([], 10) == 0


def test_a_job_that_does_not_fit_is_refused_with_the_numbers_and_a_layout_that_fits():
    c = cfg(preset="medium", replicas=1, shards=2, partitions="1x1")
    need = memplan.plan(c).total
    assert memplan.check_fits(c, memory=str(need + 1)).total == need
    with pytest.raises(MemoryError) as e:
        memplan.check_fits(c, memory="3G")
    text = str(e.value)
    assert memplan._fmt(need) in text and "3.00 GiB" in text and "paramserver-0" in text
    fit, machines = memplan.smallest_layout(c, 3 << 30)
    assert fit.largest.total <= 3 << 30 and machines >= -(-need // (3 << 30)) - 1
    assert f"on {machines} machines" in text and fit.layout() in text


def test_le2012_needs_several_machines_of_24_gb():
    c = cfg(preset="le2012", replicas=1)
    p = memplan.plan(c)
    assert p.parameters > 1.2e9 and p.total > 24 << 30  # 1.2 billion encoder weights (tied decoders)
    fit, machines = memplan.smallest_layout(c, 24 << 30)
    assert machines > 1 and all(q.total <= 24 << 30 for q in fit.processes)


def test_constrained_blocks_are_counted_once_more_on_the_workers():
    # unit_decoder normalises the decoder blocks (W2), unit_encoder and tied_decoder work from a
    # copy of the encoder (W1); free computes on the blocks themselves.
    net = Network(presets.get("small"))
    w1 = sum(v for k, v in net.block_sizes().items() if k.endswith(".W1"))
    for kind, held in (("free", 0), ("unit_decoder", w1), ("unit_encoder", w1), ("tied_decoder", w1)):
        p = memplan.plan(cfg(preset="small", replicas=1, constraint=kind))
        (worker,) = [q for q in p.processes if q.role == "worker"]
        assert worker.parts["copies"] == memplan.CONSTRAINT_BYTES * held, kind
