"""Container health check: asks this container's downpour service over grpc.health.v1.

Exit 0 when it answers SERVING, 1 otherwise. The port is ``HEALTHCHECK_PORT``
or the ``--port`` of the ``downpour serve <role>`` process running here (else
the role's default). A service started with ``--tls-cert`` is checked over TLS:
``HEALTHCHECK_CA`` (default: its ``--tls-ca``, else ``--tls-client-ca``),
``HEALTHCHECK_CERT`` / ``HEALTHCHECK_KEY`` (a client certificate for mutual
TLS; default: the service's own ``--tls-cert``/``--tls-key``) and
``HEALTHCHECK_SERVER_NAME`` (the name in its certificate) say how. The service's
``DOWNPOUR_TLS_*`` variables stand for its flags where it has none.

``--liveness``: exit 0 on any answer (SERVING or not), 1 when the service does
not answer within ``--timeout`` seconds: a hung process, for a liveness probe.

``--kill-hung SECONDS`` (docker compose, which marks a container unhealthy but
never restarts it for that): the time of the service's last answer is kept in
``/tmp``; once it has answered and then not for SECONDS, the service process is
killed (SIGKILL), so the container exits and its restart policy replaces it.
"""

from __future__ import annotations

import os
import sys

DEFAULT_PORTS = {"coordinator": 7070, "paramserver": 7100, "feeder": 7060, "worker": 7050, "neurons": 7300}


STATE = os.environ.get("HEALTHCHECK_STATE", "/tmp/downpour-healthcheck.json")


def _service() -> tuple[int, list[str]]:
    """(pid, arguments after ``serve``) of the ``downpour serve`` process in this container
    (``HEALTHCHECK_PID`` names it where several run, as in tests)."""
    only = os.environ.get("HEALTHCHECK_PID", "")
    for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if only and pid != only:
            continue
        if "serve" in argv and any(a.endswith("downpour") or a.endswith("downpour.cli") for a in argv):
            return int(pid), argv[argv.index("serve") + 1:]
    return 0, []


def _kill_if_hung(pid: int, answered: bool, hang_seconds: float, role: str) -> None:
    """Remember the last answer; kill the service once it has been silent for ``hang_seconds``."""
    import json
    import signal
    import time

    now = time.time()
    try:
        with open(STATE, encoding="utf-8") as f:
            last = json.load(f)
    except (OSError, ValueError):
        last = {}
    if last.get("pid") != pid:
        last = {"pid": pid, "answered": None}  # a new process: its start-up is not a hang
    if answered:
        last["answered"] = now
    elif last["answered"] is not None and now - last["answered"] > hang_seconds:
        print(f"healthcheck: {role} (pid {pid}) has not answered for {now - last['answered']:.0f} s: killed as hung")
        os.kill(pid, signal.SIGKILL)
        return
    try:
        with open(STATE + ".tmp", "w", encoding="utf-8") as f:
            json.dump(last, f)
        os.replace(STATE + ".tmp", STATE)
    except OSError as e:
        print(f"healthcheck: cannot keep {STATE} ({e}); hung processes are not killed")


def _flag(argv: list[str], name: str) -> str:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return ""


def _setting(argv: list[str], name: str) -> str:
    """A security flag of the service, or the DOWNPOUR_* variable that sets it (--tls-cert:
    DOWNPOUR_TLS_CERT), as the service itself reads it (deploy/compose/secure.yml sets variables)."""
    return _flag(argv, name) or os.environ.get("DOWNPOUR_" + name.lstrip("-").replace("-", "_").upper(), "")


def main(args: list[str] | None = None) -> int:
    import argparse

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ap = argparse.ArgumentParser(description="health check of this container's downpour service")
    ap.add_argument("--liveness", action="store_true", help="any answer is healthy (a liveness probe)")
    ap.add_argument("--kill-hung", type=float, default=0.0, metavar="SECONDS",
                    help="kill the service once it has not answered for this long (0: never)")
    ap.add_argument("--timeout", type=float, default=float(os.environ.get("HEALTHCHECK_TIMEOUT", "3")),
                    help="seconds to wait for an answer")
    opts = ap.parse_args(args)
    pid, argv = _service()
    role = argv[0] if argv else ""
    port = os.environ.get("HEALTHCHECK_PORT") or _flag(argv, "--port") or str(DEFAULT_PORTS.get(role, 0))
    if port in ("", "0"):
        print(f"healthcheck: cannot tell the port of role {role or '?'} (set HEALTHCHECK_PORT)")
        return 1
    target = f"127.0.0.1:{port}"
    if _setting(argv, "--tls-cert"):
        def read(path: str) -> bytes | None:
            return open(path, "rb").read() if path else None
        mutual = bool(_setting(argv, "--tls-client-ca"))
        creds = grpc.ssl_channel_credentials(
            root_certificates=read(os.environ.get("HEALTHCHECK_CA") or _setting(argv, "--tls-ca")
                                   or _setting(argv, "--tls-client-ca")),
            private_key=read(os.environ.get("HEALTHCHECK_KEY") or (_setting(argv, "--tls-key") if mutual else "")),
            certificate_chain=read(os.environ.get("HEALTHCHECK_CERT")
                                   or (_setting(argv, "--tls-cert") if mutual else "")))
        name = os.environ.get("HEALTHCHECK_SERVER_NAME", "")
        options = [("grpc.ssl_target_name_override", name)] if name else []
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target)
    r = None
    try:
        with channel:
            r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                          timeout=opts.timeout)
        answered = True
    except grpc.RpcError as e:
        print(f"healthcheck: {role or 'service'} at {target}: {e.code().name}")
        # No connection or no answer in time is what a hung process looks like; any other
        # error came from the process itself, which is therefore alive.
        answered = e.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
    if opts.kill_hung > 0 and pid:
        _kill_if_hung(pid, answered, opts.kill_hung, role or "service")
    if r is None:
        return 0 if (opts.liveness and answered) else 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    print(f"healthcheck: {role or 'service'} at {target}: {status}")
    return 0 if (opts.liveness or r.status == health_pb2.HealthCheckResponse.SERVING) else 1


if __name__ == "__main__":
    sys.exit(main())
