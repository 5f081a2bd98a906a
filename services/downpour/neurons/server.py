"""The Neurons service: activations, top inputs and optimal stimuli of single units.

    downpour serve neurons --coordinator 127.0.0.1:7070          # live shards of a running job
    downpour serve neurons --shards A,B --config job.yaml        # live shards, explicit
    downpour serve neurons --checkpoint-dir runs/x/checkpoints   # newest committed checkpoint
    downpour serve neurons --params p.npz --preset small         # a parameters file
    downpour serve neurons --preset tiny --random-seed 0         # random weights (demos, tests)
    downpour serve neurons ... --http-port 8300                  # + the neuron explorer web page

Live parameters are pulled again every ``--refresh-seconds`` (so neurons can be
watched while a job trains); a checkpoint directory is re-scanned as often, and
``checkpoint_id`` in a request names any committed checkpoint in it.

Images arrive as encoded bytes (PNG, JPEG, ...; any size and mode) or as a
[batch, height, width, channels] tensor (uint8 0..255, or float16, bfloat16,
float32, float64 in 0..1; 1, 3 or 4 channels, any size). They are fitted to
the model's input (``downpour.neurons.images``: aspect kept, centre cut out;
``no_resize`` refuses instead) and normalised per example as the feeder
normalised the training data unless ``raw`` is set. The questions themselves
are answered by a ``downpour.trained.TrainedNetwork`` over the parameter
source, the same code ``downpour.load`` runs in process. Bad requests (unknown
layer or unit, undecodable or oversized image, a size refused, too many
images, a bad dataset name, ...) are answered INVALID_ARGUMENT with a message
saying what is allowed; an unknown checkpoint NOT_FOUND; no parameters yet
FAILED_PRECONDITION.

A query holds one stage's parameter blocks at a time (``downpour.neurons.model``):
it fetches stage 1's blocks (pulled from the shards, or read from the
checkpoint's files), runs stage 1 on the query's images, lets them go, fetches
stage 2's, and so on up to the queried layer; never a decoder, never a stage
above it. ``--hold-encoder`` instead keeps the whole encoder and head between
queries (refreshed on the interval): faster queries for about half the
model's size in memory. ``downpour_neurons_param_bytes_peak`` is the most
parameter bytes the service has held at once.

Work per request is bounded (``downpour.neurons.limits``): OptimalStimulus
and TopInputs have a cost budget in forward GFLOP up to the queried layer
(``--max-stimulus-gflop``, ``--max-scan-gflop``), checked before any work;
the heavy queries (those two and GetActivations) run at most
``--max-running-queries`` at once with ``--max-queued-queries`` waiting, and
one more is refused at once; both refusals are RESOURCE_EXHAUSTED. Encoded
images are parsed only as ``images.SERVICE_FORMATS``, at most
``--max-decoding-images`` at a time, large ones reduced before any float copy.

``--device gpu`` runs the network on CuPy (each stage's blocks copied to the
GPU as it is fetched); without CuPy or a visible GPU the service stops at
start with the reason (exit 2).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import hmac
import logging
import sys
import threading
import time
from typing import NoReturn

import grpc
import numpy as np

from downpour import device as devices
from downpour import metrics
from downpour.neurons import access, cancel, images, limits, source_args, sources, wire
from downpour.neurons.api import DEFAULT_STIMULUS, Scan, StimulusSettings
from downpour.neurons.model import QueryError
from downpour.rpc import codec, logs
from downpour.rpc.server import Server, ServerConfig
from downpour.trained import TrainedNetwork
from downpour.v1 import common_pb2, neurons_pb2_grpc
from downpour.v1 import neurons_pb2 as pb

log = logging.getLogger("downpour.neurons")
SERVICE = "downpour.v1.Neurons"
DEFAULT_PORT = 7300
# Heavy queries (stimulus, top inputs, activations) running at once, and waiting for a slot. The
# model's stages run one query at a time anyway (one lock per parameter source): two let one
# query decode or fetch while another computes; the queue absorbs a page's burst of questions.
DEFAULT_RUNNING = 2
DEFAULT_QUEUED = 8
# Images decoded at once: the largest accepted one (images.MAX_PIXELS, RGBA) holds 160 MB of pixels
# while it is decoded, so one at a time keeps the worst case at that whatever the callers send.
DEFAULT_DECODING = 1
# Freed blocks at least this large go back to the system at once (see _return_large_frees).
MMAP_THRESHOLD = 4 << 20


def _return_large_frees() -> None:
    """Pin glibc's mmap threshold: a freed image buffer then leaves the process at once.

    glibc raises the threshold after the first large block is freed, so later image buffers come
    from its per-thread heaps, which keep what is freed: decoded one at a time on changing worker
    threads, 10-megapixel images grew the service by over 200 MiB that it never gave back. Not
    glibc (musl, macOS): nothing to do.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    except OSError:
        return
    if mallopt is not None:
        mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD, fixed: no dynamic raising


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
        """A slot for a heavy query (``limits.Admission``); a caller that leaves wakes the queue."""
        context.add_callback(self.admission.wake)
        return self.admission.slot(method, context.is_active)

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


# -- the command -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="downpour serve neurons", description=__doc__.splitlines()[0])
    ServerConfig.add_arguments(ap, port=DEFAULT_PORT)
    source_args.add_arguments(ap)
    ap.add_argument("--config", default="", help="job config (YAML): the model and its normalisation")
    ap.add_argument("--preset", default="", help="network preset when there is no --config (default small)")
    ap.add_argument("--refresh-seconds", type=float, default=5.0, help="re-pull live parameters this often (0: never)")
    ap.add_argument(
        "--hold-encoder",
        action="store_true",
        help="keep the whole encoder and head in memory between queries (refreshed on the interval): "
        "faster queries for about half the model's size; by default a query holds one stage's "
        "blocks at a time",
    )
    ap.add_argument("--max-images", type=int, default=256, help="most images per GetActivations")
    ap.add_argument("--max-scan", type=int, default=20000, help="most examples one TopInputs scans")
    ap.add_argument(
        "--max-stimulus-gflop",
        type=float,
        default=None,
        help="most one OptimalStimulus may cost: steps x restarts x 3 x the forward FLOPs per image up to "
        "the queried layer (as `downpour model` lists them), in GFLOP; more is refused RESOURCE_EXHAUSTED "
        "(0: no limit; default: the explorer's largest search, 1,000 steps x 8 restarts at the top layer, "
        "and at least 20)",
    )
    ap.add_argument(
        "--max-scan-gflop",
        type=float,
        default=None,
        help="most one TopInputs may cost: examples scanned x the forward FLOPs per image up to the queried "
        "layer, in GFLOP; an explicit max_examples over it is refused RESOURCE_EXHAUSTED, max_examples=0 "
        "scans as many as fit (0: no limit; default: --max-scan examples at the top layer, and at least 100)",
    )
    ap.add_argument(
        "--max-running-queries",
        type=int,
        default=DEFAULT_RUNNING,
        help="heavy queries (OptimalStimulus, TopInputs, GetActivations) computed at once",
    )
    ap.add_argument(
        "--max-queued-queries",
        type=int,
        default=DEFAULT_QUEUED,
        help="heavy queries waiting for a slot; one more is refused RESOURCE_EXHAUSTED at once",
    )
    ap.add_argument(
        "--max-decoding-images",
        type=int,
        default=DEFAULT_DECODING,
        help="encoded images decoded at once, over every query (each holds its full-size pixels meanwhile)",
    )
    ap.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="another dataset TopInputs may scan (repeatable)",
    )
    ap.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="serve the neuron explorer web page on this port (0: any free port; default: off). "
        "With a token it needs TLS (--tls-cert/--tls-key), and then serves HTTPS. The page has its "
        "own session token (printed in its URL), never the service's",
    )
    access.add_access_arguments(ap, prefix="http-")
    ap.add_argument("--start-timeout", type=float, default=60.0, help="seconds to wait for the first parameters")
    ap.add_argument(
        "--device",
        default="cpu",
        choices=devices.DEVICES,
        help="compute device: cpu (NumPy) or gpu (CuPy, one CUDA GPU)",
    )
    logs.add_log_level_argument(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level)
    for flag in ("max_running_queries", "max_decoding_images"):
        if getattr(args, flag) < 1:
            print(f"neurons: --{flag.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    for flag in ("max_queued_queries", "max_stimulus_gflop", "max_scan_gflop"):
        if getattr(args, flag) is not None and not getattr(args, flag) >= 0:
            print(f"neurons: --{flag.replace('_', '-')} must be >= 0", file=sys.stderr)
            return 2
    extra = {}
    for d in args.dataset:
        name, sep, path = d.partition("=")
        if not sep or not name or not path:
            print(f"neurons: --dataset {d!r} must be NAME=PATH", file=sys.stderr)
            return 2
        extra[name] = path
    try:
        xp = devices.array_module(args.device)
    except devices.DeviceError as e:
        print(f"neurons: {e}", file=sys.stderr, flush=True)
        return 2
    logging.getLogger("downpour.neurons").info("computing on %s", devices.describe(xp))
    cfg = ServerConfig.from_args(args)
    server = Server("neurons", cfg)
    try:
        source = source_args.make_source(args, xp)
    except (ValueError, OSError, sources.SourceError, grpc.RpcError) as e:
        print(f"neurons: {e}", file=sys.stderr)
        return 2
    _return_large_frees()
    svc = Neurons(
        source,
        max_images=args.max_images,
        max_scan=args.max_scan,
        datasets=extra,
        budgets=limits.Budgets(args.max_stimulus_gflop, args.max_scan_gflop, args.max_scan),
        admission=limits.Admission(args.max_running_queries, args.max_queued_queries),
        decode=images.DecodeLimits(images.SERVICE_FORMATS, gate=threading.BoundedSemaphore(args.max_decoding_images)),
    )
    explorer = None
    if args.http_port is not None:
        from downpour.neurons.explorer import (  # noqa: PLC0415 - aiohttp (~0.3 s) only with --http-port
            ExplorerServer,
            print_url,
        )

        try:  # the same parameters, limits and TLS certificate as the gRPC API; a session token of its own
            token, token_given = access.session_token(args.http_session_token_file)
            if cfg.token and hmac.compare_digest(cfg.token.encode(), token.encode()):
                raise ValueError("the session token must not be the service's token")
            explorer = ExplorerServer(
                svc.net,
                cfg.host,
                args.http_port,
                session_token=token,
                tls_required=bool(cfg.token or cfg.roles),
                tls_cert=cfg.tls_cert,
                tls_key=cfg.tls_key,
                allow_hosts=tuple(args.http_allow_host),
            )
        except (ValueError, OSError) as e:
            print(f"neurons: --http-port: {e}", file=sys.stderr)
            return 2
    server.add(lambda s: neurons_pb2_grpc.add_NeuronsServicer_to_server(svc, s), SERVICE)
    port = server.start()
    print(f"neurons listening on port {port}", file=sys.stderr, flush=True)
    try:
        sources.wait_for_first(source, args.start_timeout)
    except sources.SourceError as e:
        print(f"neurons: {e}", file=sys.stderr)
        server.stop(0)
        return 1
    metrics.NEURONS_PARAMETERS_VERSION.set(source.model.version)
    refresher = sources.Refresher(source, args.refresh_seconds).start()
    if explorer is not None:  # opened once there are parameters, as health turns SERVING
        try:
            explorer.start()
        except OSError as e:
            print(f"neurons: --http-port {args.http_port}: cannot serve the explorer: {e}", file=sys.stderr)
            server.stop(0)
            return 2
        print_url(explorer, token_given)
    server.set_serving()
    server.wait()
    if explorer is not None:
        explorer.stop()
    refresher.stop()
    source.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
