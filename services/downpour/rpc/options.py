"""gRPC channel and server options both ends share (message limits, reconnects, keepalive).

Kept apart from ``server`` and ``channel`` so that each can import it without importing the other.
"""

from __future__ import annotations

from typing import Any

KEEPALIVE_MS = 5000
KEEPALIVE_TIMEOUT_MS = 5000


def grpc_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Channel/server options shared by both ends."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
        # A restarted peer (same address) is found again within a couple of
        # seconds, not after gRPC's default reconnect backoff of up to 120 s.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        # Keepalive: an HTTP/2 ping every KEEPALIVE_MS, answered within KEEPALIVE_TIMEOUT_MS or the
        # connection is closed and its calls fail UNAVAILABLE. A half-open connection (a peer that
        # is stopped, or a link that silently drops everything) is noticed in seconds, not when a
        # call's own deadline runs out. Both ends send and accept these pings, with or without calls.
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Accept the peer's pings at this rate (the default, 5 min, would answer ours with GOAWAY).
        ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
    ]
