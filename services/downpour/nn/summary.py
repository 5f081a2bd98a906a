"""Shapes, parameter counts and FLOPs of a network, computed from its spec alone.

Nothing is allocated, so this works for ``le2012`` (billions of parameters).
FLOPs are per example for one forward pass (a multiply-add counts 2); a TICA
training step costs about three times the forward of encoder plus decoder.
Parameters count a decoder only where it is a block of its own (a tied decoder
is the encoder's transpose: ``nn.constraint``).
"""

from __future__ import annotations

import numpy

from .constraint import has_decoder_block
from .filtering import LocalFilter
from .lcn import LCN
from .pooling import Pool
from .spec import NetworkSpec


def summarize(spec: NetworkSpec) -> dict:
    layers = []
    connections = 0
    total = 0
    shape = spec.input
    for i, st in enumerate(spec.stages, 1):
        if st.filter is not None:
            f = LocalFilter(shape, st.filter.maps, st.filter.field, st.filter.stride, st.filter.tied)
            n = int(numpy.prod(f.weight_shape)) * (2 if has_decoder_block(st.constraint) else 1)
            connections += f.connections
            total += n  # encoder W1 (+ decoder W2)
            layers.append(
                {
                    "name": f"stage{i}.filter",
                    "kind": "conv" if f.tied else "local",
                    "in_shape": list(shape),
                    "out_shape": list(f.out_shape),
                    "field": f.k,
                    "stride": f.s,
                    "parameters": n,
                    "connections": f.connections,
                    "flops": f.flops(),
                }
            )
            shape = f.out_shape
        if st.pool is not None:
            p = Pool(shape, st.pool.size, st.pool.stride, st.pool.kind)
            layers.append(
                {
                    "name": f"stage{i}.pool",
                    "kind": f"{p.kind}_pool",
                    "in_shape": list(shape),
                    "out_shape": list(p.out_shape),
                    "size": p.p,
                    "stride": p.s,
                    "parameters": 0,
                    "flops": p.flops(),
                }
            )
            shape = p.out_shape
        if st.lcn is not None:
            norm = LCN(shape, st.lcn.size, st.lcn.sigma)
            layers.append(
                {
                    "name": f"stage{i}.lcn",
                    "kind": "lcn",
                    "in_shape": list(shape),
                    "out_shape": list(shape),
                    "size": norm.size,
                    "parameters": 0,
                    "flops": norm.flops(),
                }
            )
    if spec.classes:
        feats = int(numpy.prod(shape))
        n = spec.classes * feats + spec.classes
        total += n
        layers.append(
            {
                "name": "head",
                "kind": "softmax",
                "in_shape": list(shape),
                "out_shape": [spec.classes],
                "parameters": n,
                "flops": 2 * spec.classes * feats,
            }
        )
    return {
        "input": list(spec.input),
        "connections": connections,
        "total_parameters": total,
        "flops_per_example": sum(layer["flops"] for layer in layers),
        "layers": layers,
    }


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def format_summary(name: str, info: dict) -> str:
    rows = [f"network {name}: input {'x'.join(map(str, info['input']))} (C x H x W)", ""]
    rows.append(f"{'layer':<16}{'kind':<10}{'output':>14}{'params':>12}{'FLOPs/ex':>12}")
    for layer in info["layers"]:
        out = "x".join(map(str, layer["out_shape"]))
        rows.append(
            f"{layer['name']:<16}{layer['kind']:<10}{out:>14}{_human(layer['parameters']):>12}"
            f"{_human(layer['flops']):>12}"
        )
    rows.append("")
    rows.append(f"encoder connections: {info['connections']:,}")
    rows.append(f"total parameters (decoder blocks included): {info['total_parameters']:,}")
    rows.append(f"forward FLOPs per example: {_human(info['flops_per_example'])}")
    return "\n".join(rows)
