"""The Neurons gRPC servicer: requests in, ``TrainedNetwork`` calls, responses out.

``Neurons`` only translates: the images of a request (encoded bytes or a tensor, see
``images_from_request``) and its fields become a call on ``downpour.trained.TrainedNetwork``,
which does the work and validates the arguments; its answer becomes the response message.
Errors become status codes in one place (``_rpc``): a bad request INVALID_ARGUMENT, an unknown
checkpoint NOT_FOUND, no parameters yet FAILED_PRECONDITION, a cost over budget or a full queue
RESOURCE_EXHAUSTED, a caller gone CANCELLED. The command that serves it is ``neurons.server``.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import NoReturn

import grpc
import numpy as np

from downpour import metrics
from downpour.neurons import cancel, images, limits, sources, wire
from downpour.neurons.api import DEFAULT_STIMULUS, Scan, StimulusSettings
from downpour.neurons.model import QueryError
from downpour.rpc import codec
from downpour.trained import TrainedNetwork
from downpour.v1 import common_pb2, neurons_pb2_grpc
from downpour.v1 import neurons_pb2 as pb

log = logging.getLogger("downpour.neurons")
# Heavy queries (stimulus, top inputs, activations) running at once, and waiting for a slot. The
# model's stages run one query at a time anyway (one lock per parameter source): two let one
# query decode or fetch while another computes; the queue absorbs a page's burst of questions.
DEFAULT_RUNNING = 2
DEFAULT_QUEUED = 8
# Images decoded at once: the largest accepted one (images.MAX_PIXELS, RGBA) holds 160 MB of pixels
# while it is decoded, so one at a time keeps the worst case at that whatever the callers send.
DEFAULT_DECODING = 1


# The tensor dtypes images may come in, and how each is read (see images.ARRAY_DTYPES).
IMAGE_DTYPES = {
    common_pb2.DTYPE_UINT8: "uint8",
    common_pb2.DTYPE_FLOAT16: "float16",
    common_pb2.DTYPE_BFLOAT16: "bfloat16",
    common_pb2.DTYPE_FLOAT32: "float32",
    common_pb2.DTYPE_FLOAT64: "float64",
}


def images_from_request(
    req: pb.GetActivationsRequest,
    max_images: int,
    limits: images.DecodeLimits = images.DEFAULT_LIMITS,
    fit: tuple[int, int] | None = None,
):
    """The request's images as (C, H, W) float32 in [0, 1] (see ``downpour.neurons.images``):
    encoded ones decoded within ``limits``, and (with ``fit``, the model's (height, width)) reduced
    towards it as they are decoded."""
    has_tensor = req.HasField("images") and len(req.images.shape) > 0
    if has_tensor and req.encoded_images:
        raise QueryError("send images either as a tensor or as encoded_images, not both")
    if req.encoded_images:
        n = len(req.encoded_images)
        if n > max_images:
            raise QueryError(f"too many images: {n}; at most {max_images} per request")
        names = [f"encoded_images[{i}]" for i in range(n)]
        budget = images.PixelBudget()
        # a generator: each image is fitted to the input before the next one is decoded
        return (
            images.from_encoded(d, names[i], budget, limits=limits, fit=fit) for i, d in enumerate(req.encoded_images)
        ), names
    if has_tensor:
        if req.images.dtype not in IMAGE_DTYPES:
            allowed = ", ".join(
                f"{common_pb2.Dtype.Name(d)} ({images.ARRAY_DTYPES[n]})" for d, n in IMAGE_DTYPES.items()
            )
            raise QueryError(
                f"images of dtype {codec.dtype_name(req.images.dtype)} are not supported; send one of: {allowed}"
            )
        shape = list(req.images.shape)
        if len(shape) == 4 and shape[1] * shape[2] > images.MAX_PIXELS:  # before a byte is read
            raise QueryError(
                f"images are {shape[1]}x{shape[2]} = {shape[1] * shape[2]} pixels each; at most {images.MAX_PIXELS}"
            )
        try:
            arr = codec.tensor_from_proto(req.images)
        except (ValueError, KeyError) as e:
            raise QueryError(f"images: {e}") from None
        if arr.ndim == 4 and arr.shape[0] > max_images:
            raise QueryError(f"too many images: {arr.shape[0]}; at most {max_images} per request")
        items = images.from_batch(arr, "images", IMAGE_DTYPES[req.images.dtype])
        return items, [f"images[{i}]" for i in range(len(items))]
    raise QueryError("no images: set images (a tensor) or encoded_images")


def _rpc(method):
    """An RPC whose errors become status codes (see ``Neurons._fail``), and whose long loops stop
    when its caller is gone (``neurons.cancel``)."""

    @functools.wraps(method)
    def call(self, request, context):
        try:
            with cancel.active_while(context.is_active):
                return method(self, request, context)
        except cancel.Cancelled as e:
            metrics.NEURONS_CANCELLED.labels(method.__name__).inc()
            log.info("%s: %s", method.__name__, e)
            context.abort(grpc.StatusCode.CANCELLED, str(e))
        except limits.OverBudget as e:
            metrics.NEURONS_OVER_BUDGET.labels(method.__name__).inc()
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except limits.Busy as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except (QueryError, ValueError, KeyError, sources.SourceError) as e:  # the rest: INTERNAL, logged
            self._fail(context, e)

    return call


class Neurons(neurons_pb2_grpc.NeuronsServicer):
    """The gRPC face of a ``TrainedNetwork`` over the service's parameter source."""

    def __init__(
        self,
        source: sources.Source,
        max_images: int = 256,
        max_scan: int = 20000,
        datasets: dict[str, str] | None = None,
        budgets: limits.Budgets = limits.NO_BUDGETS,
        admission: limits.Admission | None = None,
        decode: images.DecodeLimits = images.DEFAULT_LIMITS,
    ) -> None:
        self.source = source
        self.max_images = max_images
        self.admission = admission or limits.Admission(DEFAULT_RUNNING, DEFAULT_QUEUED)
        self.decode = decode
        self.net = TrainedNetwork(
            source, max_scan=max_scan, datasets=datasets, max_images=max_images, budgets=budgets, decode=decode
        )

    def _heavy(self, method: str, context):
        """A slot for a heavy query (``limits.Admission``); a caller that leaves wakes its own place."""
        return self.admission.slot(method, context.is_active, context.add_callback)

    @staticmethod
    def _fail(context, e: Exception) -> NoReturn:
        if isinstance(e, (QueryError, ValueError)):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if isinstance(e, KeyError):
            context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0] if e.args else e))
        if isinstance(e, sources.SourceError):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        raise e

    @staticmethod
    def _neuron(ref: pb.NeuronRef) -> tuple[str, tuple[int, int, int]]:
        return ref.layer, (ref.map, ref.y, ref.x)

    # -- RPCs -----------------------------------------------------------------------
    @_rpc
    def GetActivations(self, request, context):
        model = self.net.model(request.checkpoint_id)
        fit = None if request.no_resize else (int(model.spec.input[1]), int(model.spec.input[2]))
        with self._heavy("GetActivations", context):
            return self._activations(request, model, fit)

    def _activations(self, request, model, fit):
        items, names = images_from_request(request, self.max_images, self.decode, fit)
        x = self.net.prepare(
            items, names, raw=request.raw, resize=not request.no_resize, checkpoint_id=request.checkpoint_id
        )
        resp = pb.GetActivationsResponse()
        if request.neurons:
            if request.layer or request.neuron_ids:
                raise QueryError("give either neurons or layer (+ neuron_ids), not both")
            units = [self.net.unit(model, *self._neuron(r)) for r in request.neurons]
            acts = model.activations(x, units)
        else:
            if not request.layer:
                raise QueryError(f"say which units: neurons, or a layer; layers: {', '.join(model.layers)}")
            a = self.net.activations_of(x, request.layer, list(request.neuron_ids), checkpoint_id=request.checkpoint_id)
            acts = a.values
            resp.layer_shape.extend(a.layer_shape)
            resp.neuron_ids.extend(a.neuron_ids)
        resp.activations.CopyFrom(codec.tensor_to_proto(np.ascontiguousarray(acts, np.float32)))
        resp.parameters_version = model.version  # live blocks were pulled by this query: their version now
        metrics.NEURONS_IMAGES.labels("GetActivations").inc(len(x))
        return resp

    @_rpc
    def TopInputs(self, request, context):
        layer, neuron = self._neuron(request.neuron)
        scan = Scan(
            layer,
            neuron,
            dataset=request.dataset,
            k=request.k or 10,
            max_examples=request.max_examples,
            images=request.include_images,
            thumbnails=request.include_thumbnails,
            checkpoint_id=request.checkpoint_id,
            bins=request.histogram_bins,
        )
        self.net.scan_size(scan)  # refused before it waits for a slot: bad or over budget
        with self._heavy("TopInputs", context):
            top, hist = self.net.top_and_histogram(scan)
        resp = pb.TopInputsResponse(
            examples_scanned=hist.examples_scanned,
            parameters_version=hist.parameters_version,
            histogram_edges=[float(e) for e in hist.edges],
            histogram_counts=[int(c) for c in hist.counts],
        )
        for t in top:
            s = resp.inputs.add(example_id=t.example_id, activation=t.activation, label=t.label)
            if t.image is not None:
                s.image.CopyFrom(codec.tensor_to_proto(t.image))
            if t.thumbnail_png:
                s.thumbnail_png = t.thumbnail_png
        metrics.NEURONS_IMAGES.labels("TopInputs").inc(hist.examples_scanned)
        return resp

    @_rpc
    def OptimalStimulus(self, request, context):
        layer, neuron = self._neuron(request.neuron)
        d = DEFAULT_STIMULUS  # an unset (zero) field asks for the default
        settings = StimulusSettings(
            steps=request.steps or d.steps,
            learning_rate=request.learning_rate or d.learning_rate,
            restarts=request.restarts or d.restarts,
            norm=request.norm or d.norm,
            seed=request.seed,
        )
        self.net.check_stimulus(layer, neuron, settings, checkpoint_id=request.checkpoint_id)  # before it waits
        with self._heavy("OptimalStimulus", context):
            s = self.net.stimulus(layer, neuron, settings, checkpoint_id=request.checkpoint_id)
        return pb.OptimalStimulusResponse(
            stimulus=codec.tensor_to_proto(s.image),
            activation=s.activation,
            random_activation_mean=s.random_activation_mean,
            random_activation_max=s.random_activation_max,
            parameters_version=s.parameters_version,
            png=s.png,
        )

    @_rpc
    def DescribeModel(self, request, context):
        d = self.net.describe(request.checkpoint_id)
        return wire.describe_response(d, seconds_since_refresh=max(0.0, time.time() - self.source.refreshed_at))
