"""The Neurons service: activations, top inputs and optimal stimuli of single units.

    downpour serve neurons --coordinator 127.0.0.1:7070          # live shards of a running job
    downpour serve neurons --shards A,B --config job.yaml        # live shards, explicit
    downpour serve neurons --checkpoint-dir runs/x/checkpoints   # newest committed checkpoint
    downpour serve neurons --params p.npz --preset small         # a parameters file
    downpour serve neurons --preset tiny --random-seed 0         # random weights (demos, tests)

Live parameters are pulled again every ``--refresh-seconds`` (so neurons can be
watched while a job trains); a checkpoint directory is re-scanned as often, and
``checkpoint_id`` in a request names any committed checkpoint in it.

Images arrive as encoded PNG/JPEG bytes or as a [batch, height, width, channels]
tensor (uint8 or float in [0, 1]); they must have the model's input size, and
are normalised per example as the feeder normalised the training data unless
``raw`` is set. Bad requests (unknown layer or unit, undecodable image, wrong
size or channels, too many images, a bad dataset name, ...) are answered
INVALID_ARGUMENT with a message saying what is allowed.

``--device gpu`` runs the network on CuPy (parameters copied to the GPU once
per refresh); without CuPy or a visible GPU the service stops at start with
the reason (exit 2).
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import threading
import time

import grpc
import numpy as np

from downpour import device as devices
from downpour import metrics
from downpour.feeder import preprocess
from downpour.neurons import sources
from downpour.neurons.model import NeuronModel, QueryError, Unit
from downpour.rpc import codec
from downpour.rpc.server import Server, ServerConfig
from downpour.v1 import neurons_pb2 as pb
from downpour.v1 import neurons_pb2_grpc

log = logging.getLogger("downpour.neurons")
SERVICE = "downpour.v1.Neurons"
DEFAULT_PORT = 7300
MAX_K = 1000
MAX_STEPS = 5000
MAX_RESTARTS = 64


def png_bytes(img_chw: np.ndarray) -> bytes:
    """A (C, H, W) float image, min-max scaled, as 8-bit PNG (grey or RGB)."""
    from PIL import Image

    a = np.asarray(img_chw, np.float64)
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    u8 = np.round(a * 255).astype(np.uint8)
    im = Image.fromarray(u8[0]) if u8.shape[0] == 1 else Image.fromarray(np.moveaxis(u8[:3], 0, -1))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes, channels: int, index: int) -> np.ndarray:
    """Encoded bytes -> (C, H, W) float32 in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    # DecompressionBombError: a header claiming billions of pixels is refused, not decoded.
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise QueryError(f"encoded_images[{index}]: not a decodable image ({e})") from None
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, np.float32) / (65535.0 if im.mode.startswith("I;16") else float(max(np.asarray(im).max(), 1)))
        chw = a[None]
    elif im.mode == "F":
        chw = np.asarray(im, np.float32)[None]
    else:
        im = im.convert("RGB") if im.mode not in ("L", "RGB") else im
        a = np.asarray(im, np.float32) / 255.0
        chw = a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0)
    return preprocess.convert_channels(chw, channels)


class Neurons(neurons_pb2_grpc.NeuronsServicer):
    def __init__(self, source: sources.Source, max_images: int = 256, max_scan: int = 20000,
                 datasets: dict[str, str] | None = None) -> None:
        self.source = source
        self.max_images, self.max_scan = max_images, max_scan
        self.extra_datasets = dict(datasets or {})
        self._ds_cache: dict[tuple, object] = {}
        self._ck_cache: dict[str, NeuronModel] = {}
        self._lock = threading.Lock()

    # -- helpers ------------------------------------------------------------------
    def _model(self, checkpoint_id: str) -> NeuronModel:
        if not checkpoint_id:
            return self.source.model
        with self._lock:
            m = self._ck_cache.get(checkpoint_id)
        if m is None:
            m = self.source.checkpoint(checkpoint_id)
            with self._lock:
                if len(self._ck_cache) >= 2:
                    self._ck_cache.pop(next(iter(self._ck_cache)))
                self._ck_cache[checkpoint_id] = m
        return m

    def _images(self, req: pb.GetActivationsRequest, model: NeuronModel) -> np.ndarray:
        c, h, w = model.spec.input
        has_tensor = req.HasField("images") and len(req.images.shape) > 0
        if has_tensor and req.encoded_images:
            raise QueryError("send images either as a tensor or as encoded_images, not both")
        if req.encoded_images:
            n = len(req.encoded_images)
            if n > self.max_images:
                raise QueryError(f"too many images: {n}; at most {self.max_images} per request")
            items = []
            for i, data in enumerate(req.encoded_images):
                im = decode_image(data, c, i)
                if im.shape[1:] != (h, w):
                    raise QueryError(f"encoded_images[{i}] is {im.shape[1]}x{im.shape[2]}; the model takes "
                                     f"{h}x{w} (height x width)")
                items.append(im)
            x = np.stack(items)
        elif has_tensor:
            try:
                arr = codec.tensor_from_proto(req.images)
            except (ValueError, KeyError) as e:
                raise QueryError(f"images: {e}") from None
            if arr.ndim != 4:
                raise QueryError(f"images must be [batch, height, width, channels]; got shape {list(arr.shape)}")
            if arr.shape[0] > self.max_images:
                raise QueryError(f"too many images: {arr.shape[0]}; at most {self.max_images} per request")
            if tuple(arr.shape[1:]) != (h, w, c):
                raise QueryError(f"images are [{', '.join(map(str, arr.shape[1:]))}] (height, width, channels); "
                                 f"the model takes [{h}, {w}, {c}]")
            if arr.dtype == np.uint8:
                arr = arr.astype(np.float32) / 255.0
            elif arr.dtype == np.uint16:
                arr = arr.astype(np.float32) / 65535.0
            elif arr.dtype.kind != "f":
                raise QueryError(f"images of dtype {arr.dtype} are not supported; send uint8, uint16 or float")
            x = np.ascontiguousarray(np.moveaxis(arr.astype(np.float32), -1, 1))
        else:
            raise QueryError("no images: set images (a tensor) or encoded_images")
        if len(x) == 0:
            raise QueryError("no images: the batch is empty")
        if not np.all(np.isfinite(x)):
            raise QueryError("images contain NaN or Inf")
        if not req.raw:
            x = preprocess.normalize(x, self.source.normalize)
        return x

    def _unit(self, ref: pb.NeuronRef, model: NeuronModel) -> Unit:
        if not ref.layer:
            raise QueryError(f"a neuron needs a layer; layers: {', '.join(model.layers)}")
        u = Unit(ref.layer, ref.map, ref.y, ref.x)
        model.flat_index(u)
        return u

    def dataset_names(self) -> list[str]:
        from downpour.feeder import bundled

        return ["", *bundled.SPLITS, *self.extra_datasets]

    def _dataset(self, name: str, model: NeuronModel):
        from downpour.evals.common import preprocess_for
        from downpour.feeder import bundled
        from downpour.feeder.datasets import open_dataset

        if name in self.extra_datasets:
            uri = self.extra_datasets[name]
        elif name == "":
            uri = self.source.data
        elif name in bundled.SPLITS:
            uri = f"default:{name}"
        elif name.startswith("default:") and name.partition(":")[2] in bundled.SPLITS:
            uri = name
        else:
            allowed = ", ".join(repr(n) for n in self.dataset_names())
            raise QueryError(f"unknown dataset {name!r}; allowed: {allowed} (empty: the job's data)")
        spec = preprocess_for(model.spec, self.source.normalize)
        key = (uri, spec)
        with self._lock:
            ds = self._ds_cache.get(key)
        if ds is None:
            ds = open_dataset(uri, spec)
            with self._lock:
                self._ds_cache[key] = ds
        return ds

    @staticmethod
    def _fail(context, e: Exception):
        if isinstance(e, (QueryError, ValueError)):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if isinstance(e, KeyError):
            context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0] if e.args else e))
        if isinstance(e, sources.SourceError):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        raise e

    # -- RPCs -----------------------------------------------------------------------
    def GetActivations(self, request, context):
        try:
            model = self._model(request.checkpoint_id)
            x = self._images(request, model)
            resp = pb.GetActivationsResponse(parameters_version=model.version)
            if request.neurons:
                if request.layer or request.neuron_ids:
                    raise QueryError("give either neurons or layer (+ neuron_ids), not both")
                acts = model.activations(x, [self._unit(r, model) for r in request.neurons])
            else:
                if not request.layer:
                    raise QueryError(f"say which units: neurons, or a layer; layers: {', '.join(model.layers)}")
                shape = model.layer_shape(request.layer)
                n = int(np.prod(shape))
                ids = np.asarray(request.neuron_ids, np.int64) if request.neuron_ids else np.arange(n)
                bad = ids[(ids < 0) | (ids >= n)]
                if bad.size:
                    raise QueryError(f"neuron id {int(bad[0])} is outside layer {request.layer!r} of {n} units "
                                     f"([maps={shape[0]}, height={shape[1]}, width={shape[2]}])")
                acts = model.layer_activations(x, request.layer)[:, ids]
                resp.layer_shape.extend(shape)
                resp.neuron_ids.extend(int(i) for i in ids)
            resp.activations.CopyFrom(codec.tensor_to_proto(np.ascontiguousarray(acts, np.float32)))
            metrics.NEURONS_IMAGES.labels("GetActivations").inc(len(x))
            return resp
        except Exception as e:
            self._fail(context, e)

    def TopInputs(self, request, context):
        try:
            model = self._model(request.checkpoint_id)
            u = self._unit(request.neuron, model)
            k = request.k or 10
            if not 1 <= k <= MAX_K:
                raise QueryError(f"k={k} is out of range; allowed: 1..{MAX_K}")
            if request.max_examples < 0:
                raise QueryError(f"max_examples={request.max_examples} must be >= 0 (0: all)")
            ds = self._dataset(request.dataset, model)
            n = min(len(ds), request.max_examples or len(ds), self.max_scan)
            best_a: list[np.ndarray] = []
            best_i: list[np.ndarray] = []
            for start in range(0, n, 512):
                idx = np.arange(start, min(n, start + 512))
                x, _ = ds.get(idx)
                a = model.activations(x, [u])[:, 0]
                best_a.append(a)
                best_i.append(idx)
            a_all, i_all = np.concatenate(best_a), np.concatenate(best_i)
            order = np.argsort(-a_all, kind="stable")[:k]
            resp = pb.TopInputsResponse(examples_scanned=n, parameters_version=model.version)
            if len(order):
                xs, ys = ds.get(i_all[order])
                for j, o in enumerate(order):
                    s = resp.inputs.add(example_id=int(i_all[o]), activation=float(a_all[o]),
                                        label=int(ys[j]) if ys is not None else -1)
                    if request.include_images:
                        s.image.CopyFrom(codec.tensor_to_proto(np.ascontiguousarray(np.moveaxis(xs[j], 0, -1))))
                    if request.include_thumbnails:
                        s.thumbnail_png = png_bytes(xs[j])
            metrics.NEURONS_IMAGES.labels("TopInputs").inc(n)
            return resp
        except Exception as e:
            self._fail(context, e)

    def OptimalStimulus(self, request, context):
        try:
            model = self._model(request.checkpoint_id)
            u = self._unit(request.neuron, model)
            steps = request.steps or 200
            if not 1 <= steps <= MAX_STEPS:
                raise QueryError(f"steps={steps} is out of range; allowed: 1..{MAX_STEPS}")
            lr = request.learning_rate or 0.1
            if not (np.isfinite(lr) and lr > 0):
                raise QueryError(f"learning_rate={lr} must be a positive number")
            restarts = request.restarts or 8
            if not 1 <= restarts <= MAX_RESTARTS:
                raise QueryError(f"restarts={restarts} is out of range; allowed: 1..{MAX_RESTARTS}")
            norm = request.norm or 1.0
            if not (np.isfinite(norm) and norm > 0):
                raise QueryError(f"norm={norm} must be a positive number")
            r = model.optimal_stimulus(u, steps=steps, lr=lr, seed=request.seed, restarts=restarts, norm=norm)
            img = np.ascontiguousarray(np.moveaxis(r["stimulus"], 0, -1))
            return pb.OptimalStimulusResponse(
                stimulus=codec.tensor_to_proto(img), activation=r["activation"],
                random_activation_mean=r["random_mean"], random_activation_max=r["random_max"],
                parameters_version=model.version, png=png_bytes(r["stimulus"]))
        except Exception as e:
            self._fail(context, e)

    def DescribeModel(self, request, context):
        try:
            model = self._model(request.checkpoint_id)
            c, h, w = model.spec.input
            resp = pb.DescribeModelResponse(
                input_shape=[h, w, c], source=self.source.description, parameters_version=model.version,
                checkpoint_id=request.checkpoint_id or self.source.checkpoint_id, step=self.source.step,
                normalize=self.source.normalize, max_images=self.max_images,
                datasets=[d for d in self.dataset_names() if d],
                seconds_since_refresh=max(0.0, time.time() - self.source.refreshed_at))
            for name, shape in model.layers.items():
                resp.layers.add(name=name, shape=list(shape))
            return resp
        except Exception as e:
            self._fail(context, e)


# -- the command -------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="downpour serve neurons", description=__doc__.splitlines()[0])
    ServerConfig.add_arguments(ap, port=DEFAULT_PORT)
    g = ap.add_argument_group("parameters (one source)")
    g.add_argument("--coordinator", default="", help="a running job's coordinator: its shards, spec and checkpoints")
    g.add_argument("--shards", default="", help="comma-separated parameter shard addresses (live parameters)")
    g.add_argument("--checkpoint-dir", default="", help="committed checkpoints; with live shards: for checkpoint_id")
    g.add_argument("--params", default="", help=".npz file of named parameter blocks")
    g.add_argument("--random-seed", type=int, default=None, help="serve a seeded random initialisation")
    g.add_argument("--peer-ca", default="", help="PEM CA of the coordinator and shards (TLS)")
    g.add_argument("--peer-cert", default="", help="PEM client certificate for them (mutual TLS)")
    g.add_argument("--peer-key", default="", help="PEM client key for them (mutual TLS)")
    g.add_argument("--peer-token-file", default="", help="bearer token the coordinator and shards expect")
    ap.add_argument("--config", default="", help="job config (YAML): the model and its normalisation")
    ap.add_argument("--preset", default="", help="network preset when there is no --config (default small)")
    ap.add_argument("--refresh-seconds", type=float, default=5.0, help="re-pull live parameters this often (0: never)")
    ap.add_argument("--max-images", type=int, default=256, help="most images per GetActivations")
    ap.add_argument("--max-scan", type=int, default=20000, help="most examples one TopInputs scans")
    ap.add_argument("--dataset", action="append", default=[], metavar="NAME=PATH",
                    help="another dataset TopInputs may scan (repeatable)")
    ap.add_argument("--start-timeout", type=float, default=60.0, help="seconds to wait for the first parameters")
    ap.add_argument("--device", default="cpu", choices=devices.DEVICES,
                    help="compute device: cpu (NumPy) or gpu (CuPy, one CUDA GPU)")
    ap.add_argument("--log-level", default="info")
    return ap


def _channel_config(args: argparse.Namespace):
    """How this service calls the coordinator and the shards (TLS and token as they require).

    Without ``--peer-*`` flags it calls them as every other service calls its
    peers: with its own CA, certificate and token (``DOWNPOUR_TLS_*``, as
    ``downpour up --secure`` sets them).
    """
    from downpour.rpc.channel import ChannelConfig

    if not (args.peer_ca or args.peer_cert or args.peer_key or args.peer_token_file):
        return ServerConfig.from_args(args).channel_config()
    token = ""
    if args.peer_token_file:
        with open(args.peer_token_file, encoding="utf-8") as f:
            token = f.read().strip()
    return ChannelConfig(max_message_bytes=args.max_message_bytes, ca=args.peer_ca, cert=args.peer_cert,
                         key=args.peer_key, token=token)


def make_source(args: argparse.Namespace, xp=np) -> sources.Source:
    chosen = [n for n, v in (("--coordinator", args.coordinator), ("--shards", args.shards),
                             ("--params", args.params), ("--random-seed", args.random_seed is not None)) if v]
    if len(chosen) > 1:
        raise ValueError(f"choose one parameter source, got {', '.join(chosen)}")
    if args.coordinator:
        from downpour import config as jobconfig
        from downpour.rpc.channel import open_channel
        from downpour.v1 import coordinator_pb2, coordinator_pb2_grpc

        with open_channel(args.coordinator, _channel_config(args)) as ch:
            st = coordinator_pb2_grpc.CoordinatorStub(ch).JobStatus(coordinator_pb2.JobStatusRequest(), timeout=10.0,
                                                                    wait_for_ready=True)
        cfg = jobconfig.from_yaml(st.job.spec_yaml)
        return sources.ShardSource(list(st.shard_addresses), cfg, args.checkpoint_dir or st.job.checkpoint_dir,
                                   channel_config=_channel_config(args), xp=xp)
    if args.shards:
        cfg = sources.job_config_from(args.config, args.preset)
        return sources.ShardSource([s for s in args.shards.split(",") if s], cfg, args.checkpoint_dir,
                                   channel_config=_channel_config(args), xp=xp)
    cfg = sources.job_config_from(args.config, args.preset)
    kw = dict(normalize=cfg.normalize, data=cfg.data, checkpoint_dir=args.checkpoint_dir, xp=xp)
    if args.params:
        return sources.npz_source(args.params, cfg.network_spec(), **kw)
    if args.random_seed is not None:
        return sources.random_source(cfg.network_spec(), args.random_seed, **kw)
    if args.checkpoint_dir:
        return sources.CheckpointSource(args.checkpoint_dir, xp=xp)
    raise ValueError("no parameters: give --coordinator, --shards, --checkpoint-dir, --params or --random-seed")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
        source = make_source(args, xp)
    except (ValueError, OSError, sources.SourceError, grpc.RpcError) as e:
        print(f"neurons: {e}", file=sys.stderr)
        return 2
    svc = Neurons(source, max_images=args.max_images, max_scan=args.max_scan, datasets=extra)
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
    server.set_serving()
    server.wait()
    refresher.stop()
    source.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
