"""One partition's forward and backward, with every dependency on another
partition an explicit message.

``PartitionRuntime.tica`` (and ``supervised``) are generators: at every
synchronisation point they yield an ``Exchange`` (the ``Halo`` messages this
partition sends, and which partitions it expects one message from) and are
resumed with the list of messages addressed to it (``comms`` holds the four
kinds of exchange, ``halo`` the messages). Every partition of a replica
yields the same sequence of exchanges, so they can run in lockstep:
``local.LocalReplica`` does that in one process (tests, benchmarks), and the
worker carries the same messages over its ``Exchange`` stream. The LCN on a
tile is ``tilelcn.TileLCN``.

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

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy

from downpour.nn import constraint
from downpour.nn.filtering import LocalFilter
from downpour.nn.network import pooled_activity, softmax_cross_entropy
from downpour.nn.pooling import Pool

from .comms import PartitionComms
from .halo import BACKWARD, FORWARD
from .regions import crop, size
from .tilelcn import TileLCN


@dataclass
class PartitionResult:
    loss: float  # this partition's share
    info: dict
    grads: dict  # by block: the blocks this partition pushes
    acts: dict  # layer name -> this partition's tile, (h, w, C, B)
    dx: Any = None  # the input tile's gradient (h, w, C, B), when asked for


class PartitionRuntime(PartitionComms):
    """Partition ``partition`` of one replica: its layers' compute on its tiles."""

    def _setup(self) -> None:
        self._stages = [self._build(st, sl) for st, sl in zip(self.plan.network.stages, self.plan.stages)]

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
            b.lcn = TileLCN(st.lcn, xp)
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
            w = constraint.encoder(st.spec.constraint, xp, blocks[self._name(st, "W1")], b.filt.weight_shape)
            z, _ = b.filt.forward(w.w1, a_reg)
            ctx.update(a_reg=a_reg, z=z, w=w)
            acts[pl.layers[sl.filter].name] = z
            h = z
            if tica:
                w2 = blocks.get(self._name(st, "W2")) if constraint.has_decoder_block(st.spec.constraint) else None
                constraint.with_decoder(w, xp, w2, b.filt.decoder_shape)
                r_reg = b.filt.decode(w.w2, z)
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
            ctx["sp_out"] = sp_out
        return h, ctx, rec, sparsity

    def _stage_backward(self, b, blocks, ctx, dy, tica: bool, need_dx: bool):
        pl, st, sl, xp = self.plan, b.st, b.sl, self.xp
        grads: dict[str, Any] = {}
        B = ctx["a"].shape[3]
        dz = dW2 = None  # dz: gradient of the layer below the pool, over R_z
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
            dz_rec, dW2 = b.filt.decode_backward(ctx["w"].w2, ctx["z"], dr_reg)
            dz = dz_rec if dz is None else dz + dz_rec
        if dz is None:
            dz = xp.zeros(ctx["z"].shape, dtype=ctx["z"].dtype)
        dx, dW1 = b.filt.backward(ctx["w"].w1, ctx["a_reg"], dz, need_dx=need_dx)
        dW1, dW2 = constraint.pullback(xp, ctx["w"], dW1, dW2)
        grads["W1"] = dW1.reshape(-1)
        if dW2 is not None:
            grads["W2"] = dW2.reshape(-1)
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
                # this tile's weights and pooled units (the Network's watch, over this partition's share)
                info.update(constraint.norm_stats(self.xp, ctx["w"], b.st.name))
                if "sp_out" in ctx:
                    info.update(pooled_activity(self.xp, ctx["sp_out"], b.st.name))
        return h, ctxs, loss, info, acts

    def _backward_all(self, blocks, ctxs, dy, tica: bool, need_dx: bool, grads: dict):
        # layerwise TICA: no gradient leaves a stage through its input (every partition skips the
        # same exchanges, so the replica stays in lockstep)
        down = not (tica and self.plan.spec.training == "layerwise")
        for i in range(len(self._stages) - 1, -1, -1):
            dx_here = need_dx if i == 0 else down
            dy, g = yield from self._stage_backward(self._stages[i], blocks, ctxs[i], dy, tica, dx_here)
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
