"""The questions a trained network answers, asked the same way in process or over gRPC.

``downpour.trained.TrainedNetwork`` (in process) and
``downpour.client.NeuronsClient`` (the remote service) both derive from
``NeuronQueries``: the public methods below, with their arguments and
defaults, are written once here, each in terms of one primitive that each side
implements (``probe``, ``top_and_histogram`` of a ``Scan``, ``stimulus``). Code written against one
runs against the other; the results are the types of ``downpour.neurons.results``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from downpour.neurons.results import Activations, Histogram, Stimulus, TopInput

NeuronSpec = int | tuple[int, int, int]  # a flat id into its layer, or (map, y, x)


@dataclass(frozen=True)
class StimulusSettings:
    """How an optimal stimulus is searched for; the defaults of every way of asking for one."""

    steps: int = 200  # projected gradient ascent steps
    learning_rate: float = 0.1  # each step moves learning_rate * norm
    restarts: int = 8  # random starting points, ascended together
    norm: float = 1.0  # the L2 norm of the stimulus
    seed: int = 0


DEFAULT_STIMULUS = StimulusSettings()


@dataclass(frozen=True)
class Scan:
    """One pass over a dataset for one unit: what ``top_inputs`` and ``activation_histogram`` ask."""

    layer: str
    neuron: NeuronSpec
    dataset: str = ""  # a named dataset ("": the job's data)
    k: int = 9  # the best inputs to return
    max_examples: int = 0  # 0: as many as the service allows
    images: bool = False  # return the inputs [H, W, C]
    thumbnails: bool = False  # return them as PNG
    checkpoint_id: str = ""
    bins: int = 0  # histogram bins (0: no histogram)


@dataclass(frozen=True)
class Probe:
    """Images shown to the network: what ``activations`` asks."""

    images: Any  # paths, encoded bytes, PIL images, arrays [H, W(, C)] or one array [B, H, W, C]
    layer: str
    neurons: Sequence[NeuronSpec] | None = None  # None: every unit of the layer
    raw: bool = False  # the images are already normalised as the model's input
    resize: bool = True  # fit any size to the input (False: the size must match)
    checkpoint_id: str = ""


class NeuronQueries(ABC):
    """The unit-level questions shared by the in-process network and the remote client."""

    @abstractmethod
    def probe(self, probe: Probe) -> Activations:
        """The activations the probe's images cause in its layer."""

    @abstractmethod
    def top_and_histogram(self, scan: Scan) -> tuple[list[TopInput], Histogram]:
        """One scan of a dataset: the k best inputs and (with ``bins``) the histogram of the activations."""

    @abstractmethod
    def stimulus(
        self, layer: str, neuron: NeuronSpec, settings: StimulusSettings, *, checkpoint_id: str = ""
    ) -> Stimulus:
        """The optimal stimulus of the unit, searched for as ``settings`` say."""

    def activations(
        self,
        images: Any,
        layer: str,
        neurons: Sequence[NeuronSpec] | None = None,
        *,
        raw: bool = False,
        resize: bool = True,
        checkpoint_id: str = "",
    ) -> Activations:
        """Activations of ``neurons`` (flat ids or (map, y, x); None: every unit) of ``layer``.

        ``images``: paths, encoded bytes, PIL images or arrays [H, W(, C)], or one
        array [batch, H, W, C] (uint8, or float in [0, 1]); any size (see ``resize``).
        """
        return self.probe(Probe(images, layer, neurons, raw, resize, checkpoint_id))

    def top_inputs(
        self,
        layer: str,
        neuron: NeuronSpec,
        *,
        dataset: str = "",
        k: int = 9,
        max_examples: int = 0,
        images: bool = False,
        thumbnails: bool = False,
        checkpoint_id: str = "",
    ) -> list[TopInput]:
        """The k examples of ``dataset`` that excite the unit most, best first."""
        scan = Scan(layer, neuron, dataset, k, max_examples, images, thumbnails, checkpoint_id)
        return self.top_and_histogram(scan)[0]

    def activation_histogram(
        self,
        layer: str,
        neuron: NeuronSpec,
        *,
        dataset: str = "",
        bins: int = 30,
        max_examples: int = 0,
        checkpoint_id: str = "",
    ) -> Histogram:
        """How the unit's activations over ``dataset`` are distributed (``bins`` equal-width bins)."""
        # k=1: the scan is the same whatever k is, and the fewest inputs come back with the histogram
        scan = Scan(layer, neuron, dataset, k=1, max_examples=max_examples, checkpoint_id=checkpoint_id, bins=bins)
        return self.top_and_histogram(scan)[1]

    def optimal_stimulus(
        self,
        layer: str,
        neuron: NeuronSpec,
        *,
        steps: int = StimulusSettings.steps,
        learning_rate: float = StimulusSettings.learning_rate,
        restarts: int = StimulusSettings.restarts,
        norm: float = StimulusSettings.norm,
        seed: int = StimulusSettings.seed,
        checkpoint_id: str = "",
    ) -> Stimulus:
        """The input of L2 norm ``norm`` that excites the unit most (projected gradient ascent, Le et al.)."""
        settings = StimulusSettings(steps=steps, learning_rate=learning_rate, restarts=restarts, norm=norm, seed=seed)
        return self.stimulus(layer, neuron, settings, checkpoint_id=checkpoint_id)
