"""Refusals as data: the shard's status codes, and what a refused push applied and why.

A refused Push or PushPullShared ends with its status code (INVALID_ARGUMENT,
NOT_FOUND, ...) and, in the status details, a ``PushRefusal``: the blocks of
the push that are applied, and the refused block with a ``RefusalReason``.
Clients and tests read those fields (``refusal``), never the message, which is
for people and may change.

Why status details (google.rpc.Status through grpcio-status) and not fields
of PushResponse: a refused push has to stay a failed call. Its status code is
what every caller's error handling and retry policy act on (UNAVAILABLE is
retried, INVALID_ARGUMENT is not), and a failed gRPC call carries no response
message. The status details are gRPC's standard place for structured data
about a failure: any gRPC client, in any language, reads them from the
trailing metadata (``grpc-status-details-bin``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NoReturn

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status

from downpour.paramserver.store import StoreError
from downpour.v1 import paramserver_pb2 as pb

CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "exists": grpc.StatusCode.ALREADY_EXISTS,
    "precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "permission": grpc.StatusCode.PERMISSION_DENIED,
}


def reason_value(reason: str) -> pb.RefusalReason.ValueType:
    """The RefusalReason of a StoreError's ``reason`` ("not_finite" -> REFUSAL_REASON_NOT_FINITE)."""
    return pb.RefusalReason.Value(f"REFUSAL_REASON_{reason.upper()}")


def reason_name(value: int) -> str:
    """The inverse of ``reason_value``: REFUSAL_REASON_NOT_FINITE -> "not_finite"."""
    return pb.RefusalReason.Name(value).removeprefix("REFUSAL_REASON_").lower()  # type: ignore[arg-type]  # any int a peer sent


def abort(context: Any, error: StoreError, applied: Iterable[str] | None = None) -> NoReturn:
    """End the call with ``error``'s status; for a push (``applied`` given) with a PushRefusal too."""
    code = CODES.get(error.kind, grpc.StatusCode.INVALID_ARGUMENT)
    if applied is None:
        context.abort(code, str(error))
        raise AssertionError("context.abort returned")  # it raises; this tells the type checker
    done = list(applied)
    message = f"{error}" + (f"; blocks completed before it were applied: {done}" if done else "")
    detail = pb.PushRefusal(
        applied=done,
        refused=[pb.BlockRefusal(block=error.block, reason=reason_value(error.reason), message=str(error))],
    )
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(detail)
    context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("context.abort_with_status returned")


def refusal(error: grpc.RpcError) -> pb.PushRefusal | None:
    """The PushRefusal a refused push's error carries; None for any other error."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]  # a failed call's RpcError is also its grpc.Call
    except (AttributeError, ValueError):  # not a call's error, or details that do not match the status
        return None
    if status is None:
        return None
    for any_ in status.details:
        if any_.Is(pb.PushRefusal.DESCRIPTOR):
            out = pb.PushRefusal()
            any_.Unpack(out)
            return out
    return None
