"""A constrained network's blocks on a real parameter shard: plain Adagrad there, exact unit norms here.

The scale constraints (nn.constraint) are reparametrisations, so a shard needs nothing new: it
applies the pulled-back gradients to the stored blocks as to any block. One `downpour serve
paramserver` on 127.0.0.1 holds the blocks of the tiny preset with unit_encoder, unit_decoder and
tied_decoder stages; a few steps of Network.tica gradients go through ParamClient, and what comes
back is bit for bit what optim.update gives in process, with effective unit norms of 1.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from downpour import optim
from downpour.nn import Network, constraint
from downpour.nn.presets import get as preset
from downpour.paramserver.client import ParamClient

KINDS = ("unit_encoder", "unit_decoder", "tied_decoder")  # stages 1, 2, 3
CFG = optim.OptimizerConfig(lr=0.05, eps=1e-6, initial_accumulator=0.1)
STEPS = 4
UNIT_TOL = 1e-5


def network() -> Network:
    spec = preset("tiny")
    stages = tuple(dataclasses.replace(s, constraint=k) for s, k in zip(spec.stages, KINDS))
    return Network(dataclasses.replace(spec, stages=stages))


def test_constrained_blocks_on_a_shard_match_in_process_adagrad_and_stay_unit(shards):
    s = shards("--lr", str(CFG.lr), "--eps", str(CFG.eps), "--initial-accumulator", str(CFG.initial_accumulator))
    net = network()
    local = net.init_params(0)
    assert set(local) == {"stage1.W1", "stage1.W2", "stage2.W1", "stage2.W2", "stage3.W1"}  # tied: no W2
    initial = {k: v.copy() for k, v in local.items()}
    state = {k: optim.get(CFG.kind).init(v.size, CFG) for k, v in local.items()}
    rng = np.random.default_rng(0)
    with ParamClient([s.address], worker_id="w", chunk_bytes=4096) as ps:
        ps.init(local)
        for step in range(STEPS):
            pulled = {k: np.asarray(v, np.float32).reshape(-1) for k, v in ps.pull().items()}
            for k in local:
                np.testing.assert_array_equal(pulled[k], local[k], err_msg=f"{k} before step {step}")
            x = rng.standard_normal((8, *net.spec.input)).astype(np.float32)
            _, grads, _ = net.tica(pulled, x)
            ps.wait(ps.push(grads))
            for k, g in grads.items():
                optim.update(CFG, local[k], state[k], g)
        final = {k: np.asarray(v, np.float32).reshape(-1) for k, v in ps.pull().items()}
        acc = {k: np.asarray(v, np.float32).reshape(-1) for k, v in ps.pull(accumulators=True).items()}
    for k in local:
        np.testing.assert_array_equal(final[k], local[k], err_msg=k)
        assert np.abs(final[k] - initial[k]).max() > 1e-3, f"{k}: the steps moved it"
        np.testing.assert_array_equal(acc[k], state[k], err_msg=f"{k} accumulator")
    for st, (block, axis) in zip(net.stages[:2], (("W1", -1), ("W2", -2))):
        f = st.filter
        w1, w2 = constraint.effective_blocks(
            st.spec.constraint, np, final[f"{st.name}.W1"], final[f"{st.name}.W2"], f.weight_shape, f.decoder_shape
        )
        eff = w1.reshape(f.weight_shape) if block == "W1" else w2.reshape(f.decoder_shape)
        norms = np.sqrt((eff.astype(np.float64) ** 2).sum(axis=axis))
        assert np.abs(norms - 1).max() < UNIT_TOL, f"{st.name} ({st.spec.constraint}): {norms.min()}..{norms.max()}"
        shape = f.weight_shape if block == "W1" else f.decoder_shape
        stored = np.sqrt((final[f"{st.name}.{block}"].reshape(shape).astype(np.float64) ** 2).sum(axis=axis))
        assert np.abs(stored - 1).max() > 1e-2, f"{st.name}: the stored {block} is free"
    f = net.stages[2].filter
    w1, w2 = constraint.effective_blocks("tied_decoder", np, final["stage3.W1"], None, f.weight_shape, f.decoder_shape)
    np.testing.assert_array_equal(w2.reshape(f.decoder_shape), w1.reshape(f.weight_shape).swapaxes(-1, -2))
