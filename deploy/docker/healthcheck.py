"""Container health check: asks this container's downpour service over grpc.health.v1.

Exit 0 when it answers SERVING, 1 otherwise. The port is ``HEALTHCHECK_PORT``
or the ``--port`` of the ``downpour serve <role>`` process running here (else
the role's default). A service started with ``--tls-cert`` is checked over TLS:
``HEALTHCHECK_CA`` (default: its ``--tls-ca``, else ``--tls-client-ca``),
``HEALTHCHECK_CERT`` / ``HEALTHCHECK_KEY`` (a client certificate for mutual
TLS; default: the service's own ``--tls-cert``/``--tls-key``) and
``HEALTHCHECK_SERVER_NAME`` (the name in its certificate) say how.
"""

from __future__ import annotations

import os
import sys

DEFAULT_PORTS = {"coordinator": 7070, "paramserver": 7100, "feeder": 7060, "worker": 7050, "neurons": 7300}


def _service_argv() -> list[str]:
    for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if "serve" in argv and any(a.endswith("downpour") or a.endswith("downpour.cli") for a in argv):
            return argv[argv.index("serve") + 1:]
    return []


def _flag(argv: list[str], name: str) -> str:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return ""


def main() -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    argv = _service_argv()
    role = argv[0] if argv else ""
    port = os.environ.get("HEALTHCHECK_PORT") or _flag(argv, "--port") or str(DEFAULT_PORTS.get(role, 0))
    if port in ("", "0"):
        print(f"healthcheck: cannot tell the port of role {role or '?'} (set HEALTHCHECK_PORT)")
        return 1
    target = f"127.0.0.1:{port}"
    if _flag(argv, "--tls-cert"):
        def read(path: str) -> bytes | None:
            return open(path, "rb").read() if path else None
        mutual = bool(_flag(argv, "--tls-client-ca"))
        creds = grpc.ssl_channel_credentials(
            root_certificates=read(os.environ.get("HEALTHCHECK_CA") or _flag(argv, "--tls-ca")
                                   or _flag(argv, "--tls-client-ca")),
            private_key=read(os.environ.get("HEALTHCHECK_KEY") or (_flag(argv, "--tls-key") if mutual else "")),
            certificate_chain=read(os.environ.get("HEALTHCHECK_CERT") or (_flag(argv, "--tls-cert") if mutual else "")))
        name = os.environ.get("HEALTHCHECK_SERVER_NAME", "")
        options = [("grpc.ssl_target_name_override", name)] if name else []
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target)
    try:
        with channel:
            r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
    except grpc.RpcError as e:
        print(f"healthcheck: {role or 'service'} at {target}: {e.code().name}")
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    print(f"healthcheck: {role or 'service'} at {target}: {status}")
    return 0 if r.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
