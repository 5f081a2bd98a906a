"""What deploy/compose/secure.yml runs, without Docker: credentials from ``downpour.rpc.issue``,
a service configured by DOWNPOUR_* variables alone, and the container health check, which used
to read TLS settings from the service's flags only (a service set up by variables was checked
in plaintext and never turned healthy)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

pytest.importorskip("cryptography")

from downpour.rpc import issue
from downpour.rpc.channel import ChannelConfig, open_channel, read_token
from downpour.v1 import paramserver_pb2

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _list_blocks(ch):
    return ch.unary_unary(
        "/downpour.v1.ParameterServer/ListBlocks",
        request_serializer=paramserver_pb2.ListBlocksRequest.SerializeToString,
        response_deserializer=paramserver_pb2.ListBlocksResponse.FromString,
    )(paramserver_pb2.ListBlocksRequest(), timeout=10)


def test_issued_credentials_run_a_service_set_up_by_variables_and_its_health_check(tmp_path, procs):
    d = tmp_path / "secrets"
    assert issue.main([str(d), "--names", "paramserver-0,localhost,127.0.0.1"]) == 0
    env = {
        "DOWNPOUR_TLS_CERT": str(d / "tls" / "node.pem"),
        "DOWNPOUR_TLS_KEY": str(d / "tls" / "node.key"),
        "DOWNPOUR_TLS_CA": str(d / "tls" / "ca.pem"),
        "DOWNPOUR_TLS_CLIENT_CA": str(d / "tls" / "ca.pem"),
        "DOWNPOUR_ROLES_FILE": str(d / "tls" / "roles"),
        "DOWNPOUR_TOKEN_FILE": str(d / "token-paramserver" / "token"),
    }
    op = d / "operator"
    admin = ChannelConfig(
        ca=str(op / "ca.pem"), cert=str(op / "client.pem"), key=str(op / "client.key"),
        token=read_token(str(op / "token-admin")),
    )  # fmt: skip
    p = procs.serve("paramserver", env=env, channel_config=admin)
    with open_channel(p.address, admin) as ch:
        assert _list_blocks(ch).shard_index == 0  # the operator's certificate and the admin token
    reader = ChannelConfig(ca=admin.ca, cert=admin.cert, key=admin.key, token=read_token(str(op / "token-reader")))
    with open_channel(p.address, reader) as ch, pytest.raises(grpc.RpcError) as e:
        _list_blocks(ch)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    check = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "docker" / "healthcheck.py"), "--timeout", "5"],
        env={**os.environ, **env, "HEALTHCHECK_PID": str(p.pid), "HEALTHCHECK_PORT": str(p.port)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SERVING" in check.stdout
