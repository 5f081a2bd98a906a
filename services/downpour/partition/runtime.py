"""One partition's forward and backward, with every dependency on another
partition an explicit message.

``PartitionRuntime.tica`` (and ``supervised``) are generators: at every
synchronisation point they yield an ``Exchange`` (the ``Halo`` messages this
partition sends, and which partitions it expects one message from) and are
resumed with the list of messages addressed to it. Every partition of a
replica yields the same sequence of exchanges, so they can run in lockstep:
``LocalReplica`` does that in one process (tests, benchmarks), and the worker
carries the same messages over its ``Exchange`` stream. Messages are numpy
arrays and ints, field for field the ``Halo`` proto: ``layer`` is the plan's
tag (layer index * len(KINDS) + kind, see ``PartitionPlan.untag``); halo
tensors are (batch, y1 - y0, x1 - x0, maps) over the region in the layer's
global coordinates; reductions use region (0, 1, 0, 1) and (batch or 1, 1, 1, n).

What crosses partitions, per stage:

* filter: the input halo (forward), the decoder's partial reconstructions of
  pixels owned elsewhere (summed by the owner, which alone computes that
  pixel's error), the reconstruction-error gradient halo the decoders read,
  and the input gradient of the halo (summed by the owner);
* pool and LCN: activation halos and their gradients (per sub-layer or once
  per stage, as the plan's ``halo`` says);
* LCN: the spatial mean c of sigma over the whole map is an all-reduce of
  per-example partial sums, and so is its gradient;
* tied stages: the weight-gradient shares, summed on partition 0;
* head: partial logits, all-reduced.

Each loss term is counted once, by the owner of the pixel or location.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace

import numpy

from downpour.nn.backend import to_numpy
from downpour.nn.filtering import LocalFilter
from downpour.nn.lcn import gaussian_1d
from downpour.nn.network import softmax_cross_entropy, to_external, to_internal
from downpour.nn.pooling import Pool

from .plan import KINDS, PartitionPlan, Region, crop, grow, intersect, size

FORWARD, BACKWARD = 1, 2  # HaloDirection values
HALO_KINDS = ("act", "v", "recon", "drecon")  # spatial halos; the rest are reductions
_ONE: Region = (0, 1, 0, 1)


@dataclass
class Halo:
    """One message: the ``Halo`` proto's fields, the tensor as a numpy array."""

    generation: int
    replica: int
    from_partition: int
    to_partition: int
    step: int
    layer: int  # PartitionPlan.tag(layer, kind)
    direction: int  # FORWARD or BACKWARD
    y0: int
    x0: int
    y1: int
    x1: int
    tensor: numpy.ndarray

    @property
    def region(self) -> Region:
        return (self.y0, self.y1, self.x0, self.x1)


@dataclass
class Exchange:
    """A synchronisation point: send ``send``, then receive one message from each of ``expect``."""

    tag: int
    direction: int
    send: list[Halo]
    expect: list[int]


@dataclass
class PartitionResult:
    loss: float  # this partition's share
    info: dict
    grads: dict  # by block: the blocks this partition pushes
    acts: dict  # layer name -> this partition's tile, (h, w, C, B)
    dx: object = None  # the input tile's gradient (h, w, C, B), when asked for


class _TileLCN:
    """The LCN of ``downpour.nn.lcn`` evaluated on regions of the global map."""

    def __init__(self, lcn, xp: ModuleType):
        self.xp, self.C, self.H, self.W, self.eps = xp, lcn.C, lcn.H, lcn.W, lcn.eps
        self.size, self.r = lcn.size, lcn.size // 2
        g = gaussian_1d(lcn.size, lcn.sigma)
        self.g = [float(v) for v in g]
        nh, nw = _inside(g, self.H), _inside(g, self.W)
        self._inv_full = (1.0 / numpy.outer(nh, nw))[:, :, None]
        self._inv: dict = {}

    def grow(self, r: Region, by: int = 1) -> Region:
        return grow(r, by * self.r, self.H, self.W)

    def inv(self, r: Region, dtype):
        key = (r, numpy.dtype(dtype).str)
        out = self._inv.get(key)
        if out is None:
            out = self.xp.asarray(crop(self._inv_full, (0, self.H, 0, self.W), r).astype(dtype))
            self._inv[key] = out
        return out

    def blur(self, u, ru: Region, rout: Region):
        """The zero-padded Gaussian over ``rout`` of u (h, w, B) given on ``ru`` (zero elsewhere)."""
        xp, r = self.xp, self.r
        h, w = size(rout)
        rb = (rout[0] - r, rout[1] + r, rout[2] - r, rout[3] + r)
        buf = xp.zeros((h + 2 * r, w + 2 * r, u.shape[2]), dtype=u.dtype)
        ov = intersect(ru, rb)
        if ov is not None:
            crop(buf, rb, ov)[...] = crop(u, ru, ov)
        t = buf[0:h] * self.g[0]
        for i in range(1, self.size):
            t += buf[i:i + h] * self.g[i]
        out = t[:, 0:w] * self.g[0]
        for i in range(1, self.size):
            out += t[:, i:i + w] * self.g[i]
        return out

    def G(self, x, rx: Region, rout: Region):
        """Weighted mean over window and maps, on ``rout``, of x (h, w, C, B) given on ``rx``."""
        return self.blur(x.sum(axis=2) * (1.0 / self.C), rx, rout) * self.inv(rout, x.dtype)

    def GT(self, u, ru: Region):
        """Adjoint of G for u (h, w, B) on ``ru``: (h', w', 1, B) on ``ru`` grown by r."""
        rout = self.grow(ru)
        return (self.blur(u * self.inv(ru, u.dtype), ru, rout) * (1.0 / self.C))[:, :, None, :], rout


def _inside(g: numpy.ndarray, n: int) -> numpy.ndarray:
    r = len(g) // 2
    return numpy.array([sum(g[t] for t in range(len(g)) if 0 <= i + t - r < n) for i in range(n)])


class PartitionRuntime:
    """Partition ``partition`` of one replica: its layers' compute on its tiles."""

    def __init__(self, plan: PartitionPlan, partition: int, xp: ModuleType = numpy, dtype=numpy.float32,
                 replica: int = 0, generation: int = 0):
        if not 0 <= partition < plan.partitions:
            raise ValueError(f"partition={partition} is out of range; allowed: 0..{plan.partitions - 1}")
        self.plan, self.p, self.xp, self.dtype = plan, partition, xp, numpy.dtype(dtype)
        self.replica, self.generation = replica, generation
        self.step = 0
        self._stages = [self._build(st, sl) for st, sl in zip(plan.network.stages, plan.stages)]

    # construction -------------------------------------------------------------
    def _build(self, st, sl):
        pl, p, xp = self.plan, self.p, self.xp
        b = SimpleNamespace(st=st, sl=sl, filt=None, pool=None, sp=None, lcn=None)
        if st.filter is not None:
            f = st.filter
            b.R_a = pl.need(sl.input, "act", p)
            b.filt = LocalFilter((pl.layers[sl.input].shape[0], *size(b.R_a)), f.M, f.k, f.s, f.tied, xp=xp)
        below = sl.below_pool
        b.zkey = pl.reads_below[st.index - 1]
        b.R_z = pl.need(below, "act", p) if b.zkey else pl.tile(below, p)
        cz = pl.layers[below].shape[0]
        if st.lcn is not None:
            b.lcn = _TileLCN(st.lcn, xp)
            b.T_n = pl.tile(sl.lcn, p)
            b.R_v = b.lcn.grow(b.T_n)
        if st.pool is not None:
            q = st.pool
            b.T_p = pl.tile(sl.pool, p)
            b.R_pout = b.lcn.grow(b.T_p, 2) if (pl.halo == "stage" and b.lcn is not None) else b.T_p
            b.pool = Pool((cz, *size(b.R_z)), q.p, q.s, q.kind, q.eps, xp=xp)
            assert (b.pool.Ho, b.pool.Wo) == size(b.R_pout)
        if st.sparsity_pool is not None and st.sparsity_pool is not st.pool:
            q = st.sparsity_pool
            t = pl.tile(sl.pool if sl.pool is not None else sl.filter, p)
            b.R_sp = (t[0] * q.s, (t[1] - 1) * q.s + q.p, t[2] * q.s, (t[3] - 1) * q.s + q.p)
            b.sp = Pool((cz, *size(b.R_sp)), q.p, q.s, "l2", q.eps, xp=xp)
        return b

    # messages -----------------------------------------------------------------
    def _halo(self, to: int, tag: int, direction: int, r: Region, tensor) -> Halo:
        return Halo(self.generation, self.replica, self.p, to, self.step, tag, direction,
                    r[0], r[2], r[1], r[3], tensor)

    @staticmethod
    def _wire(a):
        """(h, w, C, B) -> numpy (B, h, w, C)."""
        return to_numpy(a.transpose(3, 0, 1, 2).copy())

    def _unwire(self, t):
        return self.xp.asarray(t).transpose(1, 2, 3, 0)

    def _receive(self, inbox, tag: int, direction: int, expect: list[int]) -> list[Halo]:
        inbox = sorted(inbox or [], key=lambda m: m.from_partition)
        got = [m.from_partition for m in inbox]
        if got != sorted(expect):
            raise ValueError(f"partition {self.p}: exchange {self.plan.untag(tag)} expected messages from "
                             f"{sorted(expect)}, got {got}")
        for m in inbox:
            if (m.layer, m.direction, m.to_partition, m.step) != (tag, direction, self.p, self.step):
                raise ValueError(f"partition {self.p}: message from {m.from_partition} is for layer tag "
                                 f"{m.layer} direction {m.direction} partition {m.to_partition} step {m.step}; "
                                 f"expected {tag}, {direction}, {self.p}, {self.step}")
        return inbox

    def _fetch(self, layer: int, kind: str, own, direction: int, need_kind: str = "act"):
        """``layer`` over this partition's need region: its own tile plus halos."""
        pl, p, xp = self.plan, self.p, self.xp
        T, R = pl.tile(layer, p), pl.need(layer, need_kind, p)
        if not pl.exchanged(layer, need_kind):
            return crop(own, T, R)
        tag = pl.tag(layer, kind)
        send = [self._halo(q, tag, direction, ov, self._wire(crop(own, T, ov)))
                for q, ov in pl.sinks(layer, need_kind, p) if q != p]
        expect = [q for q, _ in pl.sources(layer, need_kind, p) if q != p]
        inbox = yield Exchange(tag, direction, send, expect)
        out = xp.empty((*size(R), *own.shape[2:]), dtype=own.dtype)
        ov = intersect(R, T)
        if ov is not None:
            crop(out, R, ov)[...] = crop(own, T, ov)
        for m in self._receive(inbox, tag, direction, expect):
            if m.region != intersect(R, pl.tile(layer, m.from_partition)):
                raise ValueError(f"partition {self.p}: halo from {m.from_partition} covers {m.region}")
            crop(out, R, m.region)[...] = self._unwire(m.tensor)
        return out

    def _scatter(self, layer: int, kind: str, arr, direction: int, need_kind: str = "act"):
        """Sum partial values over the need region into their owners' tiles; returns this tile's sum."""
        pl, p, xp = self.plan, self.p, self.xp
        T, R = pl.tile(layer, p), pl.need(layer, need_kind, p)
        out = xp.zeros((*size(T), *arr.shape[2:]), dtype=arr.dtype)
        ov = intersect(R, T)
        if ov is not None:
            crop(out, T, ov)[...] += crop(arr, R, ov)
        if not pl.exchanged(layer, need_kind):
            return out
        tag = pl.tag(layer, kind)
        send = [self._halo(q, tag, direction, ov, self._wire(crop(arr, R, ov)))
                for q, ov in pl.sources(layer, need_kind, p) if q != p]
        expect = [q for q, _ in pl.sinks(layer, need_kind, p) if q != p]
        inbox = yield Exchange(tag, direction, send, expect)
        for m in self._receive(inbox, tag, direction, expect):
            if m.region != intersect(T, pl.need(layer, need_kind, m.from_partition)):
                raise ValueError(f"partition {self.p}: partial sum from {m.from_partition} covers {m.region}")
            crop(out, T, m.region)[...] += self._unwire(m.tensor)
        return out

    def _allreduce(self, layer: int, kind: str, part, direction: int):
        """Sum of ``part`` (B,) or (B, n) over all partitions, in partition order (the same bits everywhere)."""
        n = self.plan.partitions
        if n == 1:
            return part
        tag = self.plan.tag(layer, kind)
        wire = to_numpy(part).reshape(part.shape[0], 1, 1, -1)
        others = [q for q in range(n) if q != self.p]
        inbox = yield Exchange(tag, direction, [self._halo(q, tag, direction, _ONE, wire) for q in others], others)
        parts = {self.p: part}
        for m in self._receive(inbox, tag, direction, others):
            parts[m.from_partition] = self.xp.asarray(m.tensor).reshape(part.shape)
        total = parts[0].copy()
        for q in range(1, n):
            total += parts[q]
        return total

    def _reduce0(self, layer: int, kind: str, part):
        """Sum of the flat ``part`` over partitions, on partition 0 (None elsewhere)."""
        n = self.plan.partitions
        if n == 1:
            return part
        tag = self.plan.tag(layer, kind)
        if self.p != 0:
            yield Exchange(tag, BACKWARD, [self._halo(0, tag, BACKWARD, _ONE, to_numpy(part).reshape(1, 1, 1, -1))], [])
            return None
        others = list(range(1, n))
        inbox = yield Exchange(tag, BACKWARD, [], others)
        total = part.copy()
        for m in self._receive(inbox, tag, BACKWARD, others):
            total += self.xp.asarray(m.tensor).reshape(part.shape)
        return total

    # LCN on a tile ------------------------------------------------------------
    def _lcn_forward(self, b, x_reg, R_x):
        """LCN of this tile from its input over R_x (the tile grown by r, or by 2r)."""
        L, T, R_v, sl = b.lcn, b.T_n, b.R_v, b.sl
        if self.plan.halo == "layer":  # R_x is the tile grown by r: v needs a halo of its own
            m = L.G(x_reg, R_x, T)
            v_t = crop(x_reg, R_x, T) - m[:, :, None, :]
            v = yield from self._fetch(sl.lcn, "v", v_t, FORWARD, need_kind="v")
        else:
            m = L.G(x_reg, R_x, R_v)
            v = crop(x_reg, R_x, R_v) - m[:, :, None, :]
        xp = self.xp
        sigma = xp.sqrt(xp.maximum(L.G(v * v, R_v, T), 0))
        c = (yield from self._allreduce(sl.lcn, "sum", sigma.sum(axis=(0, 1)), FORWARD)) * (1.0 / (L.H * L.W))
        d = xp.maximum(sigma, c[None, None, :])
        d = xp.maximum(d, L.eps)
        y = crop(v, R_v, T) / d[:, :, None, :]
        return y, (v, sigma, c, d)

    def _lcn_backward(self, b, ctx, dy):
        """Gradient of the LCN input over the region forward read it from (R_x)."""
        xp, L, T, R_v, sl = self.xp, b.lcn, b.T_n, b.R_v, b.sl
        v, sigma, c, d = ctx
        v_t = crop(v, R_v, T)
        inv_d = 1.0 / d
        dv_t = dy * inv_d[:, :, None, :]
        dd = -(dy * v_t).sum(axis=2) * inv_d * inv_d
        use_sigma = (sigma >= c[None, None, :]) & (sigma >= L.eps)
        use_c = (~use_sigma) & (c[None, None, :] >= L.eps)
        dsigma = xp.where(use_sigma, dd, 0)
        dc = yield from self._allreduce(sl.lcn, "sum", xp.where(use_c, dd, 0).sum(axis=(0, 1)), BACKWARD)
        dsigma = dsigma + dc[None, None, :] * (1.0 / (L.H * L.W))
        safe = xp.where(sigma > 0, sigma, 1)
        gq, _ = L.GT(xp.where(sigma > 0, dsigma / (2 * safe), 0), T)  # over R_v
        dv = 2 * v * gq
        crop(dv, R_v, T)[...] += dv_t
        if self.plan.halo == "layer":
            dv = yield from self._scatter(sl.lcn, "v", dv, BACKWARD, need_kind="v")
            g, R_x = L.GT(dv.sum(axis=2), T)
            dx = xp.empty((*g.shape[:2], L.C, g.shape[3]), dtype=g.dtype)
            dx[...] = -g
            crop(dx, R_x, T)[...] += dv
        else:
            g, R_x = L.GT(dv.sum(axis=2), R_v)
            dx = xp.empty((*g.shape[:2], L.C, g.shape[3]), dtype=g.dtype)
            dx[...] = -g
            crop(dx, R_x, R_v)[...] += dv
        return dx

    # stages -------------------------------------------------------------------
    def _stage_forward(self, b, blocks, a, tica: bool, acts: dict):
        pl, p, st, sl, xp = self.plan, self.p, b.st, b.sl, self.xp
        ctx = {"a": a}
        h = a
        rec = sparsity = 0.0
        B = a.shape[3]
        if b.filt is not None:
            a_reg = yield from self._fetch(sl.input, "act", a, FORWARD)
            z, _ = b.filt.forward(blocks[self._name(st, "W1")], a_reg)
            ctx.update(a_reg=a_reg, z=z)
            acts[pl.layers[sl.filter].name] = z
            h = z
            if tica:
                r_reg = b.filt.decode(blocks[self._name(st, "W2")], z)
                r = yield from self._scatter(sl.input, "recon", r_reg, FORWARD)
                err = r - a
                rec = float(xp.vdot(err.ravel(), err.ravel())) / B
                ctx["err"] = err
        below = sl.below_pool
        if b.zkey:
            z_reg = yield from self._fetch(below, "act", h, FORWARD)
        else:
            z_reg = h
        ctx["z_reg"] = z_reg
        h_reg, R_h = z_reg, b.R_z
        if b.pool is not None:
            hp, ctx["pool"] = b.pool.forward(z_reg)
            ctx["hp"] = hp
            h_reg, R_h = hp, b.R_pout
            h = crop(hp, b.R_pout, b.T_p)
            acts[pl.layers[sl.pool].name] = h
        if b.lcn is not None:
            if pl.halo == "layer" and b.pool is not None:
                h_reg = yield from self._fetch(sl.pool, "act", h, FORWARD)
                R_h = pl.need(sl.pool, "act", p)
            h, ctx["lcn"] = yield from self._lcn_forward(b, h_reg, R_h)
            acts[pl.layers[sl.lcn].name] = h
        if tica and st.sparsity_pool is not None:
            if b.sp is None:  # the stage's own L2 pool
                sp_out = crop(ctx["hp"], b.R_pout, b.T_p)
            else:
                sp_out, ctx["sp"] = b.sp.forward(crop(z_reg, b.R_z, b.R_sp))
            sparsity = st.spec.lam * float(sp_out.sum()) / B
        return h, ctx, rec, sparsity

    def _stage_backward(self, b, blocks, ctx, dy, tica: bool, need_dx: bool):
        pl, st, sl, xp = self.plan, b.st, b.sl, self.xp
        grads = {}
        B = ctx["a"].shape[3]
        dz = None  # gradient of the layer below the pool, over R_z
        if dy is not None:
            if b.lcn is not None:
                dy = yield from self._lcn_backward(b, ctx["lcn"], dy)
                if pl.halo == "layer" and b.pool is not None:
                    dy = yield from self._scatter(sl.pool, "act", dy, BACKWARD)
            dz = b.pool.backward(ctx["pool"], dy) if b.pool is not None else dy
        if tica and st.sparsity_pool is not None:
            lam = st.spec.lam / B
            if b.sp is None:
                g = xp.zeros(ctx["hp"].shape, dtype=ctx["hp"].dtype)
                crop(g, b.R_pout, b.T_p)[...] = lam
                g_sp = b.pool.backward(ctx["pool"], g)
                dz = g_sp if dz is None else dz + g_sp
            else:
                sp_x = crop(ctx["z_reg"], b.R_z, b.R_sp)
                g_sp = b.sp.backward(ctx["sp"], xp.full((b.sp.Ho, b.sp.Wo, sp_x.shape[2], B), lam, dtype=sp_x.dtype))
                if dz is None:
                    dz = xp.zeros(ctx["z_reg"].shape, dtype=g_sp.dtype)
                crop(dz, b.R_z, b.R_sp)[...] += g_sp
        if dz is not None and b.zkey:
            dz = yield from self._scatter(sl.below_pool, "act", dz, BACKWARD)
        if b.filt is None:
            return dz, grads
        dr = None
        if tica:
            dr = ctx["err"] * (2.0 / B)
            dr_reg = yield from self._fetch(sl.input, "drecon", dr, BACKWARD)
            dz_rec, dW2 = b.filt.decode_backward(blocks[self._name(st, "W2")], ctx["z"], dr_reg)
            dz = dz_rec if dz is None else dz + dz_rec
            grads["W2"] = dW2.reshape(-1)
        if dz is None:
            dz = xp.zeros(ctx["z"].shape, dtype=ctx["z"].dtype)
        dx, dW1 = b.filt.backward(blocks[self._name(st, "W1")], ctx["a_reg"], dz, need_dx=need_dx)
        grads["W1"] = dW1.reshape(-1)
        if need_dx:
            dx = yield from self._scatter(sl.input, "act", dx, BACKWARD)
            if dr is not None:
                dx += -dr
        out = {}
        for w in ("W1", "W2"):
            if w not in grads:
                continue
            if st.filter.tied:
                total = yield from self._reduce0(sl.filter, "param" + w[1], grads[w])
                if total is not None:
                    out[f"{st.name}.{w}"] = total
            else:
                out[self.plan.block(f"{st.name}.{w}", self.p)] = grads[w]
        return dx, out

    def _name(self, st, w: str) -> str:
        name = f"{st.name}.{w}"
        return name if st.filter.tied else self.plan.block(name, self.p)

    # objectives ---------------------------------------------------------------
    def _forward_all(self, blocks, x, tica: bool):
        acts = {"input": x}
        ctxs, loss, info = [], 0.0, {}
        h = x
        for b in self._stages:
            h, ctx, rec, sp = yield from self._stage_forward(b, blocks, h, tica, acts)
            ctxs.append(ctx)
            if tica and b.filt is not None:
                info[f"{b.st.name}.reconstruction"] = rec
                info[f"{b.st.name}.sparsity"] = sp
                loss += rec + sp
        return h, ctxs, loss, info, acts

    def _backward_all(self, blocks, ctxs, dy, tica: bool, need_dx: bool, grads: dict):
        for i in range(len(self._stages) - 1, -1, -1):
            dy, g = yield from self._stage_backward(self._stages[i], blocks, ctxs[i], dy, tica, need_dx or i > 0)
            grads.update(g)
        return dy if need_dx else None

    def _tile_input(self, x):
        x = self.xp.asarray(x, dtype=self.dtype)
        want = (*size(self.plan.tile(0, self.p)), self.plan.spec.input[0])
        if x.ndim != 4 or tuple(x.shape[:3]) != want:
            raise ValueError(f"partition {self.p}: input tile must have shape {want} + (batch,), got {tuple(x.shape)}")
        return x

    def tica(self, blocks: dict, x, step: int = 0, need_dx: bool = False):
        """Generator: this partition's share of ``Network.tica`` on its input tile x (h, w, C, B).

        Yields ``Exchange``s, to be resumed with the messages addressed to this
        partition; returns a ``PartitionResult``.
        """
        self.step = step
        x = self._tile_input(x)
        _, ctxs, loss, info, acts = yield from self._forward_all(blocks, x, tica=True)
        grads: dict = {}
        dx = yield from self._backward_all(blocks, ctxs, None, True, need_dx, grads)
        return PartitionResult(loss, info, grads, acts, dx)

    def supervised(self, blocks: dict, x, y, step: int = 0, need_dx: bool = False):
        """Generator: this partition's share of ``Network.supervised`` (loss and accuracy on partition 0)."""
        pl, xp = self.plan, self.xp
        classes = pl.spec.classes
        if not classes:
            raise ValueError("this network has no head: set classes > 0 for supervised training")
        self.step = step
        x = self._tile_input(x)
        y = xp.asarray(y).astype(numpy.int64).reshape(-1)
        h, ctxs, _, _, acts = yield from self._forward_all(blocks, x, tica=False)
        B = h.shape[3]
        feats = h.reshape(-1, B)
        W = blocks[pl.block("head.W", self.p)].reshape(classes, -1)
        part = W @ feats
        if self.p == 0:
            part = part + blocks["head.b"][:, None]
        logits = (yield from self._allreduce(pl.stages[-1].output, "logits", part.T.copy(), FORWARD)).T
        loss, dlog = softmax_cross_entropy(xp, logits, y)
        grads = {pl.block("head.W", self.p): (dlog @ feats.T).reshape(-1)}
        info = {}
        if self.p == 0:
            grads["head.b"] = dlog.sum(axis=1)
            info["accuracy"] = float((logits.argmax(axis=0) == y).mean())
        else:
            loss = 0.0
        dy = (W.T @ dlog).reshape(h.shape)
        dx = yield from self._backward_all(blocks, ctxs, dy, False, need_dx, grads)
        acts["head.logits"] = logits
        return PartitionResult(loss, info, grads, acts, dx)


# ---------------------------------------------------------------- in-process driver

@dataclass
class ExchangeStats:
    """What one step sent between the partitions of a replica."""

    rounds: int = 0  # exchanges (synchronisation points)
    messages: int = 0
    bytes: dict = field(default_factory=dict)  # (direction, kind) -> bytes
    activation_bytes: int = 0  # every layer's activations of the batch, whole replica

    @property
    def halo_bytes(self) -> int:
        """Spatial halos and their gradients, both directions."""
        return sum(v for (_, k), v in self.bytes.items() if k in HALO_KINDS)

    @property
    def reduce_bytes(self) -> int:
        return sum(v for (_, k), v in self.bytes.items() if k not in HALO_KINDS)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def halo_fraction(self) -> float:
        """Halo bytes / activation bytes: how much of the activations crossed partitions."""
        return self.halo_bytes / self.activation_bytes if self.activation_bytes else 0.0


@dataclass
class ReplicaResult:
    loss: float
    grads: dict  # by block
    info: dict
    acts: dict  # layer name (and stageN.output) -> whole layer (B, C, H, W)
    dx: object  # (B, C, H, W) or None
    stats: ExchangeStats
    partitions: list  # the PartitionResults


class LocalReplica:
    """All partitions of one replica in one process, run in lockstep."""

    def __init__(self, plan: PartitionPlan, xp: ModuleType = numpy, dtype=numpy.float32,
                 replica: int = 0, generation: int = 0):
        self.plan, self.xp, self.dtype = plan, xp, numpy.dtype(dtype)
        self.runtimes = [PartitionRuntime(plan, p, xp, dtype, replica, generation) for p in range(plan.partitions)]

    def _blocks(self, blocks: dict, p: int) -> dict:
        names = self.plan.blocks_pulled(p)
        missing = [k for k in names if k not in blocks]
        if missing:
            raise KeyError(f"missing block(s) for partition {p}: {', '.join(missing)}")
        return {k: self.xp.asarray(blocks[k]) for k in names}

    def _tiles(self, x):
        c, h, w = self.plan.spec.input
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
            raise ValueError(f"input batch must have shape (B, {c}, {h}, {w}), got {tuple(x.shape)}")
        full = to_internal(self.xp, self.xp.asarray(x, dtype=self.dtype))
        return [full[t[0]:t[1], t[2]:t[3]].copy() for t in self.plan.layers[0].tiles]

    def run(self, gens) -> tuple[list[PartitionResult], ExchangeStats]:
        """Drive generators (one per partition) to the end, routing their messages."""
        n = len(gens)
        stats = ExchangeStats()
        pending: list = [None] * n
        results: list = [None] * n
        done = [False] * n

        def advance(i, inbox):
            try:
                pending[i] = gens[i].send(inbox)
            except StopIteration as stop:
                results[i], done[i], pending[i] = stop.value, True, None

        for i in range(n):
            advance(i, None)
        while not all(done):
            if any(done):
                raise RuntimeError("partitions disagree on the exchanges: some finished, some wait")
            keys = {(e.tag, e.direction) for e in pending}
            if len(keys) != 1:
                raise RuntimeError(f"partitions are at different exchanges: {sorted(keys)}")
            stats.rounds += 1
            boxes: list[list[Halo]] = [[] for _ in range(n)]
            for e in pending:
                for m in e.send:
                    boxes[m.to_partition].append(m)
                    stats.messages += 1
                    k = (m.direction, self.plan.untag(m.layer)[1])
                    stats.bytes[k] = stats.bytes.get(k, 0) + m.tensor.nbytes
            for i in range(n):
                advance(i, boxes[i])
        return results, stats

    def _join(self, results: list[PartitionResult], stats: ExchangeStats, B: int) -> ReplicaResult:
        xp, pl = self.xp, self.plan
        grads: dict = {}
        info: dict = {}
        for r in results:
            overlap = set(grads) & set(r.grads)
            assert not overlap, overlap
            grads.update(r.grads)
            for k, v in r.info.items():
                info[k] = info.get(k, 0.0) + v
        acts = {}
        for lay in pl.layers:
            if lay.name not in results[0].acts:
                continue
            c, h, w = lay.shape
            full = xp.empty((h, w, c, B), dtype=results[0].acts[lay.name].dtype)
            for r, t in zip(results, lay.tiles):
                full[t[0]:t[1], t[2]:t[3]] = r.acts[lay.name]
            acts[lay.name] = to_external(xp, full)
        for st, sl in zip(pl.network.stages, pl.stages):
            acts[f"{st.name}.output"] = acts[pl.layers[sl.output].name]
        if "head.logits" in results[0].acts:
            acts["head.logits"] = results[0].acts["head.logits"].T.copy()
        dx = None
        if results[0].dx is not None:
            c, h, w = pl.spec.input
            full = xp.empty((h, w, c, B), dtype=results[0].dx.dtype)
            for r, t in zip(results, pl.layers[0].tiles):
                full[t[0]:t[1], t[2]:t[3]] = r.dx
            dx = to_external(xp, full)
        stats.activation_bytes = pl.activation_bytes(B, self.dtype.itemsize)
        return ReplicaResult(sum(r.loss for r in results), grads, info, acts, dx, stats, results)

    def tica(self, blocks: dict, x, step: int = 0, need_dx: bool = False) -> ReplicaResult:
        """Partitioned ``Network.tica`` of a (B, C, H, W) batch; grads by block."""
        tiles = self._tiles(x)
        gens = [rt.tica(self._blocks(blocks, p), tiles[p], step, need_dx) for p, rt in enumerate(self.runtimes)]
        results, stats = self.run(gens)
        return self._join(results, stats, x.shape[0])

    def supervised(self, blocks: dict, x, y, step: int = 0, need_dx: bool = False) -> ReplicaResult:
        """Partitioned ``Network.supervised``; info holds the accuracy."""
        tiles = self._tiles(x)
        gens = [rt.supervised(self._blocks(blocks, p), tiles[p], y, step, need_dx)
                for p, rt in enumerate(self.runtimes)]
        results, stats = self.run(gens)
        return self._join(results, stats, x.shape[0])


def run_partitioned(plan: PartitionPlan, blocks: dict, x, y=None, objective: str = "tica",
                    need_dx: bool = False, xp: ModuleType = numpy, dtype=numpy.float32) -> ReplicaResult:
    """One step of every partition of a replica in lockstep (see ``LocalReplica``)."""
    rep = LocalReplica(plan, xp, dtype)
    if objective == "tica":
        return rep.tica(blocks, x, need_dx=need_dx)
    if objective == "supervised":
        return rep.supervised(blocks, x, y, need_dx=need_dx)
    raise ValueError(f"objective={objective!r} is unknown; allowed: tica, supervised")


__all__ = ["FORWARD", "BACKWARD", "KINDS", "Halo", "Exchange", "PartitionResult", "PartitionRuntime",
           "ExchangeStats", "ReplicaResult", "LocalReplica", "run_partitioned"]
