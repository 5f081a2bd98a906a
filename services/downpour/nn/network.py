"""Stages, the network built from a spec, and its two objectives.

Parameters are named flat blocks (``stage1.W1``, ``stage1.W2``, ...,
``head.W``, ``head.b``): 1-D arrays that the parameter server shards, pulls
and pushes as they are. Layers see them reshaped, never copied.

Objectives, each returning (loss, grads by block name, info):

* ``tica``: reconstruction TICA per stage (Le et al. 2012), summed over the
  stages:

      sum_s  mean_i ||W2_s W1_s^T x_si - x_si||^2
             + lam_s * mean_i sum_j sqrt(eps + H_j (W1_s^T x_si)^2)

  with x_s the stage's input and H the fixed L2-pooling neighbourhoods. W1_s
  and W2_s are the stage's effective weights (``nn.constraint``: free, unit
  decoder columns, unit encoder rows, or W2 = W1^T). With ``training:
  joint`` the sum is differentiated as one function (a stage's weights also
  get the gradient of the stages above it); ``layerwise`` stops the gradient
  at each stage's input, so each stage learns from its own terms alone.
* ``supervised``: softmax cross-entropy of a linear head over the last
  stage, back-propagated through every stage (fine-tuning).

Inputs at this boundary are (B, C, H, W), the usual image batch layout;
inside, activations are (H, W, C, B) (see ``filtering``).
"""

from __future__ import annotations

from types import ModuleType

import numpy

from . import constraint, init
from .filtering import LocalFilter
from .lcn import LCN
from .pooling import Pool
from .spec import NetworkSpec, StageSpec


def to_internal(xp: ModuleType, x):
    """(B, C, H, W) -> contiguous (H, W, C, B)."""
    return xp.ascontiguousarray(x.transpose(2, 3, 1, 0))


def to_external(xp: ModuleType, x):
    """(H, W, C, B) -> (B, C, H, W)."""
    return xp.ascontiguousarray(x.transpose(3, 2, 0, 1))


def softmax_cross_entropy(xp: ModuleType, logits, y):
    """Batch-mean cross-entropy of (classes, B) logits against labels y, and its gradient."""
    B = logits.shape[1]
    e = xp.exp(logits - logits.max(axis=0, keepdims=True))  # shifted: no overflow
    prob = e / e.sum(axis=0, keepdims=True)
    cols = xp.arange(B)
    loss = float(-xp.log(prob[y, cols] + 1e-30).mean())
    dlog = prob
    dlog[y, cols] -= 1
    dlog /= B
    return loss, dlog


TERMS = ("reconstruction", "sparsity")  # a stage's two TICA terms, ``stageN.<term>`` in info


def is_term(key: str) -> bool:
    """Whether an info key is a loss term (additive over examples and partitions) rather than a
    watched statistic of the weights or units."""
    return key.rsplit(".", 1)[-1] in TERMS


# A pooled unit is "near zero" on an input below this fraction of the stage's mean pooled
# response, and "on" above the mean; dead: near zero on most inputs; dense (not sparse): on
# for most. "Most" is this fraction of the batch.
NEAR_ZERO = 0.1
MOST = 0.9


def pooled_activity(xp: ModuleType, h, prefix: str) -> dict[str, float]:
    """Fractions of the pooled units (H, W, M) of ``h`` (H, W, M, B) that are dead and dense on this batch."""
    mean = h.mean()
    B = h.shape[-1]
    dead = ((h < NEAR_ZERO * mean).sum(axis=-1) >= MOST * B).mean()
    dense = ((h > mean).sum(axis=-1) >= MOST * B).mean()
    return {f"{prefix}.dead": float(dead), f"{prefix}.dense": float(dense)}


class Stage:
    """filter -> pool -> LCN on (H, W, C, B) activations, each part optional."""

    def __init__(self, index: int, spec: StageSpec, in_shape: tuple[int, int, int], xp: ModuleType):
        self.index, self.spec, self.xp = index, spec, xp
        self.name = f"stage{index}"
        self.in_shape = in_shape
        shape = in_shape
        self.filter = self.pool = self.lcn = self.sparsity_pool = None
        if spec.filter is not None:
            f = spec.filter
            self.filter = LocalFilter(shape, f.maps, f.field, f.stride, f.tied, xp=xp)
            shape = self.filter.out_shape
        if spec.pool is not None:
            p = spec.pool
            self.pool = Pool(shape, p.size, p.stride, p.kind, p.eps, xp=xp)
            shape = self.pool.out_shape
        if spec.lcn is not None:
            self.lcn = LCN(shape, spec.lcn.size, spec.lcn.sigma, spec.lcn.eps, xp=xp)
        self.out_shape = shape
        # TICA's sparsity is L2 pooling of the filter responses; reuse the
        # stage's pool when it is L2, else pool the responses separately.
        if self.filter is not None and spec.lam > 0:
            if self.pool is not None and self.pool.kind == "l2":
                self.sparsity_pool = self.pool
            else:
                size = spec.pool.size if spec.pool else 1
                stride = spec.pool.stride if spec.pool else 1
                eps = spec.pool.eps if spec.pool else 1e-2
                self.sparsity_pool = Pool(self.filter.out_shape, size, stride, "l2", eps, xp=xp)

    @property
    def has_tica(self) -> bool:
        return self.filter is not None

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        if self.filter is None:
            return {}
        shapes: dict[str, tuple[int, ...]] = {f"{self.name}.W1": self.filter.weight_shape}
        if constraint.has_decoder_block(self.spec.constraint):
            shapes[f"{self.name}.W2"] = self.filter.decoder_shape
        return shapes

    def encoder(self, params) -> constraint.Weights:
        """The encoder this stage computes with (``nn.constraint``), from its stored block."""
        assert self.filter is not None, f"{self.name} has no filter"
        return constraint.encoder(self.spec.constraint, self.xp, params[f"{self.name}.W1"], self.filter.weight_shape)

    def weights(self, params) -> constraint.Weights:
        """Effective encoder and decoder: what the stage's TICA terms use."""
        w = self.encoder(params)
        assert self.filter is not None
        return constraint.with_decoder(w, self.xp, params.get(f"{self.name}.W2"), self.filter.decoder_shape)

    def forward(self, params, x):
        """Returns (output, context). Context holds what backward needs."""
        ctx = {"x": x}
        h = x
        if self.filter is not None:
            w = self.encoder(params)
            h, ctx["P"] = self.filter.forward(w.w1, h)
            ctx["z"], ctx["w"] = h, w
        if self.pool is not None:
            h, ctx["pool"] = self.pool.forward(h)
            ctx["h"] = h
        if self.lcn is not None:
            h, ctx["lcn"] = self.lcn.forward(h)
        return h, ctx

    def tica_terms(self, params, ctx):
        """(reconstruction, sparsity) losses, batch means, plus what their gradients need."""
        xp = self.xp
        x, z = ctx["x"], ctx["z"]
        B = x.shape[3]
        w = constraint.with_decoder(ctx["w"], xp, params.get(f"{self.name}.W2"), self.filter.decoder_shape)
        err = self.filter.decode(w.w2, z) - x
        rec = float(xp.vdot(err.ravel(), err.ravel())) / B
        if self.sparsity_pool is None:  # lam == 0: reconstruction only
            return rec, 0.0, (err, None, None)
        if self.sparsity_pool is self.pool:
            sp_out, sp_ctx = ctx["h"], ctx["pool"]
        else:
            sp_out, sp_ctx = self.sparsity_pool.forward(z)
        sparsity = self.spec.lam * float(sp_out.sum()) / B
        return rec, sparsity, (err, sp_ctx, sp_out)

    def watch(self, ctx, tica) -> dict[str, float]:
        """What a run records of this stage besides its two terms: the effective weights' norms
        and the pooled units that are dead or not sparse (``pooled_activity``)."""
        out = constraint.norm_stats(self.xp, ctx["w"], self.name)
        if tica is not None and tica[2] is not None:
            out.update(pooled_activity(self.xp, tica[2], self.name))
        return out

    def backward(self, params, ctx, dy, tica=None, need_dx=True):
        """Gradients given dL/d(output) ``dy`` (or None) and optional TICA terms.

        Returns (dx or None, grads by block name).
        """
        xp = self.xp
        grads = {}
        B = ctx["x"].shape[3]
        dh = dy
        if self.lcn is not None and dh is not None:
            dh = self.lcn.backward(ctx["lcn"], dh)
        dz = None
        if self.pool is not None and dh is not None:
            dz = self.pool.backward(ctx["pool"], dh)
        elif dh is not None:
            dz = dh
        if self.filter is None:
            return dz, grads
        w = ctx["w"]
        dx_direct = dW2 = None
        if tica is not None:
            err, sp_ctx, sp_out = tica
            if sp_ctx is not None:
                g_sp = self.sparsity_pool.backward(sp_ctx, xp.full(sp_out.shape, self.spec.lam / B, dtype=sp_out.dtype))
                dz = g_sp if dz is None else dz + g_sp
            dr = err * (2.0 / B)
            dz_rec, dW2 = self.filter.decode_backward(w.w2, ctx["z"], dr)
            dz = dz_rec if dz is None else dz + dz_rec
            dx_direct = -dr  # err = r - x: the stage input enters its own reconstruction error
        if dz is None:
            dz = xp.zeros(ctx["z"].shape, dtype=ctx["z"].dtype)
        dx, dW1 = self.filter.backward(w.w1, ctx["P"], dz, need_dx=need_dx)
        dW1, dW2 = constraint.pullback(xp, w, dW1, dW2)
        grads[f"{self.name}.W1"] = dW1.reshape(-1)
        if dW2 is not None:
            grads[f"{self.name}.W2"] = dW2.reshape(-1)
        if need_dx and dx_direct is not None:
            dx += dx_direct
        return dx, grads


class Network:
    """A stack of stages and an optional softmax head, built from a NetworkSpec."""

    def __init__(self, spec: NetworkSpec, xp: ModuleType = numpy, dtype=numpy.float32):
        self.spec, self.xp, self.dtype = spec, xp, numpy.dtype(dtype)
        self.stages: list[Stage] = []
        shape = spec.input
        for i, st in enumerate(spec.stages, 1):
            stage = Stage(i, st, shape, xp)
            self.stages.append(stage)
            shape = stage.out_shape
        self.out_shape = shape
        self.features = int(numpy.prod(shape))

    # parameters ---------------------------------------------------------------
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for st in self.stages:
            shapes.update(st.param_shapes())
        if self.spec.classes:
            shapes["head.W"] = (self.spec.classes, self.features)
            shapes["head.b"] = (self.spec.classes,)
        return shapes

    def block_sizes(self) -> dict[str, int]:
        return {k: int(numpy.prod(s)) for k, s in self.param_shapes().items()}

    def init_params(self, seed: int = 0) -> dict[str, object]:
        """Random initial blocks (flat, ``dtype``), reproducible from ``seed``.

        The values are the ones each parameter shard draws for its blocks (``nn.init``):
        an in-process run and a cluster run of the same job start from the same parameters.
        """
        return {
            k: self.xp.asarray(init.values(lay, seed).astype(self.dtype, copy=False))
            for k, lay in init.layouts(self).items()
        }

    def encoder_names(self, upto: int | None = None) -> list[str]:
        """The blocks inference reads (``forward``): the encoders of stages[:upto], and the head
        when ``upto`` is None. The decoders are for training only."""
        names = [f"{st.name}.W1" for st in self.stages[:upto] if st.filter is not None]
        if self.spec.classes and upto is None:
            names += ["head.W", "head.b"]
        return names

    def _views(self, params, names=None):
        shapes = self.param_shapes()
        if names is not None:
            shapes = {k: shapes[k] for k in names}
        missing = [k for k in shapes if k not in params]
        if missing:
            raise KeyError(f"missing parameter block(s): {', '.join(missing)}")
        for k, s in shapes.items():
            if params[k].size != int(numpy.prod(s)):
                raise ValueError(
                    f"block {k!r} has {params[k].size} values; expected {int(numpy.prod(s))} for shape {s}"
                )
        return params

    def _input(self, x):
        c, h, w = self.spec.input
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
            raise ValueError(f"input batch must have shape (B, {c}, {h}, {w}), got {tuple(x.shape)}")
        return to_internal(self.xp, self.xp.asarray(x, dtype=self.dtype))

    # inference ----------------------------------------------------------------
    def forward(self, params, x, upto: int | None = None):
        """Every stage's output for a (B, C, H, W) batch, as (B, C, H, W) arrays.

        Returns a dict: ``stageN.filter``, ``stageN.pool``, ``stageN.output``
        (and ``head.logits`` when there is a head): the layers a neuron can be read from.
        """
        params = self._views(params, self.encoder_names(upto))
        h = self._input(x)
        acts = {}
        for st in self.stages[:upto]:
            h, ctx = st.forward(params, h)
            if "z" in ctx:
                acts[f"{st.name}.filter"] = to_external(self.xp, ctx["z"])
            if "h" in ctx:
                acts[f"{st.name}.pool"] = to_external(self.xp, ctx["h"])
            acts[f"{st.name}.output"] = to_external(self.xp, h)
        if self.spec.classes and upto is None:
            acts["head.logits"] = self._logits(params, h).T.copy()
        return acts

    def _logits(self, params, h):
        B = h.shape[3]
        W = params["head.W"].reshape(self.spec.classes, self.features)
        return W @ h.reshape(self.features, B) + params["head.b"][:, None]

    # objectives ---------------------------------------------------------------
    def tica(self, params, x):
        """Reconstruction TICA over every stage with a filter: (loss, grads, info)."""
        params = self._views(params)
        h = self._input(x)
        ctxs, terms, info = [], [], {}
        loss = 0.0
        for st in self.stages:
            h, ctx = st.forward(params, h)
            ctxs.append(ctx)
            t = None
            if st.has_tica:
                rec, sp, t = st.tica_terms(params, ctx)
                info[f"{st.name}.reconstruction"] = rec
                info[f"{st.name}.sparsity"] = sp
                loss += rec + sp
            terms.append(t)
        for st, ctx, t in zip(self.stages, ctxs, terms):
            if st.has_tica:
                info.update(st.watch(ctx, t))
        grads: dict = {}
        dy = None
        joint = self.spec.training == "joint"
        for i in range(len(self.stages) - 1, -1, -1):
            st = self.stages[i]
            # layerwise: no gradient leaves a stage through its input (nor its target)
            dy, g = st.backward(params, ctxs[i], dy, tica=terms[i], need_dx=joint and i > 0)
            grads.update(g)
        return loss, grads, info

    def supervised(self, params, x, y):
        """Softmax cross-entropy (batch mean) of the head: (loss, grads, info)."""
        if not self.spec.classes:
            raise ValueError("this network has no head: set classes > 0 for supervised training")
        xp = self.xp
        params = self._views(params)
        y = xp.asarray(y).astype(numpy.int64).reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{x.shape[0]} examples but {y.shape[0]} labels")
        if y.size and (int(y.min()) < 0 or int(y.max()) >= self.spec.classes):
            raise ValueError(f"labels must be in 0..{self.spec.classes - 1}")
        h = self._input(x)
        ctxs = []
        for st in self.stages:
            h, ctx = st.forward(params, h)
            ctxs.append(ctx)
        B = h.shape[3]
        logits = self._logits(params, h)  # (classes, B)
        loss, dlog = softmax_cross_entropy(xp, logits, y)
        feats = h.reshape(self.features, B)
        W = params["head.W"].reshape(self.spec.classes, self.features)
        grads = {"head.W": (dlog @ feats.T).reshape(-1), "head.b": dlog.sum(axis=1)}
        dy = (W.T @ dlog).reshape(h.shape)
        for i in range(len(self.stages) - 1, -1, -1):
            dy, g = self.stages[i].backward(params, ctxs[i], dy, need_dx=i > 0)
            grads.update(g)
        accuracy = float((logits.argmax(axis=0) == y).mean())
        return loss, grads, {"accuracy": accuracy}
