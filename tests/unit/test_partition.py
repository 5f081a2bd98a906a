"""downpour.partition: plans, parameter blocks, and partitioned steps that equal the whole model's.

"Relative" below is max |a - b| / max |b| per array: 1e-5 in float32, 1e-10 in float64.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from downpour import partition as P
from downpour.nn import FilterSpec, LCNSpec, Network, NetworkSpec, PoolSpec, StageSpec
from downpour.nn.network import is_term, to_external, to_internal
from downpour.nn.presets import get as preset

GRIDS = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 2)]
TOL = {np.float32: 1e-5, np.float64: 1e-10}


def _st(f=None, p=None, n=None, lam=0.1, constraint="free"):
    return StageSpec(filter=f, pool=p, lcn=n, lam=lam, constraint=constraint)


SPECS = {
    # tiny with untied, free decoders trained jointly (every kind of exchange and block there
    # is), and as the preset is (tied decoders, layer by layer)
    "tiny": dataclasses.replace(
        preset("tiny"),
        training="joint",
        stages=tuple(dataclasses.replace(s, constraint="free") for s in preset("tiny").stages),
    ),
    "tiny_preset": preset("tiny"),
    # Strides and pools that leave rows and columns out (row 29 is in no filter field,
    # the last pool column is in no window), max pooling (a separate L2 sparsity
    # pool), a tied (convolution) stage without pooling, and a softmax head.
    "uneven": NetworkSpec(
        input=(1, 30, 27),
        classes=3,
        training="joint",
        stages=(
            _st(FilterSpec(maps=3, field=5, stride=2), PoolSpec(size=3, stride=2), LCNSpec(size=3)),
            _st(FilterSpec(maps=2, field=2), PoolSpec(size=2, stride=1, kind="max"), LCNSpec(size=3)),
            _st(FilterSpec(maps=2, field=2, tied=True), None, LCNSpec(size=3)),
        ),
    ),
    # A filter alone, a stage without a filter (avg pool + LCN), a reconstruction-only stage.
    "bare": NetworkSpec(
        input=(2, 16, 15),
        classes=2,
        training="joint",
        stages=(
            _st(FilterSpec(maps=2, field=3), None, None),
            _st(None, PoolSpec(size=2, stride=2, kind="avg"), LCNSpec(size=3, sigma=1.0)),
            _st(FilterSpec(maps=2, field=2), PoolSpec(size=2, stride=1), None, lam=0.0),
        ),
    ),
    # Each scale constraint (an untied stride-2 stage, a max-pooled one, a tied convolution
    # whose decoder is its transpose), trained layer by layer.
    "constrained": NetworkSpec(
        input=(1, 30, 27),
        classes=3,
        training="layerwise",
        stages=(
            _st(
                FilterSpec(maps=3, field=5, stride=2), PoolSpec(size=3, stride=2), LCNSpec(size=3), 0.1, "unit_encoder"
            ),
            _st(FilterSpec(maps=2, field=2), PoolSpec(size=2, kind="max"), LCNSpec(size=3), 0.1, "unit_decoder"),
            _st(FilterSpec(maps=2, field=2, tied=True), None, LCNSpec(size=3), 0.1, "tied_decoder"),
        ),
    ),
}


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _data(spec, dtype, batch=3, seed=0):
    net = Network(spec, dtype=dtype)
    params = net.init_params(seed)
    rng = np.random.default_rng(seed + 1)
    x = rng.normal(size=(batch, *spec.input)).astype(dtype)
    y = rng.integers(0, max(spec.classes, 1), size=batch)
    return net, params, x, y


def reference_tica(net, params, x):
    """Network.tica plus the input gradient (which tica itself skips)."""
    loss, grads, info = net.tica(params, x)
    h = to_internal(np, np.asarray(x, dtype=net.dtype))
    ctxs, terms = [], []
    for st in net.stages:
        h, ctx = st.forward(params, h)
        ctxs.append(ctx)
        terms.append(st.tica_terms(params, ctx)[2] if st.has_tica else None)
    dy = None
    for i in range(len(net.stages) - 1, -1, -1):
        if net.spec.training == "layerwise":
            dy = None  # no gradient reaches a stage from the one above
        dy, _ = net.stages[i].backward(params, ctxs[i], dy, tica=terms[i], need_dx=True)
    return loss, grads, info, to_external(np, dy), net.forward(params, x)


# ---------------------------------------------------------------- plans


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("halo", P.HALO_MODES)
def test_plan_tiles_and_halos(name, grid, halo):
    pl = P.plan(SPECS[name], *grid, halo=halo)
    assert pl.partitions == grid[0] * grid[1]
    for lay in pl.layers:
        _, h, w = lay.shape
        owned = np.zeros((h, w), dtype=int)
        for y0, y1, x0, x1 in lay.tiles:
            owned[y0:y1, x0:x1] += 1
        assert (owned == 1).all(), lay.name  # every location owned exactly once
        hs = {t[1] - t[0] for t in lay.tiles}
        ws = {t[3] - t[2] for t in lay.tiles}
        assert max(hs) - min(hs) <= 1 and max(ws) - min(ws) <= 1  # as even as possible
    for (li, kind), regions in pl.needs.items():
        _, h, w = pl.layers[li].shape
        for p, r in enumerate(regions):
            assert 0 <= r[0] < r[1] <= h and 0 <= r[2] < r[3] <= w
            # the sources tile the need region exactly
            area = sum((o[1] - o[0]) * (o[3] - o[2]) for _, o in pl.sources(li, kind, p))
            assert area == (r[1] - r[0]) * (r[3] - r[2])
            for q, o in pl.sources(li, kind, p):
                assert (p, o) in [(pp, oo) for pp, oo in pl.sinks(li, kind, q)]
        if pl.partitions == 1:
            assert not pl.exchanged(li, kind)
    for li, lay in enumerate(pl.layers):
        for kind in P.KINDS:
            assert pl.untag(pl.tag(li, kind)) == (lay.name, kind)


def test_plan_halo_regions_tiny_1x2():
    pl = P.plan(SPECS["tiny"], 1, 2)
    # stage1: 16x16 input, field 5 -> 12x12 filter output; partition 1 owns columns 6..11,
    # so it reads input columns 6..15 of which 6..7 belong to partition 0.
    f = pl.layer("stage1.filter")
    assert f.tiles == ((0, 12, 0, 6), (0, 12, 6, 12))
    assert pl.need(0, "act", 1) == (0, 16, 6, 16)
    assert pl.sources(0, "act", 1) == [(0, (0, 16, 6, 8)), (1, (0, 16, 8, 16))]
    # the LCN (size 3) of stage1 reads its input and v one location beyond the tile
    lcn = pl.layer("stage1.lcn").index
    assert pl.need(lcn, "v", 0) == (0, 10, 0, 6)
    assert pl.exchanged(lcn, "v")


def test_plan_errors():
    with pytest.raises(ValueError, match="'stage3.pool' of 3x3"):
        P.plan(SPECS["tiny"], 4, 1)
    with pytest.raises(ValueError, match="'stage3.filter' of 4x4 .* at most 3x3"):
        P.plan(SPECS["tiny"], 1, 5)
    assert P.plan(SPECS["tiny"], 3, 3).max_grid == (3, 3)
    with pytest.raises(ValueError, match="rows=0"):
        P.plan(SPECS["tiny"], 0, 1)
    with pytest.raises(ValueError, match="cols"):
        P.plan(SPECS["tiny"], 1, 1.5)
    with pytest.raises(ValueError, match="halo='ring'"):
        P.plan(SPECS["tiny"], 1, 1, halo="ring")
    with pytest.raises(KeyError, match="no layer"):
        P.plan(SPECS["tiny"], 1, 1).layer("stage9.lcn")


# ---------------------------------------------------------------- blocks


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("grid", GRIDS)
def test_split_join_round_trip(name, grid):
    spec = SPECS[name]
    pl = P.plan(spec, *grid)
    net, params, _, _ = _data(spec, np.float32)
    blocks = P.split_params(pl, params)
    shapes = P.block_shapes(pl)
    assert set(blocks) == set(shapes)
    for k, v in blocks.items():
        assert v.ndim == 1 and v.size == int(np.prod(shapes[k])) and v.dtype == np.float32
    back = P.join_params(pl, blocks)
    assert set(back) == set(params)
    for k in params:
        np.testing.assert_array_equal(back[k], params[k])
    assert P.split_params(pl, back).keys() == blocks.keys()
    # every block is pushed by exactly one partition; everyone pulls what it pushes
    pushed = [b for p in range(pl.partitions) for b in pl.blocks_pushed(p)]
    assert sorted(pushed) == sorted(shapes)
    for p in range(pl.partitions):
        assert set(pl.blocks_pushed(p)) <= set(pl.blocks_pulled(p))
    if grid == (1, 1):
        assert set(blocks) == set(net.param_shapes())  # no model parallelism: Network's names


def test_block_layout_tiny_2x2():
    spec = SPECS["tiny"]
    pl = P.plan(spec, 2, 2)
    net, params, _, _ = _data(spec, np.float64)
    blocks = P.split_params(pl, params)
    # stage1.filter is 12x12: partition 3 owns rows 6..11, columns 6..11
    L, M, K = net.param_shapes()["stage1.W1"]
    w = params["stage1.W1"].reshape(12, 12, M, K)
    np.testing.assert_array_equal(blocks["stage1.W1[p=3]"].reshape(36, M, K)[7], w[7, 7])
    assert P.block_shapes(pl)["stage1.W2[p=3]"] == (36, K, M)
    uneven = P.plan(SPECS["uneven"], 3, 2)
    bs = P.block_shapes(uneven)
    assert "stage3.W1" in bs and "stage3.W1[p=0]" not in bs  # tied: one shared block
    assert bs["head.W[p=5]"][0] == 3 and "head.b" in bs
    assert uneven.blocks_pushed(1).count("stage3.W1") == 0 and "stage3.W1" in uneven.blocks_pulled(1)
    assert "head.b" in uneven.blocks_pushed(0) and "head.b" not in uneven.blocks_pulled(1)


def test_split_join_errors():
    pl = P.plan(SPECS["tiny"], 1, 2)
    net, params, _, _ = _data(SPECS["tiny"], np.float32)
    with pytest.raises(KeyError, match="stage2.W1"):
        P.split_params(pl, {k: v for k, v in params.items() if k != "stage2.W1"})
    with pytest.raises(ValueError, match="stage1.W1"):
        P.split_params(pl, {**params, "stage1.W1": params["stage1.W1"][:-1]})
    blocks = P.split_params(pl, params)
    with pytest.raises(KeyError, match=r"stage1.W2\[p=1\]"):
        P.join_params(pl, {k: v for k, v in blocks.items() if k != "stage1.W2[p=1]"})
    with pytest.raises(KeyError, match=r"stage1.W2\[p=1\]"):
        P.join_params(pl, {k: v for k, v in blocks.items() if k != "stage1.W2[p=1]"}, partial=True)
    only_w1 = {k: v for k, v in blocks.items() if ".W1" in k}
    assert set(P.join_params(pl, only_w1, partial=True)) == {"stage1.W1", "stage2.W1", "stage3.W1"}


# ---------------------------------------------------------------- exactness


def _check_tica(spec, grid, dtype, halo):
    net, params, x, _ = _data(spec, dtype)
    loss, grads, info, dx, acts = reference_tica(net, params, x)
    pl = P.plan(spec, *grid, halo=halo)
    r = P.run_partitioned(pl, P.split_params(pl, params), x, need_dx=True, dtype=dtype)
    tol = TOL[dtype]
    for k, v in acts.items():
        if k != "head.logits":
            assert rel(r.acts[k], v) < tol, k
            assert r.acts[k].dtype == dtype
    assert abs(r.loss - loss) <= tol * abs(loss)
    for k, v in info.items():
        if is_term(k) or grid == (1, 1):  # watched statistics are partition 0's tile's
            assert abs(r.info[k] - v) <= tol * max(abs(v), 1e-30), k
    assert set(r.info) == set(info)
    joined = P.join_params(pl, r.grads, partial=True)
    assert set(joined) == set(grads)
    for k, v in grads.items():
        assert rel(joined[k], v) < tol, k
    assert rel(r.dx, dx) < tol
    return r


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("halo", P.HALO_MODES)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("name", ["tiny", "tiny_preset", "uneven", "constrained"])
def test_tica_equals_unpartitioned(name, grid, halo, dtype):
    r = _check_tica(SPECS[name], grid, dtype, halo)
    if grid == (1, 1):
        assert r.stats.rounds == 0 and r.stats.total_bytes == 0
    else:
        assert r.stats.halo_bytes > 0 and r.stats.reduce_bytes > 0 and r.stats.halo_fraction > 0


@pytest.mark.parametrize("grid", [(1, 2), (2, 2), (3, 2)])
@pytest.mark.parametrize("halo", P.HALO_MODES)
def test_tica_equals_unpartitioned_bare_stages(grid, halo):
    _check_tica(SPECS["bare"], grid, np.float64, halo)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("name", ["uneven", "bare", "constrained"])
def test_supervised_equals_unpartitioned(name, grid, dtype):
    spec = SPECS[name]
    net, params, x, y = _data(spec, dtype, batch=4)
    loss, grads, info = net.supervised(params, x, y)
    logits = net.forward(params, x)["head.logits"]
    pl = P.plan(spec, *grid)
    r = P.run_partitioned(pl, P.split_params(pl, params), x, y, objective="supervised", dtype=dtype)
    tol = TOL[dtype]
    assert abs(r.loss - loss) <= tol * loss
    assert r.info == info
    assert rel(r.acts["head.logits"], logits) < tol
    joined = P.join_params(pl, r.grads, partial=True)
    assert set(joined) == set(grads)
    for k, v in grads.items():
        assert rel(joined[k], v) < tol, k


def _adagrad(w, acc, g, lr=0.05, eps=1e-8):
    acc = acc + g * g
    return w - lr * g / (np.sqrt(acc) + eps), acc


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("name", ["tiny", "uneven", "constrained"])
def test_training_steps_equal(name, grid):
    """Two Adagrad steps on the blocks, each block updated by its owner, equal two on the whole model."""
    spec = SPECS[name]
    dtype = np.float32
    net, params, x, _ = _data(spec, dtype, batch=4)
    pl = P.plan(spec, *grid)
    rep = P.LocalReplica(pl, dtype=dtype)
    full = {k: v.copy() for k, v in params.items()}
    full_acc = {k: np.full_like(v, 0.1) for k, v in params.items()}
    blocks = P.split_params(pl, params)
    acc = P.split_params(pl, full_acc)
    for step in range(2):
        xs = x * (1 + step)
        _, g_full, _ = net.tica(full, xs)
        for k, g in g_full.items():
            full[k], full_acc[k] = _adagrad(full[k], full_acc[k], g)
        r = rep.tica(blocks, xs, step=step)
        for p in range(pl.partitions):
            pushed = [b for b in pl.blocks_pushed(p) if b in r.grads]
            assert set(pushed) == set(r.partitions[p].grads)  # each pushes its own blocks only
        for b, g in r.grads.items():
            blocks[b], acc[b] = _adagrad(blocks[b], acc[b], g)
    joined = P.join_params(pl, blocks)
    for k in params:
        assert rel(joined[k], full[k]) < 1e-5, k
        assert rel(joined[k] - params[k], full[k] - params[k]) < 1e-4, k  # the updates themselves


# ---------------------------------------------------------------- messages


def _run_collect(pl, blocks, x, dtype=np.float64):
    """Drive the runtimes by hand, keeping every message."""
    rep = P.LocalReplica(pl, dtype=dtype)
    tiles = rep._tiles(x)
    gens = [rt.tica(rep._blocks(blocks, p), tiles[p], step=7) for p, rt in enumerate(rep.runtimes)]
    sent = []
    pending = [g.send(None) for g in gens]
    while True:
        assert len({(e.tag, e.direction) for e in pending}) == 1
        boxes = [[] for _ in gens]
        for e in pending:
            for m in e.send:
                boxes[m.to_partition].append(m)
                sent.append(m)
        for i, e in enumerate(pending):
            assert sorted(m.from_partition for m in boxes[i]) == sorted(e.expect)
        nxt = []
        try:
            for g, box in zip(gens, boxes):
                nxt.append(g.send(box))
        except StopIteration:
            return sent
        pending = nxt


def test_messages_map_to_the_halo_proto():
    spec = SPECS["uneven"]
    pl = P.plan(spec, 2, 2)
    net, params, x, _ = _data(spec, np.float64)
    sent = _run_collect(pl, P.split_params(pl, params), x)
    kinds = set()
    for m in sent:
        layer, kind = pl.untag(m.layer)
        kinds.add((kind, m.direction))
        assert m.step == 7 and m.replica == 0 and m.generation == 0 and m.from_partition != m.to_partition
        assert m.direction in (P.FORWARD, P.BACKWARD)
        assert isinstance(m.tensor, np.ndarray) and m.tensor.ndim == 4 and m.tensor.flags.c_contiguous
        assert all(isinstance(v, int) for v in (m.y0, m.x0, m.y1, m.x1, m.layer))
        if kind in ("act", "v", "recon", "drecon"):
            c = pl.layer(layer).shape[0]
            assert m.tensor.shape == (x.shape[0], m.y1 - m.y0, m.x1 - m.x0, c)
            # a pulled halo lies in the sender's tile; a partial sum in the receiver's
            pulled = kind == "drecon" or (kind in ("act", "v") and m.direction == P.FORWARD)
            t = pl.layer(layer).tiles[m.from_partition if pulled else m.to_partition]
            assert t[0] <= m.y0 < m.y1 <= t[1] and t[2] <= m.x0 < m.x1 <= t[3]
        else:
            assert (m.y0, m.y1, m.x0, m.x1) == (0, 1, 0, 1)
    assert {
        ("act", P.FORWARD),
        ("act", P.BACKWARD),
        ("v", P.FORWARD),
        ("v", P.BACKWARD),
        ("recon", P.FORWARD),
        ("drecon", P.BACKWARD),
        ("sum", P.FORWARD),
        ("sum", P.BACKWARD),
        ("param1", P.BACKWARD),
        ("param2", P.BACKWARD),
    } <= kinds


def test_wrong_messages_are_refused():
    spec = SPECS["tiny"]
    pl = P.plan(spec, 1, 2)
    net, params, x, _ = _data(spec, np.float64)
    rep = P.LocalReplica(pl, dtype=np.float64)
    tiles = rep._tiles(x)
    blocks = P.split_params(pl, params)
    g = rep.runtimes[1].tica(rep._blocks(blocks, 1), tiles[1])
    ex = g.send(None)
    assert ex.expect == [0]
    with pytest.raises(ValueError, match="expected messages from"):
        g.send([])
    g = rep.runtimes[0].tica(rep._blocks(blocks, 0), tiles[0])
    ex0 = g.send(None)
    g1 = rep.runtimes[1].tica(rep._blocks(blocks, 1), tiles[1])
    g1.send(None)  # partition 1 reaches its exchange too
    bad = ex0.send[0]
    bad.y1 += 1
    with pytest.raises(ValueError, match="covers"):
        g1.send([bad])
    with pytest.raises(ValueError, match="input tile must have shape"):
        next(rep.runtimes[0].tica(rep._blocks(blocks, 0), tiles[1][:, :3]))
    with pytest.raises(ValueError, match="partition=2"):
        P.PartitionRuntime(pl, 2)
    with pytest.raises(ValueError, match="no head"):
        next(rep.runtimes[0].supervised(rep._blocks(blocks, 0), tiles[0], [0, 0, 0]))
    with pytest.raises(KeyError, match="missing block"):
        rep.tica({}, x)


def test_halo_modes_trade_rounds_for_bytes():
    """ "stage" needs fewer synchronisation points than "layer" and sends more bytes."""
    spec = SPECS["tiny"]
    net, params, x, _ = _data(spec, np.float32, batch=8)
    stats = {}
    for halo in P.HALO_MODES:
        pl = P.plan(spec, 2, 2, halo=halo)
        stats[halo] = P.run_partitioned(pl, P.split_params(pl, params), x).stats
    assert stats["stage"].rounds < stats["layer"].rounds
    assert stats["stage"].halo_bytes > stats["layer"].halo_bytes
    assert stats["layer"].activation_bytes == P.plan(spec, 2, 2).activation_bytes(8, 4)
    assert ("v" not in {k for _, k in stats["stage"].bytes}) and stats["layer"].bytes[(P.FORWARD, "v")] > 0


def test_imports_no_grpc_and_no_threads():
    code = (
        "import sys, downpour.partition as P; "
        "bad = [m for m in ('grpc', 'downpour.rpc', 'downpour.worker', 'concurrent.futures') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
