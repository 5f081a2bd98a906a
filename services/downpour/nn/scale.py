"""Does a stage's loss fall by rescaling alone? The check that the objective has no free scale.

Each parametrisation admits some rescalings of its stored blocks (``nn.constraint``):

* ``free``: (a W1, W2 / a) reconstructs exactly as (W1, W2) does: the loss can fall by
  shrinking W1 with nothing learned;
* ``unit_decoder``: a W1 alone (the decoder columns are held at unit norm);
* ``unit_encoder``: a W2 alone (the encoder rows are held at unit norm);
* ``tied_decoder``: a W1, which scales the decoder W1^T with it.

``rescale_gains`` evaluates each stage's own two terms (reconstruction + sparsity) with that
stage's blocks rescaled by every factor given, the rest of the network unchanged, and reports
the largest relative fall. A trained objective without a free scale sits at a minimum along
every admitted rescaling: no factor lowers it.
"""

from __future__ import annotations

ADMITTED = {
    "free": (("W1", 1), ("W2", -1)),
    "unit_decoder": (("W1", 1),),
    "unit_encoder": (("W2", 1),),
    "tied_decoder": (("W1", 1),),
}


def stage_losses(net, params, x) -> dict[str, float]:
    """Each filter stage's reconstruction + sparsity on the batch x (B, C, H, W)."""
    info = net.tica(params, x)[2]
    return {
        st.name: info[f"{st.name}.reconstruction"] + info[f"{st.name}.sparsity"] for st in net.stages if st.has_tica
    }


def rescaled(params, stage: str, kind: str, a: float) -> dict:
    """``params`` with ``stage``'s blocks rescaled by factor ``a`` as ``kind`` admits."""
    out = dict(params)
    for block, power in ADMITTED[kind]:
        name = f"{stage}.{block}"
        out[name] = params[name] * params[name].dtype.type(a**power)
    return out


def rescale_gains(net, params, x, factors) -> dict[str, dict[str, float]]:
    """Per stage: its loss, and the largest relative fall of it over ``factors`` (0 when none
    lowers it) with the factor that gives it."""
    base = stage_losses(net, params, x)
    out = {}
    for st in net.stages:
        if not st.has_tica:
            continue
        best, best_a = 0.0, 1.0
        for a in factors:
            loss = stage_losses(net, rescaled(params, st.name, st.spec.constraint, a), x)[st.name]
            fall = (base[st.name] - loss) / base[st.name]
            if fall > best:
                best, best_a = fall, float(a)
        out[st.name] = {"loss": base[st.name], "fall": best, "factor": best_a}
    return out
