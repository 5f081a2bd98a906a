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

Every question is computed one stage at a time: the stage's blocks are asked
of the model's ``Blocks`` store (``downpour.neurons.blocks``), the stage runs
on every image of the question, and its blocks are let go before the next
stage's are asked for; the head's two blocks count as one more stage. A query
at ``stage2.pool`` never reads stage 3, the head or any decoder, and the model
holds at most one stage's blocks (plus the activations in flight), counted on
its ``Meter``. A store that keeps its parameters in memory anyway
(``HeldBlocks``) makes each step free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from downpour.neurons import cancel
from downpour.neurons.api import DEFAULT_STIMULUS, StimulusSettings
from downpour.neurons.blocks import Blocks, HeldBlocks, Meter, nbytes
from downpour.nn import Network
from downpour.nn import backend as nnbackend
from downpour.nn.network import to_external, to_internal
from downpour.nn.spec import NetworkSpec, stage_shapes

PARTS = ("filter", "pool", "output")
ACTIVATION_KEY = {"filter": "z", "pool": "h"}  # where a stage's context keeps that part's activations


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


class _Stage:
    """One stage's blocks while a model holds them, and the bytes counted for them."""

    def __init__(self, params: dict, counted: int) -> None:
        self.params, self.counted = params, counted


class NeuronModel:
    """A network with one set of parameters; every method is thread-safe (one lock per ``Meter``,
    shared by the models of one source: the layers reuse scratch buffers, and one query at a time
    keeps one stage resident at a time).

    ``params``: a ``Blocks`` store, or a dict of blocks (kept in memory as ``HeldBlocks``).
    """

    def __init__(
        self, spec: NetworkSpec, params: Blocks | dict, version: int = 0, backend="numpy", meter: Meter | None = None
    ):
        self.spec = spec
        # "numpy", "cupy", or an array module itself (tests stand NumPy in for CuPy)
        xp = nnbackend.get(backend) if isinstance(backend, str) else backend
        self.net = Network(spec, xp=xp)
        self.meter = meter or Meter()
        # What each step of a question reads: a stage's encoder (none for a stage without a
        # filter), then the head. The decoders are never read.
        self.groups = [[f"{st.name}.W1"] if st.filter is not None else [] for st in self.net.stages]
        if spec.classes:
            self.groups.append(["head.W", "head.b"])
        held: dict = {}
        if isinstance(params, Blocks):
            self.store = params
        else:
            needed = set(self.net.encoder_names())
            held = {
                k: xp.asarray(np.asarray(nnbackend.to_numpy(v), np.float32).reshape(-1))
                for k, v in params.items()
                if k in needed
            }
            self.net._views(held, self.net.encoder_names())  # raises on missing or mis-sized blocks
            self.store = HeldBlocks(held, version)
        self._kept = nbytes(held) if isinstance(self.store, HeldBlocks) else 0  # counted while the model lives
        self.meter.hold(self._kept)
        self.layers = layer_shapes(spec)

    @property
    def version(self) -> int:
        return self.store.version

    def let_go(self) -> None:
        """No longer count the blocks this model keeps (its source replaced it)."""
        self.meter.drop(self._kept)
        self._kept = 0

    @property
    def params(self) -> dict:
        """Every block queries read, at once: the held ones, or (tools and tests) all of them fetched
        now. Questions never use this; they read one stage at a time."""
        if isinstance(self.store, HeldBlocks):
            return self.store.params
        return self.store.fetch(self.net.encoder_names())

    @params.setter
    def params(self, params: dict) -> None:
        self.store = HeldBlocks(params, self.version)

    def stage_bytes(self) -> list[int]:
        """Bytes of each step's blocks (float32): the most a question holds is the largest."""
        sizes = self.net.block_sizes()
        return [4 * sum(sizes[n] for n in g) for g in self.groups]

    def _swap(self, group: int, held: _Stage | None) -> _Stage:
        """Let ``held`` go, then fetch the blocks of ``group`` (checked against the spec)."""
        self._release(held)
        names = self.groups[group]
        got = self.store.fetch(names, self.meter) if names else {}
        counted = nbytes(got) if self.store.copies else 0
        self.meter.hold(counted)
        try:
            xp = self.net.xp
            params = {k: v if not self.store.copies else xp.asarray(v) for k, v in got.items()}
            del got
            self.net._views(params, names)
        except Exception:
            self.meter.drop(counted)
            raise
        return _Stage(params, counted)

    def _release(self, held: _Stage | None) -> None:
        if held is not None:
            held.params.clear()
            self.meter.drop(held.counted)
            held.counted = 0

    # -- units --------------------------------------------------------------------
    def layer_shape(self, layer: str) -> tuple[int, int, int]:
        try:
            return self.layers[layer]
        except KeyError:
            raise QueryError(f"unknown layer {layer!r}; layers: {', '.join(self.layers)}") from None

    def flat_index(self, u: Unit) -> int:
        c, h, w = self.layer_shape(u.layer)
        if not (0 <= u.map < c and 0 <= u.y < h and 0 <= u.x < w):
            raise QueryError(
                f"neuron (map={u.map}, y={u.y}, x={u.x}) is outside layer {u.layer!r} of shape "
                f"[maps={c}, height={h}, width={w}]"
            )
        return (u.map * h + u.y) * w + u.x

    def unit(self, layer: str, flat: int) -> Unit:
        c, h, w = self.layer_shape(layer)
        if not 0 <= flat < c * h * w:
            raise QueryError(
                f"neuron id {flat} is outside layer {layer!r} of {c * h * w} units ([maps={c}, height={h}, width={w}])"
            )
        m, r = divmod(int(flat), h * w)
        return Unit(layer, m, r // w, r % w)

    # -- activations --------------------------------------------------------------
    def _check_input(self, x: np.ndarray) -> np.ndarray:
        c, h, w = self.spec.input
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
            raise QueryError(
                f"images must be {h}x{w} with {c} channel(s); got batch shape "
                f"{tuple(x.shape[2:])} x {x.shape[1] if x.ndim == 4 else '?'} channel(s)"
            )
        if not np.all(np.isfinite(x)):
            raise QueryError("images contain NaN or Inf")
        return np.ascontiguousarray(x, self.net.dtype)

    def layer_activations(self, x_bchw: np.ndarray, layer: str, batch: int = 256) -> np.ndarray:
        """(B, units) float32 activations of every unit of ``layer``, one stage at a time.

        The images go through in slices of ``batch`` (each slice's arithmetic is that of
        ``Network.forward`` on it: the same bits); every slice's activations stay in flight
        while a stage's blocks are held.
        """
        self.layer_shape(layer)
        x = self._check_input(x_bchw)
        if not len(x):
            return np.zeros((0, int(np.prod(self.layers[layer]))), np.float32)
        net, xp = self.net, self.net.xp
        head = layer == "head.logits"
        s = len(net.stages) if head else int(layer.split(".")[0][5:])
        part = "" if head else layer.split(".")[1]
        out: list[np.ndarray] = []
        with self.meter.lock:
            hs = [net._input(x[i : i + batch]) for i in range(0, len(x), batch)]
            held = None
            try:
                for i, st in enumerate(net.stages[:s]):
                    held = self._swap(i, held)
                    last = i == s - 1 and not head
                    for j, h in enumerate(hs):
                        h, ctx = st.forward(held.params, h)
                        if last:
                            a = h if part == "output" else ctx[ACTIVATION_KEY[part]]
                            out.append(self._rows(to_external(xp, a)))
                        else:  # a copy: the stage reuses its buffers for the next slice
                            hs[j] = h.copy()
                if head:
                    held = self._swap(len(net.stages), held)
                    out.extend(self._rows(net._logits(held.params, h).T.copy()) for h in hs)
            finally:
                self._release(held)
        return np.concatenate(out)

    @staticmethod
    def _rows(a) -> np.ndarray:
        return np.asarray(nnbackend.to_numpy(a), np.float32).reshape(len(a), -1)

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
        """The unit's activation for each example (B,) and its gradient w.r.t. the input (B, C, H, W).

        Forward one stage at a time up to the unit's, then backward down again, each stage's
        blocks fetched anew (the contexts, activations, stay in flight). A head unit fetches
        the head between the last stage's forward and backward.
        """
        net, xp = self.net, self.net.xp
        self.flat_index(u)
        head = u.layer == "head.logits"
        s = len(net.stages) if head else int(u.layer.split(".")[0][5:])
        part = "" if head else u.layer.split(".")[1]
        with self.meter.lock:
            held = None
            try:
                h = to_internal(xp, xp.asarray(x_bchw, dtype=net.dtype))
                ctxs = []
                for i, st in enumerate(net.stages[:s]):
                    held = self._swap(i, held)
                    h, ctx = st.forward(held.params, h)
                    ctxs.append(ctx)
                assert held is not None  # s >= 1: a unit's stage was fetched
                B = h.shape[3]
                st = net.stages[s - 1]
                if head:
                    held = self._swap(len(net.stages), held)
                    W = held.params["head.W"].reshape(self.spec.classes, net.features)
                    value = (W[u.map] @ h.reshape(net.features, B)) + held.params["head.b"][u.map]
                    dy = xp.broadcast_to(W[u.map][:, None], (net.features, B)).reshape(h.shape).copy()
                    del W
                    held = self._swap(s - 1, held)
                    dx, _ = st.backward(held.params, ctxs[-1], dy, need_dx=True)
                else:
                    a = h if part == "output" else ctxs[-1][ACTIVATION_KEY[part]]
                    value = a[u.y, u.x, u.map, :]
                    dy = xp.zeros(a.shape, dtype=a.dtype)
                    dy[u.y, u.x, u.map, :] = 1
                    if part == "output":
                        dx, _ = st.backward(held.params, ctxs[-1], dy, need_dx=True)
                    else:
                        # a filter or pool layer exists only where the stage has that part
                        assert st.filter is not None and (part != "pool" or st.pool is not None)
                        dz = st.pool.backward(ctxs[-1]["pool"], dy) if st.pool is not None and part == "pool" else dy
                        dx, _ = st.filter.backward(held.params[f"{st.name}.W1"], ctxs[-1]["P"], dz, need_dx=True)
                for i in range(s - 2, -1, -1):
                    held = self._swap(i, held)
                    dx, _ = net.stages[i].backward(held.params, ctxs[i], dx, need_dx=True)
                # copies: the layers reuse their buffers once the lock is released
                return (
                    np.array(nnbackend.to_numpy(value), np.float64),
                    np.array(nnbackend.to_numpy(to_external(xp, dx)), np.float64),
                )
            finally:
                self._release(held)

    def input_gradient(self, x_bchw: np.ndarray, u: Unit) -> tuple[np.ndarray, np.ndarray]:
        return self._value_and_input_grad(self._check_input(np.asarray(x_bchw)), u)

    def optimal_stimulus(self, u: Unit, settings: StimulusSettings = DEFAULT_STIMULUS, n_random: int = 64) -> dict:
        """Maximise the unit's activation over inputs with ||x||_2 = ``settings.norm``.

        Projected gradient ascent from ``settings.restarts`` random points at
        once: each step moves ``learning_rate * norm`` along the normalised
        gradient, then projects back onto the sphere. Returns the best input
        (C, H, W), its activation and the activations of ``n_random`` random
        inputs of the same norm.
        """
        steps, restarts, norm = settings.steps, settings.restarts, settings.norm
        self.flat_index(u)
        rng = np.random.default_rng(settings.seed)
        shape = (restarts,) + tuple(self.spec.input)

        def project(z):
            n = np.sqrt((z.reshape(len(z), -1) ** 2).sum(1))
            return z / np.maximum(n, 1e-12)[:, None, None, None] * norm

        rand = project(rng.standard_normal((n_random,) + tuple(self.spec.input)))
        base = self.activations(rand.astype(np.float32), [u])[:, 0].astype(np.float64)
        # start from the best random points: cheaper than ascending from the worst
        x = rand[np.argsort(-base)[:restarts]] if restarts <= n_random else project(rng.standard_normal(shape))
        best_x, best_v = x[0].copy(), -np.inf
        step = settings.learning_rate * norm
        for _ in range(max(steps, 0) + 1):
            cancel.check()  # a query whose caller is gone stops here, not thousands of steps later
            v, g = self._value_and_input_grad(x.astype(np.float32), u)
            i = int(np.argmax(v))
            if v[i] > best_v:
                best_v, best_x = float(v[i]), x[i].copy()
            gn = np.sqrt((g.reshape(len(g), -1) ** 2).sum(1))
            x = project(x + step * g / np.maximum(gn, 1e-20)[:, None, None, None])
        return {
            "stimulus": best_x.astype(np.float32),
            "activation": best_v,
            "random_mean": float(base.mean()),
            "random_max": float(base.max()),
            "random": base,
        }

    def top_inputs(self, x_bchw: np.ndarray, u: Unit, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices (into x) and activations of the k inputs that excite the unit most, best first."""
        a = self.activations(x_bchw, [u])[:, 0]
        order = np.argsort(-a, kind="stable")[:k]
        return order, a[order]
