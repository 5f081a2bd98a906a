"""How a model's description travels in the Neurons protos: one conversion each way.

The service (``downpour.neurons.service``) writes a ``DescribeModelResponse``
from a ``ModelInfo``; the client (``downpour.client``) reads one back into a
``ModelInfo``. The fields they share by name are listed once, here.
"""

from __future__ import annotations

from typing import Any

from downpour.neurons.results import LayerInfo, ModelInfo
from downpour.v1 import neurons_pb2 as pb

# ModelInfo's fields that the wire message carries under the same name and type
_SCALARS = ("source", "parameters_version", "checkpoint_id", "step", "normalize", "max_images")


def shape3(shape: Any) -> tuple[int, int, int]:
    """A (C, H, W) or (H, W, C) from the wire, which carries it as a repeated field."""
    a, b, c = (int(v) for v in shape)
    return a, b, c


def describe_response(d: ModelInfo, **extra: Any) -> pb.DescribeModelResponse:
    """``d`` as the service answers DescribeModel; ``extra``: fields only the service knows."""
    resp = pb.DescribeModelResponse(
        input_shape=list(d.input_shape), datasets=d.datasets, **{f: getattr(d, f) for f in _SCALARS}, **extra
    )
    for layer in d.layers:
        resp.layers.add(name=layer.name, shape=list(layer.shape))
    return resp


def model_info(r: pb.DescribeModelResponse) -> ModelInfo:
    """A DescribeModel answer as the ``ModelInfo`` that ``downpour.load(path).describe()`` gives."""
    return ModelInfo(
        layers=[LayerInfo(layer.name, shape3(layer.shape)) for layer in r.layers],
        input_shape=shape3(r.input_shape),
        datasets=list(r.datasets),
        **{f: getattr(r, f) for f in _SCALARS},
    )
