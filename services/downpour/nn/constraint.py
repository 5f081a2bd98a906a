"""How a stage's encoder W1 and decoder W2 are parametrised: the TICA objective's scale.

With W1 and W2 free, (a W1, W2 / a) reconstructs exactly as (W1, W2) does
while the L2-pooled sparsity term falls by a: the objective's infimum is at
zero scale, and the optimiser can lower the loss by shrinking the encoder
without learning anything. Each ``StageSpec.constraint`` closes (or keeps)
that free scale:

* ``free``: W1 and W2 as stored (the form of Le et al. 2012's equation; kept
  for comparison);
* ``unit_decoder``: every decoder column (one map's K weights at one
  location) has unit norm: the sparse-coding dictionary constraint
  (Olshausen & Field; Ranzato et al. 2007);
* ``unit_encoder``: every encoder row (one map's K weights at one location)
  has unit norm: what the public RICA code does (``l2rowscaled``);
* ``tied_decoder``: W2 = W1^T, RICA's tied form (Le et al., NIPS 2011); the
  stage has no W2 block.

A norm constraint is a reparametrisation (weight normalisation, Salimans &
Kingma 2016), not a projection: the stored block V is free, the stage
computes with w = V / |V| per row (or column), and the gradient is pulled
back through it, dV = (dw - w (w . dw)) / |V|. So the parameter servers stay
plain Adagrad appliers that may apply a gradient chunk by chunk, every
transport (gRPC, shared memory, in process) and every partition of a
model-parallel replica take identical steps by construction (a row or
column lies inside one location, so inside one partition's block), and no
state besides the blocks exists. The effective weights have unit norms
exactly (to float32 rounding) at every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

TINY = 1e-12  # floor on a norm: an all-zero row stays finite (and keeps a zero gradient)

# Axes over which one unit's weights run: W1 is (L, M, K) (rows over K), W2 is (L, K, M)
# (columns over K).
ENCODER_AXIS = -1
DECODER_AXIS = -2


def has_decoder_block(kind: str) -> bool:
    """Whether the stage stores its own W2 (a tied decoder is W1's transpose)."""
    return kind != "tied_decoder"


# Per-unit dot products over one axis of a 3-D block, without a block-sized temporary.
DOT = {ENCODER_AXIS: "lmk,lmk->lm", DECODER_AXIS: "lkm,lkm->lm"}


def _dot(xp: ModuleType, a, b, axis: int):
    """sum(a * b) along ``axis``, kept for broadcasting."""
    return xp.expand_dims(xp.einsum(DOT[axis], a, b), axis)


def unit(xp: ModuleType, v, axis: int):
    """(v / |v|, |v|) with the norm taken along ``axis`` (kept for broadcasting)."""
    n = xp.sqrt(_dot(xp, v, v, axis))
    n = xp.maximum(n, v.dtype.type(TINY))
    return v / n, n


def unit_grad(xp: ModuleType, w, n, dw, axis: int):
    """The gradient of a loss in V given its gradient dw in w = V / |V|: (dw - w (w . dw)) / |V|.
    Computed in ``dw``'s own buffer (a fresh gradient that the caller hands over)."""
    dw -= w * _dot(xp, w, dw, axis)
    dw /= n
    return dw


@dataclass
class Weights:
    """A stage's effective weights as the filter uses them (3-D views), and what the pullback needs."""

    kind: str
    w1: Any  # (L or 1, M, K)
    w2: Any = None  # (L or 1, K, M); None when only the encoder was asked for
    n1: Any = None  # the stored encoder rows' norms (unit_encoder)
    n2: Any = None  # the stored decoder columns' norms (unit_decoder)


def encoder(kind: str, xp: ModuleType, raw_w1, weight_shape) -> Weights:
    """The encoder the stage computes with, from its stored block (flat or shaped)."""
    v1 = raw_w1.reshape(weight_shape)
    if kind == "unit_encoder":
        w1, n1 = unit(xp, v1, ENCODER_AXIS)
        return Weights(kind, w1, n1=n1)
    return Weights(kind, v1)


def with_decoder(w: Weights, xp: ModuleType, raw_w2, decoder_shape) -> Weights:
    """``w`` completed with the decoder: W1's transpose (tied), or the stored block, normalised or not."""
    if w.kind == "tied_decoder":
        w.w2 = xp.ascontiguousarray(w.w1.swapaxes(-1, -2))
    elif w.kind == "unit_decoder":
        w.w2, w.n2 = unit(xp, raw_w2.reshape(decoder_shape), DECODER_AXIS)
    else:
        w.w2 = raw_w2.reshape(decoder_shape)
    return w


def pullback(xp: ModuleType, w: Weights, dw1, dw2):
    """Gradients in the stored blocks, (dW1, dW2 or None), from those in the effective weights
    (3-D, the shapes of ``w.w1`` and ``w.w2``; dw2 may be None when the decoder was not used)."""
    if w.kind == "tied_decoder":
        if dw2 is not None:
            dw1 = dw1 + dw2.swapaxes(-1, -2)
        dw2 = None
    elif w.kind == "unit_decoder" and dw2 is not None:
        dw2 = unit_grad(xp, w.w2, w.n2, dw2, DECODER_AXIS)
    if w.kind == "unit_encoder":
        dw1 = unit_grad(xp, w.w1, w.n1, dw1, ENCODER_AXIS)
    return dw1, dw2


def norm_stats(xp: ModuleType, w: Weights, prefix: str) -> dict[str, float]:
    """Mean, min and max of the effective encoder rows' and decoder columns' norms, and each
    block's rms: what a run records to see whether the scale drifts."""
    out: dict[str, float] = {}
    for name, arr, axis in (("W1", w.w1, ENCODER_AXIS), ("W2", w.w2, DECODER_AXIS)):
        if arr is None:
            continue
        sq = xp.einsum(DOT[axis], arr, arr)
        n = xp.sqrt(sq)
        out[f"{prefix}.{name}.norm_mean"] = float(n.mean())
        out[f"{prefix}.{name}.norm_min"] = float(n.min())
        out[f"{prefix}.{name}.norm_max"] = float(n.max())
        out[f"{prefix}.{name}.rms"] = float(xp.sqrt(sq.sum() / arr.size))
    return out


def effective_blocks(kind: str, xp: ModuleType, raw_w1, raw_w2, weight_shape, decoder_shape):
    """(W1, W2) as the stage computes with them, flat: for reading learned filters and checks."""
    w = with_decoder(encoder(kind, xp, raw_w1, weight_shape), xp, raw_w2, decoder_shape)
    return w.w1.reshape(-1), w.w2.reshape(-1)
