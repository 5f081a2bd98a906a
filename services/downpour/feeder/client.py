"""Client of the data feeder: a minibatch iterator that survives feeder restarts.

    for x, y in batch_stream("127.0.0.1:7060", replica=0, num_replicas=2, batch_size=32):
        ...  # x: float32 (B, C, H, W); y: int64 (B,) with with_labels=True, else None

The stream asks for batch ``start_batch`` on. When the feeder goes away
(crash, restart, network) the iterator reconnects with exponential backoff on
a fresh channel and asks for the first batch it has not yet yielded, so the
caller waits and then goes on with the same sequence: no batch is skipped or
repeated. It gives up with ``FeederUnavailable`` once the feeder has been
unreachable for ``reconnect_timeout`` seconds without delivering a batch.
Requests the feeder rejects (INVALID_ARGUMENT, FAILED_PRECONDITION, ...) are
raised at once as ``grpc.RpcError``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import grpc
import numpy as np

from downpour.rpc.channel import ChannelConfig, open_channel
from downpour.rpc.codec import tensor_from_proto
from downpour.v1 import feeder_pb2 as pb
from downpour.v1 import feeder_pb2_grpc

log = logging.getLogger("downpour.feeder.client")

# Failures that a restarted or reachable-again feeder cures.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

Batch = tuple[np.ndarray, "np.ndarray | None"]


class FeederUnavailable(ConnectionError):
    """The feeder stayed unreachable for longer than the reconnect deadline."""


def batch_stream(
    address: str,
    replica: int,
    num_replicas: int,
    batch_size: int,
    start_batch: int = 0,
    with_labels: bool = False,
    seed: int = 0,
    channel_config: ChannelConfig | None = None,
    *,
    split: int = pb.SPLIT_TRAIN,
    max_batches: int = 0,
    deterministic: bool = False,
    reconnect_timeout: float = 120.0,
    backoff_initial: float = 0.05,
    backoff_max: float = 2.0,
) -> Iterator[Batch]:
    """Minibatches ``(x, y)`` of shard ``replica`` of ``num_replicas``, from ``start_batch`` on.

    ``max_batches`` > 0 ends the iterator after that many batches; 0 streams
    forever. ``y`` is None unless ``with_labels``. Reconnects as the module
    docstring says; the backoff doubles from ``backoff_initial`` up to
    ``backoff_max`` seconds between attempts.
    """
    next_batch = int(start_batch)
    end = next_batch + int(max_batches) if max_batches > 0 else None
    failing_since: float | None = None
    delay = backoff_initial
    while end is None or next_batch < end:
        req = pb.StreamBatchesRequest(
            replica=replica,
            num_replicas=num_replicas,
            batch_size=batch_size,
            split=pb.Split.ValueType(split),
            seed=seed,
            max_batches=(end - next_batch) if end is not None else 0,
            start_batch=next_batch,
            with_labels=with_labels,
            deterministic=deterministic,
        )
        channel = open_channel(address, channel_config)
        call = None
        try:
            call = feeder_pb2_grpc.DataFeederStub(channel).StreamBatches(req)
            for resp in call:
                if resp.batch_index != next_batch:
                    raise RuntimeError(f"feeder {address} sent batch {resp.batch_index}, expected {next_batch}")
                x = tensor_from_proto(resp.examples)
                y = tensor_from_proto(resp.labels) if with_labels else None
                next_batch += 1
                failing_since, delay = None, backoff_initial
                yield x, y
            if end is not None and next_batch >= end:
                return
            # The stream ended early (the feeder is shutting down): resume on a new one.
            raise _Interrupted()
        except (grpc.RpcError, _Interrupted) as e:
            code = e.code() if isinstance(e, grpc.RpcError) else grpc.StatusCode.UNAVAILABLE
            if code not in RETRYABLE:
                raise
            now = time.monotonic()
            failing_since = now if failing_since is None else failing_since
            if now - failing_since > reconnect_timeout:
                detail = e.details() if isinstance(e, grpc.RpcError) else "stream ended early"
                raise FeederUnavailable(
                    f"feeder {address} unreachable for {now - failing_since:.0f}s "
                    f"(last: {code.name}: {detail}); next batch was {next_batch}"
                ) from None
            log.warning("feeder %s: %s; reconnecting in %.2fs at batch %d", address, code.name, delay, next_batch)
            time.sleep(delay)
            delay = min(backoff_max, delay * 2)
        finally:
            if call is not None:
                call.cancel()  # also when the caller stops iterating
            channel.close()


class _Interrupted(Exception):
    pass


def dataset_info(
    address: str, split: int = pb.SPLIT_TRAIN, channel_config: ChannelConfig | None = None, timeout: float = 10.0
) -> pb.DatasetInfoResponse:
    """What the feeder serves for ``split``: name, num_examples, shape, classes."""
    with open_channel(address, channel_config) as channel:
        return feeder_pb2_grpc.DataFeederStub(channel).DatasetInfo(
            pb.DatasetInfoRequest(split=pb.Split.ValueType(split)), timeout=timeout, wait_for_ready=True
        )
