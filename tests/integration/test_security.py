"""Security: TLS and mutual TLS, bearer tokens, message-size and concurrency limits, on real processes.

The tests make their own CA and certificates (``downpour.rpc.certs``, on the
``cryptography`` package).
"""

from __future__ import annotations

import json

import grpc
import pytest

import harness

pytest.importorskip("cryptography")

from downpour.rpc import certs, rights
from downpour.rpc.channel import ChannelConfig, open_channel
from downpour.v1 import feeder_pb2, feeder_pb2_grpc, paramserver_pb2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key = certs.make_ca("test CA")
    ca_pem, _ = certs.write_pair(d, "ca", ca, ca_key)
    node, node_key = certs.issue(ca, ca_key, "node")
    node_pem, node_keyf = certs.write_pair(d, "node", node, node_key)
    other, other_key = certs.issue(ca, ca_key, "intruder")  # right CA, a name that is not let in
    other_pem, other_keyf = certs.write_pair(d, "intruder", other, other_key)
    rogue_ca, rogue_ca_key = certs.make_ca("rogue CA")
    rogue, rogue_key = certs.issue(rogue_ca, rogue_ca_key, "node")  # the right name from the wrong CA
    rogue_pem, rogue_keyf = certs.write_pair(d, "rogue", rogue, rogue_key)
    token_file = d / "token"
    token = certs.write_token(token_file)
    return {
        "ca": ca_pem,
        "cert": node_pem,
        "key": node_keyf,
        "other": (other_pem, other_keyf),
        "rogue": (rogue_pem, rogue_keyf),
        "token_file": str(token_file),
        "token": token,
        "dir": d,
    }


def _list_blocks(channel, timeout=5.0):
    return channel.unary_unary(
        "/downpour.v1.ParameterServer/ListBlocks",
        request_serializer=paramserver_pb2.ListBlocksRequest.SerializeToString,
        response_deserializer=paramserver_pb2.ListBlocksResponse.FromString,
    )(paramserver_pb2.ListBlocksRequest(), timeout=timeout)


def _metric(service, name, **labels):
    return service.metric(name, **labels) or 0.0


def test_mutual_tls_and_token_let_in_only_the_right_clients_and_count_the_rest(pki, procs):
    args = [
        "--tls-cert",
        pki["cert"],
        "--tls-key",
        pki["key"],
        "--tls-client-ca",
        pki["ca"],
        "--token-file",
        pki["token_file"],
        "--tls-client-names",
        "node",
    ]
    good = ChannelConfig(ca=pki["ca"], cert=pki["cert"], key=pki["key"], token=pki["token"])
    p = procs.serve("paramserver", *args, metrics=True, channel_config=good)
    addr = p.address
    with open_channel(addr, good) as ch:
        assert _list_blocks(ch).shard_index == 0  # the right certificate and token
    cases = {
        "no token": ChannelConfig(ca=pki["ca"], cert=pki["cert"], key=pki["key"]),
        "wrong token": ChannelConfig(ca=pki["ca"], cert=pki["cert"], key=pki["key"], token=pki["token"] + "x"),
        "token of another length": ChannelConfig(ca=pki["ca"], cert=pki["cert"], key=pki["key"], token="x"),
        "certificate for another name": ChannelConfig(
            ca=pki["ca"], cert=pki["other"][0], key=pki["other"][1], token=pki["token"]
        ),
    }
    for what, cfg in cases.items():
        with open_channel(addr, cfg) as ch:
            assert harness.status_code(lambda: _list_blocks(ch)) == grpc.StatusCode.UNAUTHENTICATED, what
    name = "downpour_grpc_unauthenticated_total"
    assert _metric(p, name, reason="missing_token") >= 1
    assert _metric(p, name, reason="bad_token") >= 2
    assert _metric(p, name, reason="client_certificate") >= 1
    assert _metric(p, name, grpc_method="ListBlocks") >= 4
    # Certificates the CA did not sign, or none at all, or no TLS: the handshake itself
    # fails (there is no call to answer), so the client sees UNAVAILABLE.
    for what, cfg in {
        "certificate from another CA": ChannelConfig(
            ca=pki["ca"], cert=pki["rogue"][0], key=pki["rogue"][1], token=pki["token"]
        ),
        "no client certificate": ChannelConfig(ca=pki["ca"], token=pki["token"]),
    }.items():
        with open_channel(addr, cfg) as ch:
            assert harness.status_code(lambda: _list_blocks(ch, 3)) == grpc.StatusCode.UNAVAILABLE, what
    with grpc.insecure_channel(addr) as ch:
        assert harness.status_code(lambda: _list_blocks(ch, 3)) == grpc.StatusCode.UNAVAILABLE


def test_token_without_tls_is_checked_too(pki, procs):
    p = procs.serve("paramserver", "--token-file", pki["token_file"], metrics=True)  # health needs no token
    addr = p.address
    with open_channel(addr, ChannelConfig(token=pki["token"])) as ch:
        _list_blocks(ch)
    with grpc.insecure_channel(addr) as ch:
        assert harness.status_code(lambda: _list_blocks(ch)) == grpc.StatusCode.UNAUTHENTICATED
    assert _metric(p, "downpour_grpc_unauthenticated_total", reason="missing_token") == 1


def test_message_size_and_concurrency_limits_answer_resource_exhausted(procs):
    p = procs.serve(
        "feeder",
        "--data",
        "default",
        "--shape",
        "1,16,16",
        "--max-message-bytes",
        str(1 << 20),
        "--max-concurrent-rpcs",
        "3",
        metrics=True,
    )
    addr = p.address
    with grpc.insecure_channel(addr) as ch:
        # A request over the limit.
        big = feeder_pb2.DatasetInfoRequest()
        raw = big.SerializeToString() + b"\xfa\x3f" + b"\x80\x80\x80\x01" + b"x" * (2 << 20)  # unknown field 1023
        call = ch.unary_unary(
            "/downpour.v1.DataFeeder/DatasetInfo", request_serializer=None, response_deserializer=None
        )
        assert harness.status_code(lambda: call(raw, timeout=10)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # More concurrent calls than allowed: open streams that stay open, then one more. Each on
        # its own connection: one connection may hold only --max-streams-per-connection of them.
        stub = feeder_pb2_grpc.DataFeederStub(ch)
        req = feeder_pb2.StreamBatchesRequest(replica=0, num_replicas=1, batch_size=4)
        conns = [grpc.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(3)]
        streams = [feeder_pb2_grpc.DataFeederStub(c).StreamBatches(req, timeout=30) for c in conns]
        for s in streams:
            next(s)
        info = lambda: harness.status_code(lambda: stub.DatasetInfo(feeder_pb2.DatasetInfoRequest(), timeout=5))
        harness.wait_for(lambda: info() == grpc.StatusCode.RESOURCE_EXHAUSTED, 10, "a call over the limit refused")
        for s in streams:
            s.cancel()
        harness.wait_for(lambda: info() == grpc.StatusCode.OK, 10, "room again once the streams are cancelled")
        for c in conns:
            c.close()


def test_downpour_up_secure_trains_with_mtls_and_a_token_everywhere(tmp_path):
    out = tmp_path / "run"
    r = harness.run_cli(
        "up",
        "--secure",
        "--quiet",
        "--out",
        str(out),
        *harness.TINY_CLUSTER,
        "--steps",
        "60",
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # Each child says in its log whether it served TLS; once the run is over nothing else can tell.
    logs = {p.name: p.read_text() for p in (out / "logs").glob("*.log")}
    roles = ("coordinator", "feeder", "paramserver-0", "paramserver-1", "worker-0", "worker-1", "neurons")
    for role in roles:
        assert "(tls=True)" in logs[f"{role}.log"], role
    assert list((out / "checkpoints").glob("*/MANIFEST.json"))
    assert oct((out / "tls").stat().st_mode & 0o777) == "0o700"
    assert oct((out / "tls" / "node.key").stat().st_mode & 0o777) == "0o600"
    for role in rights.ROLES:  # a token per role, each readable by its owner only
        assert oct((out / "tls" / f"token-{role}").stat().st_mode & 0o777) == "0o600", role
    # the shards' /metrics answered the launcher over mutual TLS: their samples are in metrics.json
    shards = json.loads((out / "metrics.json").read_text())["shards"]
    assert sorted(shards) == ["paramserver-0", "paramserver-1"]
    assert all(any(s["name"].startswith("downpour_paramserver") for s in samples) for samples in shards.values())


# -- holes a hostile client or a careless operator found ------------------------------------


@pytest.mark.parametrize("content", ["", "   \n", "short\n"])
def test_an_empty_or_short_token_file_is_refused_at_start_up(tmp_path, content):
    """An empty token file used to turn authentication off, silently."""
    token_file = tmp_path / "token"
    token_file.write_text(content)
    r = harness.run_cli("serve", "paramserver", "--host", "127.0.0.1", "--port", "0", "--token-file", str(token_file),
                        timeout=60)  # fmt: skip
    assert r.returncode != 0, r.stderr[-2000:]
    assert str(token_file) in r.stderr and "at least 16 characters" in r.stderr, r.stderr[-2000:]
    assert ("empty" if not content.strip() else "5 characters long") in r.stderr


def _watch_first(channel, metadata=(), timeout=5.0):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stream = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(), metadata=metadata, timeout=timeout
    )
    try:
        return next(iter(stream)).status
    finally:
        stream.cancel()


def test_only_health_check_is_open_without_the_token(pki, procs):
    """Health/Watch used to skip the token: unauthenticated streams could fill --max-concurrent-rpcs."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    s = procs.serve("paramserver", "--token-file", pki["token_file"], "--max-concurrent-rpcs", "4", metrics=True)
    serving = health_pb2.HealthCheckResponse.SERVING
    with open_channel(s.address) as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == serving
        for _ in range(8):  # more than the slots: each is refused at once, none holds one
            assert harness.status_code(lambda: _watch_first(ch)) == grpc.StatusCode.UNAUTHENTICATED
        assert _watch_first(ch, metadata=(("authorization", f"Bearer {pki['token']}"),)) == serving
        assert harness.status_code(lambda: _list_blocks(ch)) == grpc.StatusCode.UNAUTHENTICATED
    with open_channel(s.address, ChannelConfig(token=pki["token"])) as ch:
        assert harness.status_code(lambda: _list_blocks(ch)) == grpc.StatusCode.OK
    assert (
        _metric(s, "downpour_grpc_unauthenticated_total", grpc_service="grpc.health.v1.Health", grpc_method="Watch")
        == 8
    )


def _listening(port: int) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp writes them) listening on ``port``."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table, encoding="ascii").read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                out.append(local.rsplit(":", 1)[0])
    return out


def test_metrics_listen_on_the_service_host_only(procs):
    """/metrics used to listen on 0.0.0.0 whatever --host said."""
    s = procs.serve("paramserver", metrics=True)  # --host 127.0.0.1
    assert "downpour_" in s.metrics()
    assert _listening(s.metrics_port) == ["0100007F"], _listening(s.metrics_port)  # 127.0.0.1, nothing else
