"""What a question about a network's units returns, in process or over gRPC.

``downpour.load(path)`` (in process) and ``downpour.client.NeuronsClient``
(the remote service) answer with these same types, so code written against
one runs against the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class LayerInfo:
    name: str
    shape: tuple[int, int, int]  # (maps, height, width)


@dataclass
class ModelInfo:
    layers: list[LayerInfo]  # in forward order
    input_shape: tuple[int, int, int]  # (height, width, channels), as images are given
    source: str  # where the parameters come from
    parameters_version: int
    checkpoint_id: str
    step: int
    normalize: str  # the per-example normalisation applied to non-raw images
    datasets: list[str] = field(default_factory=list)  # what top_inputs may scan
    max_images: int = 0  # most images per activations call (0: no limit)

    def layer_shape(self, name: str) -> tuple[int, int, int]:
        for layer in self.layers:
            if layer.name == name:
                return layer.shape
        raise KeyError(f"unknown layer {name!r}; layers: {', '.join(l.name for l in self.layers)}")


@dataclass
class Activations:
    values: np.ndarray  # (images, neurons) float32
    neuron_ids: list[int]  # flat ids, one per column, when queried by layer (empty for (map, y, x) neurons)
    layer_shape: tuple[int, ...]  # (maps, height, width) when queried by layer
    parameters_version: int


@dataclass
class TopInput:
    example_id: int
    activation: float
    label: int
    image: np.ndarray | None  # [H, W, C]
    thumbnail_png: bytes


@dataclass
class Histogram:
    edges: np.ndarray  # bins + 1, lowest to highest activation
    counts: np.ndarray  # examples per bin
    examples_scanned: int
    parameters_version: int


@dataclass
class Stimulus:
    image: np.ndarray  # [H, W, C], L2 norm as asked (1 by default)
    activation: float
    random_activation_mean: float
    random_activation_max: float
    parameters_version: int
    png: bytes
