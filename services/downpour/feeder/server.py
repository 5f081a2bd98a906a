"""The data feeder service: streams preprocessed minibatches to model replicas.

    downpour serve feeder --config job.yaml [--port 7060] [--metrics-port M]
                          [--data PATH] [--shape C,H,W] [--normalize MODE] [--prefetch N]

What it serves
  Examples are shaped as the model's input (``network_spec().input``, C x H x
  W: channels and size) and normalised as the job's ``normalize`` says; they
  go out as float32 (B, C, H, W) tensors, labels as int64 (B,).

  TRAIN split: the dataset (``--data``, else the job's ``data``). For
  ``default`` that is the bundled ``train`` split.
  TEST split: held-out data. For ``default`` the bundled ``heldout`` split
  (300 labelled examples: faces 1, non-faces and distractors 0). For any other
  dataset a deterministic 10% of its indices is held out of TRAIN and served
  as TEST: the first ``n // 10`` of a permutation of ``range(n)`` drawn from a
  fixed seed (``HOLDOUT_SEED``), so it never depends on the job's seed and a
  restarted feeder holds out the same examples. Datasets of fewer than 10
  examples have no TEST split (everything is TRAIN).

Streams
  Replica r of R sees a disjoint, deterministic shard of the split
  (``downpour.feeder.sharding``): shuffled epochs seeded by the request's seed,
  or, with ``deterministic``, the shard in index order every epoch. Batch
  ``b`` of a stream starts at example ``b * batch_size`` of that endless
  sequence, so ``start_batch`` resumes exactly where a previous stream
  stopped. A background thread per stream prepares batches into a queue of
  ``--prefetch`` batches and blocks when it is full (the client is slower than
  the feeder); gRPC's flow control holds back the rest. A cancelled stream
  stops its thread.

Files that cannot be decoded are skipped (their slot is filled by the next
readable example), logged once and counted in
``downpour_feeder_skipped_files_total``. A missing or empty dataset stops the
feeder at start-up with exit code 2 and a message naming the path.
"""

from __future__ import annotations

import argparse
import logging
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NoReturn

import grpc
import numpy as np

from downpour import config as jobconfig
from downpour import metrics
from downpour.feeder import sharding
from downpour.feeder.preprocess import NORMALIZE_MODES, PreprocessSpec
from downpour.feeder.splits import SkipCounter, Split, StartupError, load_splits
from downpour.rpc.codec import tensor_to_proto
from downpour.rpc.server import Server, ServerConfig
from downpour.v1 import feeder_pb2 as pb
from downpour.v1 import feeder_pb2_grpc

log = logging.getLogger("downpour.feeder")

SERVICE = "downpour.v1.DataFeeder"
DEFAULT_PORT = 7060
MAX_BATCH_SIZE = 4096
MAX_START_BATCH = 1 << 40  # batch indices seed random generators: keep them far from 2**63
# How often a waiting stream or producer looks at whether it should stop.
POLL_SECONDS = 0.1


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """``context.abort``, typed as what it does: it always raises."""
    context.abort(code, details)
    raise AssertionError("grpc's context.abort returned")  # never reached: abort raises


@dataclass
class _Failed:
    error: BaseException


class _End:
    """The producer's last item: every batch asked for has been queued."""


_END = _End()
_Item = pb.StreamBatchesResponse | _Failed | _End


class _Producer:
    """Prepares one stream's responses on a background thread into a bounded queue."""

    def __init__(self, split: Split, req: pb.StreamBatchesRequest, prefetch: int) -> None:
        self.split, self.req = split, req
        self.queue: queue.Queue[_Item] = queue.Queue(maxsize=max(1, prefetch))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"feeder-r{req.replica}of{req.num_replicas}")
        seed = None if req.deterministic else int(req.seed)
        self.shard = split.indices[sharding.shard_indices(len(split), req.replica, req.num_replicas, seed)]

    def index_batches(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(batch_index, epoch, dataset indices) from ``start_batch`` on."""
        req, shard = self.req, self.shard
        b, n, size = int(req.start_batch), len(shard), int(req.batch_size)
        end = b + int(req.max_batches) if req.max_batches > 0 else None
        offset = b * size
        epoch, pos = divmod(offset, n)
        order = self._epoch(epoch)
        while end is None or b < end:
            first_epoch = epoch
            parts, need = [], size
            while need:
                take = order[pos : pos + need]
                parts.append(take)
                need -= len(take)
                pos += len(take)
                if pos == n:
                    epoch, pos = epoch + 1, 0
                    order = self._epoch(epoch)
            yield b, first_epoch, np.concatenate(parts)
            b += 1

    def _epoch(self, epoch: int) -> np.ndarray:
        if self.req.deterministic:
            return self.shard
        return sharding.epoch_order(self.shard, epoch, int(self.req.seed), int(self.req.replica))

    def _put(self, item: _Item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        req, ds = self.req, self.split.dataset
        try:
            for b, epoch, idx in self.index_batches():
                if self.stop.is_set():
                    return
                rng = np.random.default_rng([int(req.seed), int(req.replica), b])
                x, y = ds.get(idx, rng=rng)
                resp = pb.StreamBatchesResponse(
                    batch_index=b, epoch=epoch, examples=tensor_to_proto(x), example_ids=idx.tolist()
                )
                if req.with_labels and y is not None:
                    resp.labels.CopyFrom(tensor_to_proto(np.asarray(y, np.int64)))
                if not self._put(resp):
                    return
            self._put(_END)
        except Exception as e:  # reported to the client as INTERNAL
            log.exception("producer for replica %d failed", req.replica)
            self._put(_Failed(e))

    def get(self, active: Callable[[], bool]) -> _Item | None:
        """The next item, or None once ``active()`` turns false."""
        while active() and not self.stop.is_set():
            try:
                item = self.queue.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            return item
        return None

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=30.0)  # it sees `stop` within POLL_SECONDS of its current batch
        while True:  # release what the stream will never send
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break


class Feeder(feeder_pb2_grpc.DataFeederServicer):
    def __init__(self, splits: dict[int, Split], prefetch: int = 4, data: str = "") -> None:
        self.splits = splits
        self.prefetch = prefetch
        self.data = data
        self._producers: set[_Producer] = set()
        self._lock = threading.Lock()

    def queue_depth(self) -> int:
        """Batches prepared and not yet handed to gRPC, over all open streams."""
        with self._lock:
            return sum(p.queue.qsize() for p in self._producers)

    def _split(self, value: int, context: grpc.ServicerContext) -> Split | None:
        which = pb.SPLIT_TRAIN if value == pb.SPLIT_UNSPECIFIED else value
        if which not in (pb.SPLIT_TRAIN, pb.SPLIT_TEST):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"split: unknown value {value}")
        return self.splits.get(which)

    def _validate(self, req: pb.StreamBatchesRequest, context: grpc.ServicerContext) -> Split:
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if req.num_replicas < 1:
            context.abort(bad, f"num_replicas must be >= 1, got {req.num_replicas}")
        if not 0 <= req.replica < req.num_replicas:
            context.abort(bad, f"replica must be in [0, {req.num_replicas}), got {req.replica}")
        if not 1 <= req.batch_size <= MAX_BATCH_SIZE:
            context.abort(bad, f"batch_size must be in [1, {MAX_BATCH_SIZE}], got {req.batch_size}")
        if req.max_batches < 0:
            context.abort(bad, f"max_batches must be >= 0 (0: endless), got {req.max_batches}")
        if not 0 <= req.start_batch <= MAX_START_BATCH:
            context.abort(bad, f"start_batch must be in [0, {MAX_START_BATCH}], got {req.start_batch}")
        split = self._split(req.split, context)
        pre = grpc.StatusCode.FAILED_PRECONDITION
        if split is None:
            _abort(context, pre, "split: this dataset has no TEST split (fewer than 10 examples)")
        if req.with_labels and not split.labelled:
            context.abort(pre, f"with_labels: dataset {split.name} has no labels")
        if req.num_replicas > len(split):
            context.abort(
                pre, f"num_replicas: {req.num_replicas} replicas but {split.name} holds only {len(split)} examples"
            )
        return split

    def StreamBatches(
        self, request: pb.StreamBatchesRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.StreamBatchesResponse]:
        split = self._validate(request, context)
        producer = _Producer(split, request, self.prefetch)
        context.add_callback(producer.stop.set)  # the client went away or the RPC ended
        label = "test" if split is self.splits.get(pb.SPLIT_TEST) else "train"
        with self._lock:
            self._producers.add(producer)
        metrics.FEEDER_STREAMS.inc()
        producer.thread.start()
        log.info(
            "stream: replica %d/%d, %s, batch %d from %d, %s",
            request.replica,
            request.num_replicas,
            split.name,
            request.batch_size,
            request.start_batch,
            f"{request.max_batches} batches" if request.max_batches else "endless",
        )
        try:
            while True:
                item = producer.get(context.is_active)
                if item is None or isinstance(item, _End):
                    return
                if isinstance(item, _Failed):
                    _abort(context, grpc.StatusCode.INTERNAL, f"preparing a batch failed: {item.error}")
                yield item
                metrics.FEEDER_BATCHES.labels(label).inc()
                metrics.FEEDER_EXAMPLES.labels(label).inc(request.batch_size)
        finally:
            producer.close()
            with self._lock:
                self._producers.discard(producer)
            metrics.FEEDER_STREAMS.dec()

    def DatasetInfo(self, request: pb.DatasetInfoRequest, context: grpc.ServicerContext) -> pb.DatasetInfoResponse:
        split = self._split(request.split, context)
        if split is None:  # no TEST split: nothing to serve
            train = self.splits[pb.SPLIT_TRAIN]
            c, h, w = train.dataset.shape
            return pb.DatasetInfoResponse(name=f"{self.data}:test", num_examples=0, channels=c, height=h, width=w)
        c, h, w = split.dataset.shape
        return pb.DatasetInfoResponse(
            name=split.name,
            num_examples=len(split),
            height=h,
            width=w,
            channels=c,
            num_classes=split.dataset.num_classes,
            class_names=split.class_names,
        )


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape must be C,H,W (e.g. 1,32,32), got {text!r}") from None
    if min(c, h, w) < 1:
        raise argparse.ArgumentTypeError(f"--shape must be positive, got {text!r}")
    return c, h, w


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="downpour serve feeder", description=__doc__.splitlines()[0])
    ServerConfig.add_arguments(ap, port=DEFAULT_PORT)
    ap.add_argument(
        "--config",
        help="the job spec (YAML): data, input shape, normalize; required unless --data and --shape are given",
    )
    ap.add_argument(
        "--data", help="dataset, overriding the job's: 'default', a folder of images, .npy/.npz or an IDX file"
    )
    ap.add_argument("--shape", type=parse_shape, help="example shape C,H,W (default: the model's input)")
    ap.add_argument("--normalize", choices=NORMALIZE_MODES, help="per-example normalisation (default: the job's)")
    ap.add_argument("--prefetch", type=int, default=4, help="batches prepared ahead per stream (default 4)")
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s feeder %(levelname)s %(name)s: %(message)s"
    )
    if not args.config and not (args.data and args.shape):
        ap.error("--config is required unless both --data and --shape are given")
    if args.prefetch < 1:
        ap.error(f"--prefetch must be >= 1, got {args.prefetch}")
    try:
        cfg = jobconfig.load(args.config, env={}) if args.config else jobconfig.JobConfig()
        shape = args.shape or tuple(cfg.network_spec().input)
        spec = PreprocessSpec(
            channels=shape[0], size=(shape[1], shape[2]), normalize=args.normalize or cfg.normalize, seed=cfg.seed
        )
    except (OSError, ValueError) as e:
        ap.error(str(e))
    data = args.data or cfg.data
    skips = SkipCounter()
    try:
        splits = load_splits(data, spec, skips)
    except StartupError as e:
        print(f"downpour serve feeder: {e}", file=sys.stderr, flush=True)
        return 2
    for s in splits.values():
        log.info(
            "%s: %d examples of %s, %d classes",
            s.name,
            len(s),
            "x".join(map(str, s.dataset.shape)),
            s.dataset.num_classes,
        )
    feeder = Feeder(splits, args.prefetch, data)
    metrics.FEEDER_QUEUE_DEPTH.set_function(feeder.queue_depth)
    server = Server("feeder", ServerConfig.from_args(args))
    server.add(lambda s: feeder_pb2_grpc.add_DataFeederServicer_to_server(feeder, s), SERVICE)
    port = server.start()
    print(f"feeder listening on port {port}", file=sys.stderr, flush=True)
    server.set_serving()
    server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
