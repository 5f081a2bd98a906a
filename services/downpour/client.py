"""A Python client of the Neurons service, and the ``downpour query`` command.

    from downpour.client import NeuronsClient
    with NeuronsClient("127.0.0.1:7300") as nc:
        info = nc.describe()                                   # layers, shapes, source
        acts = nc.activations(["photo.jpg"], "stage3.pool")    # (1, units) every unit; any image size
        acts = nc.activations(batch_bhwc, "stage3.pool", neurons=[5, 17])
        top = nc.top_inputs("stage3.pool", (2, 4, 4), dataset="heldout", k=9)
        hist = nc.activation_histogram("stage3.pool", (2, 4, 4), dataset="heldout")
        stim = nc.optimal_stimulus("stage3.pool", (2, 4, 4))   # unit-norm [H, W, C]

    downpour query --addr 127.0.0.1:7300 --image photo.jpg --layer stage3.pool --neurons 5,17 [--json]

The methods, their arguments and their results (``downpour.neurons.results``)
are those of ``downpour.load(path)``, which answers in process: both are
``downpour.neurons.api.NeuronQueries``. Images are file
paths / encoded bytes (sent as encoded images, so the server decodes them) or
arrays [batch, height, width, channels] (uint8, or float in [0, 1]), of any
size: the server fits them to the model's input unless ``resize=False``. A
neuron is a flat id into its layer, or a (map, y, x) triple.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from typing import Any, cast

import grpc
import numpy as np

from downpour.neurons import wire
from downpour.neurons.api import NeuronQueries, NeuronSpec, Probe, Scan, StimulusSettings
from downpour.neurons.results import Activations, Histogram, ModelInfo, Stimulus, TopInput
from downpour.rpc import codec
from downpour.rpc.channel import (
    ChannelConfig,
    add_channel_arguments,
    channel_config_from_args,
    open_channel,
    wait_ready,
)
from downpour.v1 import neurons_pb2 as pb
from downpour.v1 import neurons_pb2_grpc


def _encoded(images) -> tuple[list[bytes], np.ndarray | None]:
    """Paths or bytes -> encoded list; an array -> (.., array)."""
    if isinstance(images, np.ndarray):
        return [], images
    out = []
    for im in images:
        if isinstance(im, (bytes, bytearray)):
            out.append(bytes(im))
        elif isinstance(im, (str, os.PathLike)):
            with open(im, "rb") as f:
                out.append(f.read())
        else:
            raise TypeError(f"an image must be a path, encoded bytes or one array of all images, got {type(im)}")
    return out, None


class NeuronsClient(NeuronQueries):
    def __init__(self, address: str, channel_config: ChannelConfig | None = None, timeout: float = 60.0) -> None:
        self.address, self.timeout = address, timeout
        self.channel = open_channel(address, channel_config)
        self.stub = neurons_pb2_grpc.NeuronsStub(self.channel)

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_ready(self.channel, timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> NeuronsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ref(self, layer: str, neuron: NeuronSpec) -> pb.NeuronRef:
        if isinstance(neuron, (tuple, list)):
            m, y, x = neuron
        else:  # a flat id: (map, y, x) from the layer's shape, as the server counts them
            try:
                _, h, w = self.describe().layer_shape(layer)
            except KeyError as e:
                raise ValueError(str(e.args[0])) from None
            m, r = divmod(int(cast(int, neuron)), h * w)  # not a tuple or list: an int (or NumPy int)
            y, x = divmod(r, w)
        return pb.NeuronRef(layer=layer, map=int(m), y=int(y), x=int(x))

    def describe(self, checkpoint_id: str = "") -> ModelInfo:
        r = self.stub.DescribeModel(pb.DescribeModelRequest(checkpoint_id=checkpoint_id), timeout=self.timeout)
        return wire.model_info(r)

    def probe(self, probe: Probe) -> Activations:
        """One GetActivations call."""
        layer = probe.layer
        enc, arr = _encoded(probe.images)
        req = pb.GetActivationsRequest(
            encoded_images=enc, raw=probe.raw, no_resize=not probe.resize, checkpoint_id=probe.checkpoint_id
        )
        if arr is not None:
            req.images.CopyFrom(codec.tensor_to_proto(np.ascontiguousarray(arr)))
        neurons = list(probe.neurons or [])
        if neurons and all(isinstance(n, (tuple, list)) for n in neurons):
            req.neurons.extend(self._ref(layer, n) for n in neurons)
        else:
            req.layer = layer
            req.neuron_ids.extend(int(cast(int, n)) for n in neurons)  # not all triples: flat ids
        r = self.stub.GetActivations(req, timeout=self.timeout)
        return Activations(
            codec.tensor_from_proto(r.activations).copy(),
            list(r.neuron_ids),
            tuple(r.layer_shape),
            r.parameters_version,
        )

    def top_and_histogram(self, scan: Scan) -> tuple[list[TopInput], Histogram]:
        """One TopInputs call: the k best inputs and (with ``bins``) the histogram of the activations."""
        r = self.stub.TopInputs(
            pb.TopInputsRequest(
                neuron=self._ref(scan.layer, scan.neuron),
                k=scan.k,
                dataset=scan.dataset,
                max_examples=scan.max_examples,
                include_images=scan.images,
                include_thumbnails=scan.thumbnails,
                histogram_bins=scan.bins,
                checkpoint_id=scan.checkpoint_id,
            ),
            timeout=self.timeout,
        )
        top = [
            TopInput(
                s.example_id,
                s.activation,
                s.label,
                codec.tensor_from_proto(s.image).copy() if s.HasField("image") else None,
                s.thumbnail_png,
            )
            for s in r.inputs
        ]
        hist = Histogram(
            np.asarray(r.histogram_edges, np.float64),
            np.asarray(r.histogram_counts, np.int64),
            r.examples_scanned,
            r.parameters_version,
        )
        return top, hist

    def stimulus(
        self, layer: str, neuron: NeuronSpec, settings: StimulusSettings, *, checkpoint_id: str = ""
    ) -> Stimulus:
        """One OptimalStimulus call (given at least 300 s: the search is long)."""
        r = self.stub.OptimalStimulus(
            pb.OptimalStimulusRequest(
                neuron=self._ref(layer, neuron),
                steps=settings.steps,
                learning_rate=settings.learning_rate,
                restarts=settings.restarts,
                norm=settings.norm,
                seed=settings.seed,
                checkpoint_id=checkpoint_id,
            ),
            timeout=max(self.timeout, 300.0),
        )
        return Stimulus(
            codec.tensor_from_proto(r.stimulus).copy(),
            r.activation,
            r.random_activation_mean,
            r.random_activation_max,
            r.parameters_version,
            r.png,
        )


# -- downpour query -----------------------------------------------------------------------


def parse_neurons(text: str) -> list[NeuronSpec]:
    """ "5,17" -> [5, 17]; "0:1:2;3:0:0" (map:y:x) -> [(0, 1, 2), (3, 0, 0)]."""
    out: list[NeuronSpec] = []
    for part in [p for p in text.replace(";", ",").split(",") if p.strip()]:
        if ":" in part:
            bits = part.split(":")
            if len(bits) != 3:
                raise ValueError(f"neuron {part!r}: write a flat id (17) or map:y:x (2:4:4)")
            m, y, x = (int(b) for b in bits)
            out.append((m, y, x))
        else:
            out.append(int(part))
    kinds = {isinstance(n, tuple) for n in out}
    if len(kinds) > 1:
        raise ValueError("--neurons: use either flat ids or map:y:x triples, not both")
    return out


def _cmd_query(args: argparse.Namespace) -> int:
    cc = channel_config_from_args(args)
    try:
        neurons = parse_neurons(args.neurons) if args.neurons else None
        with NeuronsClient(args.addr, cc, timeout=args.timeout) as nc:
            r = nc.activations(
                args.image,
                args.layer,
                neurons,
                raw=args.raw,
                resize=not args.no_resize,
                checkpoint_id=args.checkpoint_id,
            )
    except grpc.RpcError as e:
        print(f"downpour query: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"downpour query: {e}", file=sys.stderr)
        return 2
    triples = [n for n in neurons or [] if isinstance(n, tuple)]  # parse_neurons: all triples or none
    cols = [f"{m}:{y}:{x}" for m, y, x in triples] if triples else [str(i) for i in r.neuron_ids]
    if args.json:
        print(
            json.dumps(
                {
                    "layer": args.layer,
                    "layer_shape": list(r.layer_shape),
                    "neurons": cols,
                    "parameters_version": r.parameters_version,
                    "images": [
                        {"image": im, "activations": [float(v) for v in row]} for im, row in zip(args.image, r.values)
                    ],
                },
                indent=1,
            )
        )
        return 0
    shape = "x".join(map(str, r.layer_shape)) if r.layer_shape else ""
    print(f"{args.layer}{' [' + shape + ']' if shape else ''}, parameters version {r.parameters_version}")
    for im, row in zip(args.image, r.values):
        if len(row) <= 16:
            vals = "  ".join(f"{c}={v:.4g}" for c, v in zip(cols, row))
        else:
            top = np.argsort(-row)[:8]
            vals = f"{len(row)} units: mean {row.mean():.4g}, max {row.max():.4g}; top " + "  ".join(
                f"{cols[j]}={row[j]:.4g}" for j in top
            )
        print(f"{im}: {vals}")
    return 0


def add_query_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``downpour query`` to a ``downpour`` subparsers object."""
    q = subparsers.add_parser("query", help="activations of neurons for images, from a neurons service")
    q.add_argument("--addr", default="127.0.0.1:7300", help="the neurons service's address")
    q.add_argument(
        "--image",
        nargs="+",
        required=True,
        metavar="F",
        help="image files (PNG, JPEG, ...) of any size: fitted to the model's input",
    )
    q.add_argument("--layer", required=True, help="e.g. stage3.pool (see the service's DescribeModel)")
    q.add_argument("--neurons", default="", help="flat ids '5,17' or map:y:x triples '2:4:4,0:0:1'; default all")
    q.add_argument("--raw", action="store_true", help="skip the job's per-image normalisation")
    q.add_argument(
        "--no-resize",
        action="store_true",
        help="refuse images that are not the model's input size (default: fit them, aspect kept)",
    )
    q.add_argument("--checkpoint-id", default="", help="a committed checkpoint instead of the live parameters")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.add_argument("--timeout", type=float, default=60.0)
    add_channel_arguments(q)
    q.set_defaults(func=_cmd_query)
    return q


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="downpour")
    add_query_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(list(argv) if argv is not None else None)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
