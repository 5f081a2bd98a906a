"""Parity on a GPU: downpour.nn on CuPy (downpour.kernels) against downpour.nn on NumPy.

Layers forward and backward, the TICA and supervised objectives of whole
networks, Adagrad training steps of ``tiny`` through the worker's loop (with
the parameters copied to the device once per pull and the gradients back once
per push), and the neurons service's model. float64 must agree to rounding;
float32 to float32 rounding (normwise). Skipped, with the reason, where CuPy
or a CUDA GPU is missing: run by benchmarks/gpu.sh on a GPU host.
"""

from __future__ import annotations

import numpy as np
import pytest

from downpour import device as devices
from downpour.nn import LCN, LocalFilter, Network, Pool, presets
from downpour.nn.spec import from_dict

try:
    cp = devices.array_module("gpu")
    WHY = ""
except devices.DeviceError as e:
    cp, WHY = None, str(e)

pytestmark = pytest.mark.skipif(cp is None, reason=f"no GPU to run on: {WHY}")

TOL = {np.float64: 1e-11, np.float32: 3e-6}


def close(got, ref, dtype, tol_scale=1.0):
    """Normwise relative error of a GPU result against the NumPy one."""
    assert type(got).__module__.startswith("cupy"), f"expected a CuPy array, got {type(got)}"
    g, r = cp.asnumpy(got).astype(np.float64), np.asarray(ref, np.float64)
    assert g.shape == r.shape, (g.shape, r.shape)
    err = np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-300)
    assert err <= TOL[dtype] * tol_scale, f"normwise relative error {err:.3g} > {TOL[dtype] * tol_scale:.1g}"


GEOMETRIES = [  # (C, H, W, maps, field, stride, tied, B)
    (1, 9, 9, 3, 3, 1, False, 2),
    (3, 11, 10, 4, 4, 2, False, 3),
    (2, 12, 13, 2, 5, 3, False, 1),
    (3, 8, 8, 2, 2, 4, False, 2),
    (2, 10, 9, 3, 4, 1, True, 2),
    (3, 40, 40, 8, 18, 1, False, 8),  # le2012's field and maps on a smaller image
    (8, 30, 30, 8, 18, 1, False, 4),  # a second stage's K = 18*18*8
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("geom", GEOMETRIES)
def test_local_filter_parity(geom, dtype):
    C, H, W, M, k, s, tied, B = geom
    rng = np.random.default_rng(7)
    ref = LocalFilter((C, H, W), M, k, s, tied)
    gpu = LocalFilter((C, H, W), M, k, s, tied, xp=cp)
    assert gpu.accel is not None and ref.accel is None
    x = rng.standard_normal((H, W, C, B)).astype(dtype)
    w1 = rng.standard_normal(ref.weight_shape).astype(dtype).ravel()
    w2 = rng.standard_normal(ref.decoder_shape).astype(dtype).ravel()
    dy = rng.standard_normal((ref.Ho, ref.Wo, M, B)).astype(dtype)
    dr = rng.standard_normal((H, W, C, B)).astype(dtype)
    X, W1, W2, DY, DR = (cp.asarray(a) for a in (x, w1, w2, dy, dr))
    y_ref, c_ref = ref.forward(w1, x)
    y, c = gpu.forward(W1, X)
    close(y, y_ref, dtype)
    dx_ref, dw_ref = ref.backward(w1, c_ref, dy)
    dx, dw = gpu.backward(W1, c, DY)
    close(dx, dx_ref, dtype)
    close(dw, dw_ref, dtype)
    close(gpu.decode(W2, DY), ref.decode(w2, dy), dtype)
    dz_ref, dw2_ref = ref.decode_backward(w2, dy, dr)
    dz, dw2 = gpu.decode_backward(W2, DY, DR)
    close(dz, dz_ref, dtype)
    close(dw2, dw2_ref, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", ["l2", "max", "avg"])
@pytest.mark.parametrize("geom", [(3, 9, 9, 3, 1, 2), (2, 11, 10, 3, 2, 3), (8, 183, 183, 5, 1, 2)])
def test_pool_parity(geom, kind, dtype):
    C, H, W, p, s, B = geom
    rng = np.random.default_rng(3)
    ref = Pool((C, H, W), p, s, kind)
    gpu = Pool((C, H, W), p, s, kind, xp=cp)
    assert (gpu.accel is not None) == (kind == "l2")
    x = rng.standard_normal((H, W, C, B)).astype(dtype)
    dy = rng.standard_normal((ref.Ho, ref.Wo, C, B)).astype(dtype)
    y_ref, c_ref = ref.forward(x)
    y, c = gpu.forward(cp.asarray(x))
    close(y, y_ref, dtype)
    close(gpu.backward(c, cp.asarray(dy)), ref.backward(c_ref, dy), dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("geom", [(3, 9, 10, 5, 2), (2, 4, 5, 7, 1), (8, 179, 179, 5, 2)])
def test_lcn_parity(geom, dtype):
    C, H, W, size, B = geom
    rng = np.random.default_rng(5)
    ref, gpu = LCN((C, H, W), size), LCN((C, H, W), size, xp=cp)
    x = rng.standard_normal((H, W, C, B)).astype(dtype)
    dy = rng.standard_normal((H, W, C, B)).astype(dtype)
    y_ref, c_ref = ref.forward(x)
    y, c = gpu.forward(cp.asarray(x))
    close(y, y_ref, dtype, 10)  # a division by a local standard deviation: a few more roundings
    close(gpu.backward(c, cp.asarray(dy)), ref.backward(c_ref, dy), dtype, 10)


MIXED = {
    "input": [2, 14, 13],
    "classes": 3,
    "stages": [
        {"filter": {"maps": 3, "field": 4, "stride": 2}, "pool": {"size": 2, "kind": "l2"}, "lcn": {"size": 3}},
        {"filter": {"maps": 2, "field": 2, "tied": True}, "pool": {"size": 2, "kind": "max"}, "lcn": None},
    ],
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("which", ["tiny", "small", "mixed"])
def test_network_objectives_parity(which, dtype):
    spec = from_dict(MIXED) if which == "mixed" else presets.get(which)
    ref, gpu = Network(spec, dtype=dtype), Network(spec, xp=cp, dtype=dtype)
    params = ref.init_params(seed=4)
    dparams = devices.to_device(cp, params)
    x = np.random.default_rng(2).standard_normal((8, *spec.input)).astype(dtype)
    loss_ref, g_ref, _ = ref.tica(params, x)
    loss, g, _ = gpu.tica(dparams, x)
    assert abs(loss - loss_ref) <= 10 * TOL[dtype] * abs(loss_ref)
    for k in g_ref:
        close(g[k], g_ref[k], dtype, 10)
    acts_ref, acts = ref.forward(params, x), gpu.forward(dparams, x)
    for k in acts_ref:
        close(acts[k], acts_ref[k], dtype, 10)
    if spec.classes:
        y = np.arange(8) % spec.classes
        loss_ref, g_ref, _ = ref.supervised(params, x, y)
        loss, g, _ = gpu.supervised(dparams, x, y)
        assert abs(loss - loss_ref) <= 10 * TOL[dtype] * abs(loss_ref)
        for k in g_ref:
            close(g[k], g_ref[k], dtype, 10)


def test_training_steps_of_tiny_through_the_worker_loop_match_the_cpu():
    """20 Adagrad steps of tiny: the worker's GPU compute (copy per pull, gradients back per push) vs NumPy."""
    from downpour.optim import OptimizerConfig
    from downpour.worker.loop import DownpourLoop, LocalStore

    spec = presets.get("tiny")
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((16, *spec.input)).astype(np.float32), None) for _ in range(20)]
    init = Network(spec).init_params(0)
    finals, copies = {}, {"to_device": 0}
    for name, xp in (("cpu", np), ("gpu", cp)):
        net = Network(spec, xp=xp)
        cache = {"host": None, "dev": None}

        def compute(params, x, y, net=net, xp=xp, cache=cache):
            if params is not cache["host"]:
                cache["host"], cache["dev"] = params, devices.to_device(xp, params)
                copies["to_device"] += xp is cp
            loss, grads, _ = net.tica(cache["dev"], x)
            return loss, grads

        store = LocalStore(init, OptimizerConfig(lr=0.01, eps=1e-6, initial_accumulator=0.0))
        # No overlap: with it, whether a pull sees the previous push depends on timing, and
        # Adagrad's first steps (about lr * sign(g)) turn such differences into lr-sized ones.
        loop = DownpourLoop(
            compute,
            store,
            list(init),
            iter(batches),
            n_fetch=2,
            n_push=2,
            overlap=False,
            to_host=None if xp is np else devices.to_host,
        )
        for step in range(20):
            loop.step(step, first=step == 0)
        loop.close()
        finals[name] = store.w
    assert copies["to_device"] == 1 + 20 // 2 - 1  # the first pull, then one per n_fetch steps
    for k, ref in finals["cpu"].items():
        err = np.linalg.norm(finals["gpu"][k] - ref) / np.linalg.norm(ref)
        assert err < 1e-4, f"{k}: parameters after 20 steps differ by {err:.3g} (normwise)"


def test_neurons_model_parity():
    from downpour.neurons.model import NeuronModel, Unit

    spec = presets.get("tiny")
    params = Network(spec).init_params(1)
    ref, gpu = NeuronModel(spec, params), NeuronModel(spec, params, backend=cp)
    x = np.random.default_rng(3).standard_normal((6, *spec.input)).astype(np.float32)
    for layer in ("stage1.filter", "stage2.pool", "stage3.output"):
        a_ref, a = ref.layer_activations(x, layer), gpu.layer_activations(x, layer)
        assert isinstance(a, np.ndarray)
        np.testing.assert_allclose(a, a_ref, rtol=1e-4, atol=1e-5)
    u = Unit("stage2.output", 1, 1, 1)
    v_ref, g_ref = ref.input_gradient(x, u)
    v, g = gpu.input_gradient(x, u)
    np.testing.assert_allclose(v, v_ref, rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(g - g_ref) / np.linalg.norm(g_ref) < 1e-4
