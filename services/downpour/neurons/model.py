"""Questions about single units of a network, given its parameters.

Layers are those of ``Network.forward``: ``stageN.filter``, ``stageN.pool``,
``stageN.output`` and ``head.logits`` (shape [classes, 1, 1]). A unit is
(layer, map, y, x), or its flat index ((map * H) + y) * W + x.

The gradient of one unit's activation with respect to the input is built from
the stages' own backward passes: forward to the unit's stage, a one-hot
gradient at the unit, back through the part of that stage below the unit, then
through every stage below it. The optimal stimulus (Le et al. 2012, section
4.2) maximises the activation over inputs of a fixed L2 norm by projected
gradient ascent: step along the gradient, project back onto the sphere.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from downpour.nn import Network
from downpour.nn import backend as nnbackend
from downpour.nn.network import to_external, to_internal
from downpour.nn.spec import NetworkSpec, stage_shapes

PARTS = ("filter", "pool", "output")


class QueryError(ValueError):
    """A request the model cannot answer as asked (unknown layer, unit out of range, ...)."""


def layer_shapes(spec: NetworkSpec) -> dict[str, tuple[int, int, int]]:
    """Every queryable layer and its (maps, height, width), in forward order."""
    out: dict[str, tuple[int, int, int]] = {}
    for i, sh in enumerate(stage_shapes(spec), 1):
        for part in ("filter", "pool"):
            if part in sh:
                out[f"stage{i}.{part}"] = sh[part]
        out[f"stage{i}.output"] = sh["output"]
    if spec.classes:
        out["head.logits"] = (spec.classes, 1, 1)
    return out


@dataclass(frozen=True)
class Unit:
    layer: str
    map: int
    y: int
    x: int


class NeuronModel:
    """A network with one set of parameters; every method is thread-safe (one lock:
    the layers reuse scratch buffers)."""

    def __init__(self, spec: NetworkSpec, params: dict, version: int = 0, backend="numpy"):
        self.spec = spec
        # "numpy", "cupy", or an array module itself (tests stand NumPy in for CuPy)
        xp = nnbackend.get(backend) if isinstance(backend, str) else backend
        self.net = Network(spec, xp=xp)
        # Queries read the encoders (and the head) only: the decoders are neither needed nor kept.
        needed = set(self.net.encoder_names())
        self.params = {k: xp.asarray(np.asarray(nnbackend.to_numpy(v), np.float32).reshape(-1))
                       for k, v in params.items() if k in needed}
        self.net._views(self.params, self.net.encoder_names())  # raises on missing or mis-sized blocks
        self.version = int(version)
        self.layers = layer_shapes(spec)
        self._lock = threading.Lock()

    # -- units --------------------------------------------------------------------
    def layer_shape(self, layer: str) -> tuple[int, int, int]:
        try:
            return self.layers[layer]
        except KeyError:
            raise QueryError(f"unknown layer {layer!r}; layers: {', '.join(self.layers)}") from None

    def flat_index(self, u: Unit) -> int:
        c, h, w = self.layer_shape(u.layer)
        if not (0 <= u.map < c and 0 <= u.y < h and 0 <= u.x < w):
            raise QueryError(f"neuron (map={u.map}, y={u.y}, x={u.x}) is outside layer {u.layer!r} of shape "
                             f"[maps={c}, height={h}, width={w}]")
        return (u.map * h + u.y) * w + u.x

    def unit(self, layer: str, flat: int) -> Unit:
        c, h, w = self.layer_shape(layer)
        if not 0 <= flat < c * h * w:
            raise QueryError(f"neuron id {flat} is outside layer {layer!r} of {c * h * w} units "
                             f"([maps={c}, height={h}, width={w}])")
        m, r = divmod(int(flat), h * w)
        return Unit(layer, m, r // w, r % w)

    # -- activations --------------------------------------------------------------
    def _check_input(self, x: np.ndarray) -> np.ndarray:
        c, h, w = self.spec.input
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
            raise QueryError(f"images must be {h}x{w} with {c} channel(s); got batch shape "
                             f"{tuple(x.shape[2:])} x {x.shape[1] if x.ndim == 4 else '?'} channel(s)")
        if not np.all(np.isfinite(x)):
            raise QueryError("images contain NaN or Inf")
        return np.ascontiguousarray(x, self.net.dtype)

    def layer_activations(self, x_bchw: np.ndarray, layer: str, batch: int = 256) -> np.ndarray:
        """(B, units) float32 activations of every unit of ``layer``."""
        self.layer_shape(layer)
        x = self._check_input(x_bchw)
        upto = None if layer == "head.logits" else int(layer.split(".")[0][5:])
        out = []
        for i in range(0, len(x), batch):
            with self._lock:
                a = self.net.forward(self.params, x[i:i + batch], upto=upto)[layer]
            out.append(np.asarray(nnbackend.to_numpy(a), np.float32).reshape(len(a), -1))
        if not out:
            return np.zeros((0, int(np.prod(self.layers[layer]))), np.float32)
        return np.concatenate(out)

    def activations(self, x_bchw: np.ndarray, units: list[Unit]) -> np.ndarray:
        """(B, len(units)) activations of the given units."""
        ids = [self.flat_index(u) for u in units]
        by_layer: dict[str, list[int]] = {}
        for j, u in enumerate(units):
            by_layer.setdefault(u.layer, []).append(j)
        out = np.zeros((len(x_bchw), len(units)), np.float32)
        for layer, cols in by_layer.items():
            a = self.layer_activations(x_bchw, layer)
            out[:, cols] = a[:, [ids[j] for j in cols]]
        return out

    # -- gradients ------------------------------------------------------------------
    def _value_and_input_grad(self, x_bchw: np.ndarray, u: Unit) -> tuple[np.ndarray, np.ndarray]:
        """The unit's activation for each example (B,) and its gradient w.r.t. the input (B, C, H, W)."""
        net, xp = self.net, self.net.xp
        self.flat_index(u)
        params = self.params
        head = u.layer == "head.logits"
        s = len(net.stages) if head else int(u.layer.split(".")[0][5:])
        part = None if head else u.layer.split(".")[1]
        with self._lock:
            h = to_internal(xp, xp.asarray(x_bchw, dtype=net.dtype))
            ctxs = []
            for st in net.stages[:s]:
                h, ctx = st.forward(params, h)
                ctxs.append(ctx)
            B = h.shape[3]
            st = net.stages[s - 1]
            if head:
                W = params["head.W"].reshape(self.spec.classes, net.features)
                value = (W[u.map] @ h.reshape(net.features, B)) + params["head.b"][u.map]
                dy = xp.broadcast_to(W[u.map][:, None], (net.features, B)).reshape(h.shape).copy()
                dx, _ = st.backward(params, ctxs[-1], dy, need_dx=True)
            else:
                key = {"filter": "z", "pool": "h"}.get(part)
                a = h if part == "output" else ctxs[-1][key]
                value = a[u.y, u.x, u.map, :]
                dy = xp.zeros(a.shape, dtype=a.dtype)
                dy[u.y, u.x, u.map, :] = 1
                if part == "output":
                    dx, _ = st.backward(params, ctxs[-1], dy, need_dx=True)
                else:
                    dz = st.pool.backward(ctxs[-1]["pool"], dy) if part == "pool" else dy
                    dx, _ = st.filter.backward(params[f"{st.name}.W1"], ctxs[-1]["P"], dz, need_dx=True)
            for i in range(s - 2, -1, -1):
                dx, _ = net.stages[i].backward(params, ctxs[i], dx, need_dx=True)
            # copies: the layers reuse their buffers once the lock is released
            return (np.array(nnbackend.to_numpy(value), np.float64),
                    np.array(nnbackend.to_numpy(to_external(xp, dx)), np.float64))

    def input_gradient(self, x_bchw: np.ndarray, u: Unit) -> tuple[np.ndarray, np.ndarray]:
        return self._value_and_input_grad(self._check_input(np.asarray(x_bchw)), u)

    def optimal_stimulus(self, u: Unit, *, steps: int = 200, lr: float = 0.1, seed: int = 0,
                         restarts: int = 8, norm: float = 1.0, n_random: int = 64) -> dict:
        """Maximise the unit's activation over inputs with ||x||_2 = ``norm``.

        Projected gradient ascent from ``restarts`` random points at once: each
        step moves ``lr * norm`` along the normalised gradient, then projects
        back onto the sphere. Returns the best input (C, H, W), its activation
        and the activations of ``n_random`` random inputs of the same norm.
        """
        self.flat_index(u)
        rng = np.random.default_rng(seed)
        shape = (restarts,) + tuple(self.spec.input)

        def project(z):
            n = np.sqrt((z.reshape(len(z), -1) ** 2).sum(1))
            return z / np.maximum(n, 1e-12)[:, None, None, None] * norm

        rand = project(rng.standard_normal((n_random,) + tuple(self.spec.input)))
        base = self.activations(rand.astype(np.float32), [u])[:, 0].astype(np.float64)
        # start from the best random points: cheaper than ascending from the worst
        x = rand[np.argsort(-base)[:restarts]] if restarts <= n_random else project(rng.standard_normal(shape))
        best_x, best_v = x[0].copy(), -np.inf
        step = lr * norm
        for _ in range(max(steps, 0) + 1):
            v, g = self._value_and_input_grad(x.astype(np.float32), u)
            i = int(np.argmax(v))
            if v[i] > best_v:
                best_v, best_x = float(v[i]), x[i].copy()
            gn = np.sqrt((g.reshape(len(g), -1) ** 2).sum(1))
            x = project(x + step * g / np.maximum(gn, 1e-20)[:, None, None, None])
        return {"stimulus": best_x.astype(np.float32), "activation": best_v,
                "random_mean": float(base.mean()), "random_max": float(base.max()), "random": base}

    def top_inputs(self, x_bchw: np.ndarray, u: Unit, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices (into x) and activations of the k inputs that excite the unit most, best first."""
        a = self.activations(x_bchw, [u])[:, 0]
        order = np.argsort(-a, kind="stable")[:k]
        return order, a[order]
