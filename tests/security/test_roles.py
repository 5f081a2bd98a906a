"""Roles: each process holds its own role's token, and a role may call only what
``downpour.rpc.rights`` allows it, against real services.

Every service used to accept one shared token: the neurons service, which decodes untrusted
images, held the same credential as the coordinator and could InitBlocks(overwrite), Restore,
SetOptimizer or Checkpoint the shards; any worker could CreateCheckpoint on the coordinator.
"""

from __future__ import annotations

import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

import harness
from downpour.paramserver.client import ParamClient
from downpour.rpc import certs, rights
from downpour.rpc.channel import ChannelConfig, open_channel, read_token
from downpour.v1 import coordinator_pb2, neurons_pb2, paramserver_pb2

pytestmark = pytest.mark.slow

PS = "/downpour.v1.ParameterServer/"
DENIED = grpc.StatusCode.PERMISSION_DENIED


def _unary(ch, method, request, response_type, timeout=10.0):
    call = ch.unary_unary(method, request_serializer=type(request).SerializeToString,
                          response_deserializer=response_type.FromString)  # fmt: skip
    return call(request, timeout=timeout)


def _shard_calls(ch):
    """Every ParameterServer RPC as a hostile client sends it: name -> a call of it."""
    pb = paramserver_pb2

    def pull():
        stream = ch.unary_stream(PS + "Pull", request_serializer=pb.PullRequest.SerializeToString,
                                 response_deserializer=None)(pb.PullRequest(), timeout=10)  # fmt: skip
        return list(stream)

    def client_stream(name, request):
        call = ch.stream_unary(PS + name, request_serializer=type(request).SerializeToString,
                               response_deserializer=None)  # fmt: skip
        return call(iter([request]), timeout=10)

    return {
        "InitBlocks": lambda: _unary(
            ch, PS + "InitBlocks", pb.InitBlocksRequest(overwrite=True), pb.InitBlocksResponse
        ),
        "Restore": lambda: _unary(ch, PS + "Restore", pb.RestoreRequest(checkpoint_id="x"), pb.RestoreResponse),
        "SetOptimizer": lambda: _unary(ch, PS + "SetOptimizer", pb.SetOptimizerRequest(), pb.SetOptimizerResponse),
        "Checkpoint": lambda: _unary(
            ch, PS + "Checkpoint", pb.CheckpointRequest(checkpoint_id="x"), pb.CheckpointResponse
        ),  # fmt: skip
        "CreateBlocks": lambda: client_stream("CreateBlocks", pb.CreateBlocksRequest()),
        "Push": lambda: client_stream("Push", pb.PushRequest()),
        "AttachShared": lambda: _unary(ch, PS + "AttachShared", pb.AttachSharedRequest(), pb.AttachSharedResponse),
        "PushPullShared": lambda: _unary(
            ch, PS + "PushPullShared", pb.PushPullSharedRequest(), pb.PushPullSharedResponse
        ),  # fmt: skip
        "ListBlocks": lambda: _unary(ch, PS + "ListBlocks", pb.ListBlocksRequest(), pb.ListBlocksResponse),
        "Pull": pull,
    }


WRITES = ("InitBlocks", "Restore", "SetOptimizer", "Checkpoint", "CreateBlocks", "Push", "AttachShared",
          "PushPullShared")  # fmt: skip


def test_a_shard_lets_each_role_call_only_its_rights_and_counts_the_rest(tmp_path, procs):
    creds = rights.write_role_credentials(tmp_path / "creds")
    token = {role: read_token(creds[role]) for role in rights.ROLES}
    p = procs.serve("paramserver", "--roles-file", creds["roles_file"], "--checkpoint-dir", str(tmp_path / "ck"),
                    metrics=True)  # fmt: skip
    with ParamClient([p.address], channel_config=ChannelConfig(token=token["admin"])) as admin:
        admin.init({"w": np.ones(8, np.float32)})  # admin may call everything
    with open_channel(p.address, ChannelConfig(token=token["neurons"])) as ch:
        calls = _shard_calls(ch)
        for name in WRITES:
            assert harness.status_code(calls[name]) == DENIED, name
        assert harness.status_code(calls["ListBlocks"]) == grpc.StatusCode.OK
        assert harness.status_code(calls["Pull"]) == grpc.StatusCode.OK
    with ParamClient([p.address], placement={"w": 0}, channel_config=ChannelConfig(token=token["neurons"])) as c:
        np.testing.assert_array_equal(c.pull(["w"])["w"], np.ones(8, np.float32))  # the neurons role reads
    for role in ("reader", "feeder", "paramserver"):
        with open_channel(p.address, ChannelConfig(token=token[role])) as ch:
            for name, call in _shard_calls(ch).items():
                assert harness.status_code(call) == DENIED, (role, name)
    with open_channel(p.address, ChannelConfig(token=token["worker"])) as ch:
        calls = _shard_calls(ch)
        for name in ("InitBlocks", "Restore", "SetOptimizer", "Checkpoint", "CreateBlocks"):
            assert harness.status_code(calls[name]) == DENIED, ("worker", name)
        assert harness.status_code(calls["Pull"]) == grpc.StatusCode.OK
    # a token of no role is still unauthenticated, not merely denied
    with open_channel(p.address, ChannelConfig(token=token["admin"] + "x")) as ch:
        assert harness.status_code(_shard_calls(ch)["ListBlocks"]) == grpc.StatusCode.UNAUTHENTICATED
    name = "downpour_grpc_permission_denied_total"
    assert p.metric(name, role="neurons", grpc_method="InitBlocks") == 1
    assert p.metric(name, role="neurons") == len(WRITES)
    assert p.metric(name, role="reader") == len(_shard_calls(None))
    assert p.metric("downpour_grpc_unauthenticated_total", reason="bad_token") == 1


def _held_token(pid: int) -> str:
    """The token a running child was given: what a compromised child could send."""
    env = dict(
        kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv
    )  # fmt: skip
    return read_token(env["DOWNPOUR_TOKEN_FILE"])


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads a child's environment from /proc")
def test_in_a_secure_cluster_each_child_holds_only_its_role(tmp_path, procs):
    out = tmp_path / "run"
    up = procs.up(out, "--secure", "--quiet", *harness.TINY_CLUSTER, "--steps", "100000")
    cl = harness.wait_for(lambda: "neurons" in harness.cluster(out) and harness.cluster(out), 120,
                          "the whole cluster started", procs=[up])  # fmt: skip
    tls = out / "tls"

    def cfg(token: str) -> ChannelConfig:
        return ChannelConfig(ca=str(tls / "ca.pem"), cert=str(tls / "node.pem"), key=str(tls / "node.key"), token=token)

    neurons_token = _held_token(cl["neurons"]["pid"])
    worker_token = _held_token(cl["worker-0"]["pid"])

    # The neurons service's own credential cannot write to a shard, but it can read.
    with open_channel(cl["paramserver-0"]["address"], cfg(neurons_token)) as ch:
        calls = _shard_calls(ch)
        for name in WRITES:
            assert harness.status_code(calls[name]) == DENIED, name
        assert harness.status_code(calls["ListBlocks"]) == grpc.StatusCode.OK
        assert harness.status_code(calls["Pull"]) == grpc.StatusCode.OK
    assert neurons_token != worker_token
    # A worker cannot checkpoint the job or list its checkpoints.
    coord = cl["coordinator"]["address"]
    cpb = coordinator_pb2
    with open_channel(coord, cfg(worker_token)) as ch:
        create = lambda: _unary(ch, "/downpour.v1.Coordinator/CreateCheckpoint", cpb.CreateCheckpointRequest(),
                                cpb.CreateCheckpointResponse, 60)  # fmt: skip
        listing = lambda: _unary(ch, "/downpour.v1.Coordinator/ListCheckpoints", cpb.ListCheckpointsRequest(),
                                 cpb.ListCheckpointsResponse)  # fmt: skip
        assert harness.status_code(create) == DENIED
        assert harness.status_code(listing) == DENIED
    # A reader queries the neurons service, and nothing else.
    reader_token = read_token(str(tls / "token-reader"))
    assert oct((tls / "token-reader").stat().st_mode & 0o777) == "0o600"
    with open_channel(cl["neurons"]["address"], cfg(reader_token)) as ch:
        describe = lambda: _unary(ch, "/downpour.v1.Neurons/DescribeModel", neurons_pb2.DescribeModelRequest(),
                                  neurons_pb2.DescribeModelResponse)  # fmt: skip
        layers = harness.wait_for(lambda: describe().layers, 120, "the neurons service to answer a reader",
                                  procs=[up], ignore=(grpc.RpcError,))  # fmt: skip
        assert layers
    with open_channel(coord, cfg(reader_token)) as ch:
        status = lambda: _unary(ch, "/downpour.v1.Coordinator/JobStatus", cpb.JobStatusRequest(), cpb.JobStatusResponse)
        assert harness.status_code(status) == DENIED
    for shard in ("paramserver-0", "paramserver-1"):
        with open_channel(cl[shard]["address"], cfg(reader_token)) as ch:
            for name, call in _shard_calls(ch).items():
                assert harness.status_code(call) == DENIED, (shard, name)
    # The launcher (admin) still may, and the run trained on meanwhile.
    admin = cfg(read_token(str(tls / "token-admin")))
    with open_channel(coord, admin) as ch:
        st = harness.wait_for(
            lambda: (
                (
                    s := _unary(ch, "/downpour.v1.Coordinator/JobStatus", cpb.JobStatusRequest(), cpb.JobStatusResponse)
                ).step
                > 0
                and s
            ),  # fmt: skip
            120,
            "training steps",
            procs=[up],
        )
        assert st.state in (cpb.JOB_STATE_RUNNING, cpb.JOB_STATE_DEGRADED)


def _page(url: str, token: str, ctx) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=60, context=ctx) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_with_a_roles_file_the_explorer_page_takes_only_its_session_token(tmp_path, procs):
    """The page has a session of its own: no role's service token opens it, a reader's and admin's
    included, and the session token does (it is never any role's token)."""
    pki = certs.make_cluster_pki(tmp_path / "tls", token=False)
    creds = rights.write_role_credentials(tmp_path / "creds")
    token = {role: read_token(creds[role]) for role in rights.ROLES}
    session = tmp_path / "session"
    session.write_text("explorer-session-" + "s" * 32)
    port = harness.free_port()
    flags = ["--tls-cert", pki["cert"], "--tls-key", pki["key"], "--roles-file", creds["roles_file"],
             "--token-file", creds["neurons"], "--preset", "tiny", "--random-seed", "3", "--http-port", str(port),
             "--http-session-token-file", str(session)]  # fmt: skip
    p = procs.serve("neurons", *flags, wait=False)
    harness.wait_for(lambda: harness.accepts(port), 60, "the explorer page", procs=[p])
    ctx = ssl.create_default_context(cafile=pki["ca"])
    url = f"https://127.0.0.1:{port}/api/model"
    for role in rights.ROLES:
        assert _page(url, token[role], ctx) == 401, role
    assert _page(url, "", ctx) == 401
    assert _page(url, session.read_text(), ctx) == 200
