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
source, the same code ``downpour.load`` runs in process; the servicer
(``downpour.neurons.service``) only translates messages. Bad requests (unknown
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
import hmac
import logging
import sys
import threading

import grpc

from downpour import device as devices
from downpour import metrics
from downpour.neurons import access, images, limits, source_args, sources
from downpour.neurons.service import DEFAULT_DECODING, DEFAULT_QUEUED, DEFAULT_RUNNING, Neurons
from downpour.rpc import logs
from downpour.rpc.server import Server, ServerConfig
from downpour.v1 import neurons_pb2_grpc

SERVICE = "downpour.v1.Neurons"
DEFAULT_PORT = 7300
# Freed blocks at least this large go back to the system at once (see _return_large_frees).
MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 64 << 20  # free heap top kept before it is returned (see _return_large_frees)


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
        # Pinning it also pins the trim threshold at its 128 KiB default, so freed heap tops are
        # handed back and faulted in again query after query (GetActivations under 32 clients:
        # 214-218 req/s pinned, 224-228 with this, 229-234 without any mallopt); what is under
        # the mmap threshold may stay, as it did before.
        mallopt(-1, TRIM_THRESHOLD)  # M_TRIM_THRESHOLD


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
    try:
        extra = source_args.parse_datasets(args.dataset)
    except ValueError as e:
        print(f"neurons: {e}", file=sys.stderr)
        return 2
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
