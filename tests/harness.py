"""The one way the integration, fuzz, chaos and e2e tests run real processes and wait on them.

- ``free_port()``: a free TCP port on 127.0.0.1; ``accepts(port)``: does something listen there.
- ``wait_for(condition, deadline, what=...)``: poll until ``condition()`` is truthy; on timeout the
  error says what was awaited, how long, and the last thing the condition raised. Processes given
  as ``procs`` end the wait early when one of them exits, with its exit code and log.
- ``Proc``: any command as a real process, its stdout and stderr in a log file; ``stop()``
  terminates, then kills.
- ``Service``: ``python -m downpour.cli serve ROLE`` on 127.0.0.1 on free ports, with
  ``wait_serving()`` (gRPC health SERVING) and its Prometheus metrics (``scrape``, ``metric_value``).
- ``cli(...)``: a ``python -m downpour.cli`` process and ``up(...)`` a ``downpour up`` launcher
  whose children's logs (``OUT/logs``) count as its own; ``run_cli(...)`` runs one to its end.
- ``cluster(out)`` and ``job_status(out)``: a ``downpour up`` run's children and its coordinator's
  view; ``wait_job(out, ok, ...)`` waits for a JobStatus that satisfies ``ok``.
- ``Procs``: what a fixture hands a test: starts processes and stops them all at teardown.

Every process started here is remembered; when a test fails, the hooks at the end of this module
(registered by ``tests/conftest.py``) append the logs of the processes it started, and of those
still running (the module fixtures'), to the failure report.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from downpour.rpc.channel import ChannelConfig, open_channel
from downpour.up.scrape import fetch_metrics
from downpour.v1 import coordinator_pb2, coordinator_pb2_grpc

T = TypeVar("T")

LOG_TAIL = 6000  # characters of each log shown in a failure report: the end is where the reason is
STOP_TIMEOUT = 15.0
# The smallest cluster that still has everything twice: `downpour up` flags for tiny, 2 replicas, 2 shards.
TINY_CLUSTER = ("--preset", "tiny", "--replicas", "2", "--shards", "2")
_STARTED: list[Proc] = []


def free_port() -> int:
    """A port nothing listens on now (the kernel's choice, so parallel test runs do not collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port`` now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def wait_for(
    condition: Callable[[], T],
    deadline: float,
    what: str,
    every: float = 0.05,
    procs: Iterable[Proc] = (),
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``condition`` every ``every`` seconds until it returns something truthy, and return that.

    ``deadline`` is in seconds from now. ``ignore`` lists exceptions that count as "not yet" (a
    service still starting); the last one is quoted if time runs out. Any of ``procs`` exiting
    ends the wait at once: what was awaited can no longer happen.
    """
    procs = list(procs)
    end = time.monotonic() + deadline
    last: BaseException | None = None
    while True:
        try:
            got = condition()
            if got:
                return got
        except ignore as e:
            last = e
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{p.name} exited with code {p.returncode} while waiting for {what}\n{p.report()}")
        if time.monotonic() >= end:
            why = f" (last: {type(last).__name__}: {last})" if last is not None else ""
            raise TimeoutError(f"timed out after {deadline:g} s waiting for {what}{why}")
        time.sleep(every)


class Proc:
    """A real process whose stdout and stderr go to ``log``."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        log: Path,
        env: dict[str, str | None] | None = None,
        logs_dir: Path | None = None,
        new_session: bool = False,
    ) -> None:
        """``env`` is added to this process's environment; a None value removes that variable."""
        self.name, self.cmd, self.log = name, list(cmd), Path(log)
        self.logs_dir = logs_dir  # more logs of this process (a launcher's children), shown on failure
        self.log.parent.mkdir(parents=True, exist_ok=True)
        merged: dict[str, str | None] = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env = {k: v for k, v in merged.items() if v is not None}
        with open(self.log, "wb") as f:
            self.popen = subprocess.Popen(
                self.cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env, start_new_session=new_session
            )
        _STARTED.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        """Everything the process has written so far."""
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        """Its exit code; fails (with the log) if it is still running after ``timeout`` seconds."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.name} still running after {timeout:g} s\n{self.report()}") from None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30.0) -> int:
        """Send ``sig`` and return the exit code (negative: the signal that ended it)."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        return self.wait(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, and SIGKILL if it has not exited within ``timeout`` seconds."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._kill_all()
        return self.popen.wait()

    def _kill_all(self) -> None:
        try:
            if self.popen.pid == os.getpgid(self.popen.pid):  # its own session: take its children with it
                os.killpg(self.popen.pid, signal.SIGKILL)
                return
        except ProcessLookupError:  # it exited meanwhile
            return
        self.popen.kill()

    def report(self) -> str:
        """The tail of its log (and of its children's logs), for a failure message."""
        state = "running" if self.popen.poll() is None else f"exit code {self.popen.returncode}"
        parts = [f"== {self.name} ({state}): {self.log}\n{_tail(self.log)}"]
        if self.logs_dir is not None and self.logs_dir.is_dir():
            parts += [f"== {self.name}: {p.name}\n{_tail(p)}" for p in sorted(self.logs_dir.glob("*.log"))]
        return "\n".join(parts)


class Service(Proc):
    """``python -m downpour.cli serve ROLE`` on 127.0.0.1, on a free port unless ``port`` is given."""

    def __init__(
        self,
        tmp: Path,
        role: str,
        *flags: str,
        port: int | None = None,
        metrics: bool = False,
        env: dict[str, str | None] | None = None,
        channel_config: ChannelConfig | None = None,
    ) -> None:
        self.role = role
        self.port = port or free_port()
        self.metrics_port = free_port() if metrics else 0
        self.address = f"127.0.0.1:{self.port}"
        self.channel_config = channel_config
        cmd = [sys.executable, "-m", "downpour.cli", "serve", role, "--host", "127.0.0.1", "--port", str(self.port)]
        if metrics:
            cmd += ["--metrics-port", str(self.metrics_port)]
        super().__init__(role, [*cmd, *flags], Path(tmp) / f"{role}-{self.port}-{time.monotonic_ns()}.log", env)

    def serving(self) -> bool:
        """One health check: is it SERVING now?"""
        return serving(self.address, self.channel_config)

    def wait_serving(self, deadline: float = 60.0) -> Service:
        """Wait until its gRPC health check answers SERVING (a process that exits fails at once)."""
        wait_for(self.serving, deadline, f"{self.role} at {self.address} to be SERVING", procs=[self])
        return self

    def metrics(self) -> str:
        """Its Prometheus exposition text."""
        assert self.metrics_port, f"{self.role} was started without metrics=True"
        return scrape(self.metrics_port, self.channel_config)

    def metric(self, name: str, **labels: str) -> float | None:
        """The sum of ``name``'s samples whose labels include ``labels`` (None: no such sample)."""
        return metric_value(self.metrics(), name, **labels)


def serving(address: str, channel_config: ChannelConfig | None = None) -> bool:
    """One gRPC health check of ``address``: SERVING now? (False when it does not answer.)"""
    try:
        with open_channel(address, channel_config) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
            return bool(r.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def status_code(fn: Callable[[], object]) -> grpc.StatusCode:
    """The status ``fn()`` (one RPC) ends with: OK, or the code of the RpcError it raised."""
    try:
        fn()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The sum of the samples of ``name`` whose labels include ``labels``, in Prometheus exposition
    ``text``; None when there is no such sample."""
    found = [
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return float(sum(found)) if found else None


def scrape(metrics_port: int, channel_config: ChannelConfig | None = None) -> str:
    """The Prometheus exposition text of whatever serves metrics on 127.0.0.1:``metrics_port``
    (over HTTPS, with its client certificate, when ``channel_config`` has a CA)."""
    return fetch_metrics(metrics_port, channel_config)


def run_cli(
    *args: str, env: dict[str, str | None] | None = None, timeout: float = 240, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m downpour.cli ARGS`` run to its end, its stdout and stderr captured (for one-shot commands)."""
    merged: dict[str, str | None] = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "downpour.cli", *args],
        capture_output=True,
        text=True,
        env={k: v for k, v in merged.items() if v is not None},
        timeout=timeout,
        cwd=cwd,
    )


def cli(
    tmp: Path,
    name: str,
    *args: str,
    env: dict[str, str | None] | None = None,
    logs_dir: Path | None = None,
    new_session: bool = False,
) -> Proc:
    """``python -m downpour.cli ARGS`` as a process (logged to ``tmp/NAME.log``)."""
    return Proc(
        name,
        [sys.executable, "-m", "downpour.cli", *args],
        Path(tmp) / f"{name}-{time.monotonic_ns()}.log",
        env,
        logs_dir,
        new_session,
    )


def up(out: Path, *args: str, env: dict[str, str | None] | None = None, new_session: bool = False) -> Proc:
    """``downpour up --out OUT ARGS``: its log beside OUT, its children's logs (OUT/logs) reported with it."""
    out = Path(out)
    return cli(
        out.parent,
        f"up-{out.name}",
        "up",
        "--out",
        str(out),
        *args,
        env=env,
        logs_dir=out / "logs",
        new_session=new_session,
    )


def cluster(out: Path) -> dict[str, dict[str, Any]]:
    """A ``downpour up`` run's children by name (its ``cluster.json``: role, address, pid, restarts);
    empty while the file is not there yet."""
    try:
        return {r["name"]: r for r in json.loads((Path(out) / "cluster.json").read_text())}
    except (OSError, ValueError):
        return {}


def job_status(out: Path, timeout: float = 1.0) -> coordinator_pb2.JobStatusResponse | None:
    """The JobStatus of a ``downpour up`` run's coordinator, or None while it is down or restarting."""
    row = cluster(out).get("coordinator")
    return None if row is None else job_status_at(row["address"], timeout)


def job_status_at(address: str, timeout: float = 1.0) -> coordinator_pb2.JobStatusResponse | None:
    """The JobStatus of the coordinator at ``address``, or None while it does not answer."""
    try:
        with open_channel(address) as ch:
            stub = coordinator_pb2_grpc.CoordinatorStub(ch)
            return stub.JobStatus(coordinator_pb2.JobStatusRequest(), timeout=timeout)
    except grpc.RpcError:
        return None


def wait_job(
    out: Path,
    ok: Callable[[coordinator_pb2.JobStatusResponse], object],
    deadline: float,
    what: str,
    procs: Iterable[Proc] = (),
) -> coordinator_pb2.JobStatusResponse:
    """Poll a ``downpour up`` run's JobStatus until ``ok(status)``; return that status."""

    def check() -> coordinator_pb2.JobStatusResponse | None:
        st = job_status(out)
        return st if st is not None and ok(st) else None

    st = wait_for(check, deadline, what, every=0.2, procs=procs)
    assert st is not None  # wait_for returns only a truthy value
    return st


class Procs:
    """Starts processes for one test or fixture and stops every one of them at ``close()``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = Path(tmp)
        self.started: list[Proc] = []

    def serve(self, role: str, *flags: str, wait: bool = True, deadline: float = 60.0, **kw: Any) -> Service:
        """Start ``downpour serve ROLE FLAGS`` (and, unless ``wait=False``, wait until it is SERVING)."""
        s = Service(self.tmp, role, *flags, **kw)
        self.started.append(s)
        return s.wait_serving(deadline) if wait else s

    def cli(self, name: str, *args: str, **kw: Any) -> Proc:
        p = cli(self.tmp, name, *args, **kw)
        self.started.append(p)
        return p

    def up(self, out: Path, *args: str, **kw: Any) -> Proc:
        p = up(out, *args, **kw)
        self.started.append(p)
        return p

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for p in self.started:
            if p.alive():
                p.popen.terminate()  # all at once: the stops below then overlap
        for p in self.started:
            p.stop()


def started_since(mark: int) -> list[Proc]:
    """The processes started after ``mark`` (a ``len(started)`` taken earlier) and those still running."""
    return [p for i, p in enumerate(_STARTED) if i >= mark or p.alive()]


def mark() -> int:
    return len(_STARTED)


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(unreadable: {e})"
    return text if len(text) <= LOG_TAIL else "...\n" + text[-LOG_TAIL:]


# -- pytest glue (tests/conftest.py imports these names so that pytest registers them) ------------

_MARK = pytest.StashKey[int]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before the fixtures start anything: what starts from here on belongs to this test.
    item.stash[_MARK] = mark()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and _MARK in item.stash:
        # The reason a real process misbehaved is in its log, not in the assertion.
        for p in started_since(item.stash[_MARK]):
            report.sections.append((f"log of {p.name} (pid {p.pid})", p.report()))
    return report


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Start real processes for this test; all are stopped (terminate, then kill) at its end."""
    with Procs(tmp_path) as p:
        yield p
