"""``downpour up``: the whole cluster as local processes on 127.0.0.1.

Starts S parameter shards, the data feeder, the coordinator, R x P model
workers and the neurons service (the live parameters, re-pulled every 5 s, for
``downpour query`` while the job trains), each its own ``downpour serve
<role>`` process on free ports; waits for their health checks; shows the
training progress per replica; restarts a child that dies (a killed worker's
slot is taken by its replacement, which resumes the replica's step); and when
the job reaches its step count, or on Ctrl-C, takes a last checkpoint and stops
every child with SIGTERM.

The run directory (``--out``) gets the job spec (``job.yaml``), the
checkpoints, every child's log, ``metrics.json`` (loss and examples/s per
replica over time) and ``loss.png``. ``--resume DIR`` continues a run from its
last committed checkpoint, step count included.

``--secure`` runs the cluster with mutual TLS and a bearer token: a CA, a
node certificate and a token are made in ``<out>/tls`` and every child gets
them through ``DOWNPOUR_TLS_*`` / ``DOWNPOUR_TOKEN_FILE``; the launcher's own
calls (health, status, the last checkpoint) use them too.

A child that is alive but hung (stopped, deadlocked, swapped out) is treated
as dead: a watch thread asks every child's health service twice a second, and
one that has not answered for the job's ``hang_seconds`` is killed (SIGKILL)
and restarted like any child that died.

Failures are the cluster's business, not the launcher's: a shard restarted
here comes back empty and the coordinator refills it from the last valid
checkpoint; a restarted coordinator re-adopts the running cluster from its
state directory (a restart never repeats ``--resume``); workers wait for a
restarted feeder or shard and carry on.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc

from downpour import config as jobconfig

# Start order; stops run in reverse (the neurons service and the workers first).
ROLE_ORDER = ("paramserver", "feeder", "coordinator", "worker", "neurons")


LAUNCHER_PID = "DOWNPOUR_LAUNCHER_PID"


def die_with_launcher() -> None:
    """In a child of ``downpour up`` (``serve`` calls this first): SIGTERM when the launcher dies.

    Done by the child itself rather than in a ``preexec_fn``: code run between fork and
    exec in a launcher with threads (gRPC's, an evaluation's) can deadlock on a lock some
    other thread held at the fork. Linux only; elsewhere Ctrl-C and the normal stop still work.
    """
    parent = os.environ.get(LAUNCHER_PID, "")
    if not parent.isdigit():
        return
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the launcher died before the signal was armed
        sys.exit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Child:
    name: str
    role: str
    args: list[str]
    port: int
    metrics_port: int
    log_path: str
    proc: subprocess.Popen | None = None
    restarts: int = 0
    hangs: int = 0  # times it was killed for not answering its health check
    extra_env: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.log_path, "ab")
        cmd = [sys.executable, "-m", "downpour.cli", "serve", self.role, "--host", "127.0.0.1",
               "--port", str(self.port), "--metrics-port", str(self.metrics_port), *self.args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.extra_env, **{LAUNCHER_PID: str(os.getpid())})
        # Children ignore the terminal's Ctrl-C (their own session): the launcher
        # stops them in order. If the launcher itself is killed, the kernel sends
        # them SIGTERM (``die_with_launcher``), so no cluster outlives its ``downpour up``.
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()

    def lost_its_port(self) -> bool:
        """Whether the child exited because its port was taken: ports are chosen free but
        only bound by the child, so another program can take one in between."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 4096))
                tail = f.read().decode(errors="replace").lower()
        except OSError:
            return False
        return any(m in tail for m in ("cannot bind", "failed to bind", "address already in use"))

    def last_line(self) -> str:
        """The last line the child wrote (its own error, when it failed), for the terminal."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 8192))
                lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1][:400] if lines else ""

    def new_ports(self) -> None:
        self.port, self.metrics_port = free_port(), free_port()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (if not sent yet), then SIGKILL after ``timeout`` seconds."""
        if not self.alive():
            return
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _channel(address: str, chcfg=None) -> grpc.Channel:
    from downpour.rpc.channel import open_channel

    return open_channel(address, chcfg)


def secure_setup(out: str) -> tuple[dict, "object"]:
    """(environment for the children, ChannelConfig for the launcher) of a cluster with mTLS and a token."""
    from downpour.rpc.certs import make_cluster_pki
    from downpour.rpc.channel import ChannelConfig

    pki = make_cluster_pki(os.path.join(out, "tls"))
    env = {"DOWNPOUR_TLS_CERT": pki["cert"], "DOWNPOUR_TLS_KEY": pki["key"], "DOWNPOUR_TLS_CLIENT_CA": pki["ca"],
           "DOWNPOUR_TLS_CA": pki["ca"], "DOWNPOUR_TOKEN_FILE": pki["token_file"]}
    return env, ChannelConfig(ca=pki["ca"], cert=pki["cert"], key=pki["key"], token=pki["token"])


def wait_healthy(address: str, timeout: float, proc: subprocess.Popen | None = None, chcfg=None) -> None:
    """Block until ``address`` answers SERVING on the gRPC health service (and ``proc`` is still running)."""
    from downpour.rpc.channel import wait_ready

    alive = None if proc is None else (lambda: proc.poll() is None)
    with _channel(address, chcfg) as ch:
        try:
            wait_ready(ch, timeout, alive=alive)
        except RuntimeError:
            raise RuntimeError(f"the service at {address} exited with code {proc.returncode} during start-up") from None
        except TimeoutError as e:
            raise TimeoutError(f"the service at {address} was not healthy within {timeout:.0f} s ({e})") from None


class HangWatch:
    """Kills children that are alive but do not answer their health check (the launcher's liveness probe).

    Every ``period`` seconds each running child without a probe in flight gets one
    (``Health.Check`` with a deadline of ``hang_seconds``); any answer, SERVING or not,
    counts as alive. A child whose last answer is more than ``hang_seconds`` old is
    sent SIGKILL; ``Cluster.supervise`` then restarts it like any child that died.
    The clock starts at a child's first answer: start-up (imports, restoring) is
    bounded by ``start_timeout`` instead, so a slow start is not taken for a hang.
    """

    def __init__(self, children: list["Child"], hang_seconds: float, chcfg=None, start_timeout: float = 90.0,
                 period: float = 0.5):
        self.children, self.hang, self.chcfg = children, hang_seconds, chcfg
        self.start_timeout, self.period = start_timeout, period
        self.events: list[str] = []  # what was killed and why, for the launcher to print
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hang-watch", daemon=True)
        self._channels: dict[str, grpc.Channel] = {}
        self._seen: dict[str, dict] = {}  # child name -> pid, first seen, last answer, probe in flight

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for ch in self._channels.values():
            ch.close()

    def _stub(self, address: str):
        from grpc_health.v1 import health_pb2_grpc

        if address not in self._channels:
            self._channels[address] = _channel(address, self.chcfg)
        return health_pb2_grpc.HealthStub(self._channels[address])

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            for c in list(self.children):
                try:
                    self.check(c, time.monotonic())
                except Exception as e:  # noqa: BLE001 - the watch must outlive any one child's oddity
                    self.events.append(f"hang watch: {c.name}: {e}")

    def check(self, c: "Child", now: float) -> None:
        from grpc_health.v1 import health_pb2

        proc = c.proc  # one process throughout: the launcher's thread may start a new one meanwhile
        if proc is None or proc.poll() is not None:
            self._seen.pop(c.name, None)
            return
        s = self._seen.get(c.name)
        if s is None or s["pid"] != proc.pid:  # a new process: its start-up is not a hang
            s = self._seen[c.name] = {"pid": proc.pid, "since": now, "answered": None, "probe": None}
        probe = s["probe"]
        if probe is not None and probe.done():
            s["probe"] = None
            try:
                probe.result()
                s["answered"] = now
            except grpc.RpcError as e:
                # Any answer from the process itself means it is alive; no connection or no
                # answer in time is what a hung (or not yet listening) process looks like.
                if e.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                    s["answered"] = now
        if s["probe"] is None:
            s["probe"] = self._stub(c.address).Check.future(health_pb2.HealthCheckRequest(service=""),
                                                            timeout=self.hang)
        silent = now - (s["answered"] if s["answered"] is not None else s["since"])
        limit = self.hang if s["answered"] is not None else max(self.start_timeout, self.hang)
        if silent > limit:
            what = ("has not answered its health check" if s["answered"] is not None
                    else "never answered its health check")
            self.events.append(f"{c.name} (pid {proc.pid}) {what} for {silent:.1f} s: killed as hung")
            c.hangs += 1
            proc.kill()
            s["probe"].cancel()
            self._seen.pop(c.name, None)


class Cluster:
    """The children of one ``downpour up`` and what it takes to run them."""

    def __init__(self, cfg: jobconfig.JobConfig, out: str, resume: bool, secure_env: dict | None = None,
                 chcfg=None, neurons: bool = True):
        self.cfg, self.out, self.resume, self.with_neurons = cfg, os.path.abspath(out), resume, neurons
        self.neurons: Child | None = None
        self.children: list[Child] = []
        self.logs = os.path.join(self.out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.ckpt_dir = os.path.join(self.out, "checkpoints")
        self.job_path = os.path.join(self.out, "job.yaml")
        if not resume:
            with open(self.job_path, "w", encoding="utf-8") as f:
                f.write(cfg.to_yaml())
        self.env = secure_env or {}
        self.chcfg = chcfg  # how the launcher itself calls the services (None: plaintext)

    def _child(self, name: str, role: str, args: list[str]) -> Child:
        c = Child(name, role, args, free_port(), free_port(), os.path.join(self.logs, f"{name}.log"),
                  extra_env=self.env)
        self.children.append(c)
        return c

    def start(self, timeout: float = 60.0) -> None:
        cfg = self.cfg
        shards = [self._child(f"paramserver-{i}", "paramserver",
                              ["--shard-index", str(i), "--checkpoint-dir", self.ckpt_dir])
                  for i in range(cfg.shards)]
        feeder = self._child("feeder", "feeder", ["--config", self.job_path])
        for c in shards + [feeder]:
            c.start()
        for c in shards + [feeder]:
            self._wait_started(c, timeout)
        coord_args = ["--config", self.job_path, "--shards", ",".join(s.address for s in shards),
                      "--feeder", feeder.address, "--state-dir", os.path.join(self.out, "coordinator"),
                      "--checkpoint-dir", self.ckpt_dir]
        if self.resume:
            coord_args.append("--resume")
        self.coordinator = self._child("coordinator", "coordinator", coord_args)
        self.coordinator.start()
        self._wait_started(self.coordinator, timeout)
        # A restarted coordinator re-adopts the cluster from its state directory:
        # restoring the checkpoint again would throw away the progress since.
        self.coordinator.args = [a for a in coord_args if a != "--resume"]
        rows, cols = cfg.grid()
        # Workers are interchangeable: the coordinator decides which slot each one fills.
        for i in range(cfg.replicas * rows * cols):
            self._child(f"worker-{i}", "worker", ["--coordinator", self.coordinator.address,
                                                  "--device", cfg.device]).start()
        if self.with_neurons:
            # Watch neurons while they train: live parameters from the shards, re-pulled every 5 s.
            # Not waited for: it turns healthy once it holds parameters, and training does not need it.
            self.neurons = self._child("neurons", "neurons", ["--coordinator", self.coordinator.address,
                                                             "--refresh-seconds", "5", "--device", cfg.device])
            self.neurons.start()
        self.describe()

    def _wait_started(self, c: Child, timeout: float, attempts: int = 3) -> None:
        """Wait for ``c`` to turn healthy; a child whose port was taken starts again on new ports."""
        for attempt in range(attempts):
            try:
                wait_healthy(c.address, timeout, c.proc, self.chcfg)
                return
            except RuntimeError:
                if attempt == attempts - 1 or not c.lost_its_port():
                    # the child's own reason, not just its exit code: the user should not have to dig in logs/
                    raise RuntimeError(f"{c.name} exited with code {c.proc.returncode} during start-up: "
                                       f"{c.last_line() or '(no output)'}\n  (its log: {c.log_path})") from None
                c.new_ports()
                c.start()

    def describe(self) -> None:
        """Write cluster.json: every child's role, addresses and pid (for operators and tests)."""
        rows = [{"name": c.name, "role": c.role, "address": c.address, "metrics_port": c.metrics_port,
                 "pid": c.proc.pid if c.proc else None, "restarts": c.restarts, "hangs": c.hangs}
                for c in self.children]
        tmp = os.path.join(self.out, ".cluster.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, os.path.join(self.out, "cluster.json"))

    def scrape_shards(self) -> dict[str, dict]:
        """The parameter shards' downpour_* metrics, read from their /metrics endpoints."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        out = {}
        for c in self.children:
            if c.role != "paramserver" or not c.alive():
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{c.metrics_port}/metrics", timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                continue
            samples = []
            for fam in text_string_to_metric_families(text):
                if fam.name.startswith("downpour_paramserver"):
                    samples += [{"name": sm.name, "labels": sm.labels, "value": sm.value} for sm in fam.samples]
            out[c.name] = samples
        return out

    def supervise(self) -> list[str]:
        """Restart children that died (a non-zero exit); returns what was restarted.

        A worker exits 0 when the coordinator tells it the job is over: that one stays down.
        """
        restarted = []
        for c in self.children:
            code = c.proc.poll() if c.proc is not None else None
            if code is not None and code != 0:
                c.restarts += 1
                if c.role in ("worker", "neurons") and c.lost_its_port():
                    c.new_ports()  # they tell the coordinator (or nobody needs) their address
                why = c.last_line()
                c.start()
                restarted.append(f"{c.name} (exit code {code}{': ' + why if why else ''})")
        if restarted:
            self.describe()
        return restarted

    def stop(self) -> None:
        # Workers first so that no push is cut off, then the coordinator, then the data and the shards.
        for role in reversed(ROLE_ORDER):
            group = [c for c in self.children if c.role == role]
            for c in group:  # the whole role at once: their graceful stops overlap
                c.terminate()
            for c in group:
                c.stop()


def job_status(address: str, timeout: float = 2.0, chcfg=None):
    from downpour.v1 import coordinator_pb2, coordinator_pb2_grpc

    with _channel(address, chcfg) as ch:
        return coordinator_pb2_grpc.CoordinatorStub(ch).JobStatus(coordinator_pb2.JobStatusRequest(),
                                                                    timeout=timeout)


def request_checkpoint(address: str, timeout: float = 60.0, chcfg=None):
    from downpour.v1 import coordinator_pb2, coordinator_pb2_grpc

    with _channel(address, chcfg) as ch:
        return coordinator_pb2_grpc.CoordinatorStub(ch).CreateCheckpoint(
            coordinator_pb2.CreateCheckpointRequest(), timeout=timeout)


def _finite_or_null(obj):
    """``obj`` with every NaN or infinity replaced by None: strict JSON has no NaN (a replica
    that has not reported yet has no loss)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def write_outputs(out: str, history: list[dict], cfg: jobconfig.JobConfig, shards: dict | None = None) -> None:
    """metrics.json and loss.png from the progress seen while training."""
    summary = {"config": cfg.to_dict(), "history": history, "shards": shards or {}}
    if history:
        last = history[-1]
        summary["final"] = {"step": last["step"], "replicas": last["replicas"]}
        rates = [h["examples_per_second"] for h in history if h["examples_per_second"] > 0]
        summary["examples_per_second_mean"] = sum(rates) / len(rates) if rates else 0.0
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(_finite_or_null(summary), f, indent=1, allow_nan=False)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for r in range(cfg.replicas):
        pts = [(h["replicas"][r]["step"], h["replicas"][r]["loss"]) for h in history
               if r < len(h["replicas"]) and h["replicas"][r]["loss"] == h["replicas"][r]["loss"]]
        if pts:
            xs, ys = zip(*sorted(set(pts)))
            ax.plot(xs, ys, label=f"replica {r}")
    ax.set_xlabel("step (per replica)")
    ax.set_ylabel("training loss" + (" (TICA)" if not cfg.supervised else " (cross-entropy)"))
    ax.set_title(f"downpour: {cfg.preset if cfg.model is None else 'custom'}, "
                 f"{cfg.replicas} replicas, {cfg.shards} shards")
    if ax.lines:  # no progress seen (a failed start): an empty plot, without a legend warning
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"))
    plt.close(fig)


def steady_rate(history: list[dict], steps: int, batch_size: int, skip: float = 0.2) -> float:
    """Examples/s over the steady part of a run: past ``skip`` of the steps, before the first replica ends."""
    def total(h):
        return sum(r["step"] for r in h["replicas"])

    warm = [h for h in history if h["replicas"] and min(r["step"] for r in h["replicas"]) >= steps * skip]
    end = [h for h in warm if max(r["step"] for r in h["replicas"]) < steps] or warm
    if len(end) < 2 or end[-1]["time"] <= warm[0]["time"]:
        raise ValueError("the run was too short to measure a steady rate; give it more steps")
    return (total(end[-1]) - total(warm[0])) * batch_size / (end[-1]["time"] - warm[0]["time"])


def _snapshot(status) -> dict:
    reps: dict[int, dict] = {}
    for s in status.slots:
        if s.partition == 0:
            reps[s.replica] = {"step": int(s.step), "loss": float(s.loss), "member": s.member_id}
    n = max(reps) + 1 if reps else 0
    return {"time": time.time(), "step": int(status.step), "examples_per_second": float(status.examples_per_second),
            "replicas": [reps.get(r, {"step": 0, "loss": float("nan"), "member": ""}) for r in range(n)]}


def preflight(cfg: jobconfig.JobConfig) -> None:
    """What can be checked before any process starts; raises ValueError naming the problem."""
    if cfg.data != "default" and not cfg.data.startswith("default:"):
        path = cfg.data[len("file://"):] if cfg.data.startswith("file://") else cfg.data
        if not os.path.exists(os.path.expanduser(path)):
            raise ValueError(f"--data: dataset {cfg.data!r} not found: expected 'default', a directory of images, "
                             f"a .npy/.npz file or an IDX file")
        from downpour.evals.common import preprocess_for
        from downpour.feeder.datasets import open_dataset

        try:  # what the feeder will do first: a folder without images or a bad file fails here, not in feeder.log
            ds = open_dataset(cfg.data, preprocess_for(cfg.network_spec(), cfg.normalize))
            n = len(ds)
        except (OSError, ValueError) as e:
            raise ValueError(f"--data {cfg.data!r}: {e}") from None
        if n == 0:
            raise ValueError(f"--data {cfg.data!r}: no examples in it")


class _WarningsToLog:
    """Library warnings (matplotlib, ...) go to <out>/logs/up.log, not to the terminal."""

    def __init__(self, logs: str) -> None:
        import logging

        self.handler = logging.FileHandler(os.path.join(logs, "up.log"), encoding="utf-8", delay=True)
        self.logger = logging.getLogger("py.warnings")

    def __enter__(self) -> "_WarningsToLog":
        import logging

        logging.captureWarnings(True)
        self.logger.addHandler(self.handler)
        self.logger.propagate = False
        return self

    def __exit__(self, *exc: object) -> None:
        import logging

        logging.captureWarnings(False)
        self.logger.removeHandler(self.handler)
        self.handler.close()


def run(cfg: jobconfig.JobConfig, out: str, resume: bool = False, quiet: bool = False,
        start_timeout: float = 90.0, secure: bool = False, neurons: bool = True, memory: str = "") -> int:
    """Run a job to its step count. Returns a process exit code.

    ``memory`` (e.g. "24G") replaces the memory this machine has in the fit check."""
    from downpour import memplan

    try:  # first, before any process starts: a job that cannot fit is refused with the plan's numbers
        memplan.check_fits(cfg, neurons=neurons, memory=memory)
    except MemoryError as e:
        raise ValueError(str(e)) from None
    if cfg.init_from and not resume:
        # job.yaml must mean the same folder to whoever reads it later, whatever its working directory.
        cfg.init_from = os.path.abspath(cfg.init_from)
        from downpour import checkpoint as cks

        if cks.newest_valid(cfg.init_from) is None:
            raise ValueError(f"init_from={cfg.init_from}: no committed checkpoint whose files verify there")
    if cfg.device != "cpu":
        # Checked here, once: a worker that cannot use the device would exit at start, be restarted, exit...
        if cfg.grid() != (1, 1):
            raise ValueError(f"device={cfg.device}: model-parallel partitions ({cfg.partitions}) compute on the "
                             "CPU only; use partitions 1x1 or device cpu")
        # In a child process: the launcher itself keeps no GPU context for the whole run.
        probe = ("import sys\nfrom downpour import device as d\ntry:\n    d.array_module(sys.argv[1])\n"
                 "except d.DeviceError as e:\n    sys.exit(str(e))\n")
        r = subprocess.run([sys.executable, "-c", probe, cfg.device], capture_output=True, text=True)
        if r.returncode != 0:
            raise ValueError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else
                             f"device={cfg.device}: the device check exited {r.returncode}")
    preflight(cfg)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)  # restarts and failures are always told; quiet drops the rest

    def say(*a, **kw):
        if not quiet:
            console.print(*a, **kw)
    env, chcfg = secure_setup(os.path.abspath(out)) if secure else ({}, None)
    cluster = Cluster(cfg, out, resume, env, chcfg, neurons=neurons)
    quiet_warnings = _WarningsToLog(cluster.logs).__enter__()
    history: list[dict] = []
    interrupted = False
    watch: HangWatch | None = None

    def on_sigint(signum, frame):
        nonlocal interrupted
        interrupted = True

    old = signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, on_sigint)
    code = 0
    try:
        say(f"[bold]downpour up[/]: {cfg.replicas} replicas x {cfg.partitions} partitions, "
                      f"{cfg.shards} shards, {cfg.steps} steps, run dir {cluster.out}"
            + (" (mutual TLS and a bearer token: certificates in tls/)" if secure else ""))
        cluster.start(start_timeout)
        watch = HangWatch(cluster.children, cfg.hang_seconds, chcfg, start_timeout)
        watch.start()
        say(f"coordinator at {cluster.coordinator.address}  (downpour status --coordinator "
                      f"{cluster.coordinator.address})")
        if cluster.neurons is not None:
            say(f"neurons at {cluster.neurons.address}  (downpour query --addr {cluster.neurons.address} "
                "--image F --layer stage3.output" + (" with --ca/--cert/--key/--token-file from tls/)" if secure
                                                     else ")"))
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                      disable=quiet) as progress:
            bars = [progress.add_task(f"replica {r}", total=cfg.steps, info="") for r in range(cfg.replicas)]
            while not interrupted:
                while watch.events:
                    console.print(f"[yellow]hung[/] {watch.events.pop(0)}")
                for what in cluster.supervise():
                    console.print(f"[yellow]restarted[/] {what}")
                try:
                    status = job_status(cluster.coordinator.address, chcfg=chcfg)
                except grpc.RpcError:
                    time.sleep(0.5)
                    continue
                snap = _snapshot(status)
                history.append(snap)
                for r, rep in enumerate(snap["replicas"][: cfg.replicas]):
                    progress.update(bars[r], completed=min(rep["step"], cfg.steps),
                                    info=f"loss {rep['loss']:.4g}  {snap['examples_per_second']:.0f} ex/s")
                from downpour.v1 import coordinator_pb2

                if status.state == coordinator_pb2.JOB_STATE_SUCCEEDED:
                    break
                if status.state == coordinator_pb2.JOB_STATE_FAILED:
                    console.print(f"[red]downpour up failed[/]: the job failed at step {status.step}: "
                                  f"{status.message}; logs in {cluster.logs}")
                    code = 1
                    break
                time.sleep(0.25)
        if interrupted:
            console.print("[yellow]interrupted[/]: checkpointing and stopping every service")
            code = 130
            try:
                request_checkpoint(cluster.coordinator.address, chcfg=chcfg)
            except grpc.RpcError as e:
                console.print(f"[red]the last checkpoint was not written[/] ({e.code().name}: {e.details()}); "
                              "the newest committed one is kept")
            except AttributeError:  # interrupted before the coordinator existed
                pass
    except (RuntimeError, TimeoutError) as e:
        console.print(f"[red]downpour up failed[/]: {e}; logs in {cluster.logs}")
        code = 1
    finally:
        if watch is not None:
            watch.stop()
        shard_metrics = cluster.scrape_shards()
        cluster.stop()
        signal.signal(signal.SIGINT, old)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        write_outputs(cluster.out, history, cfg, shard_metrics)
        quiet_warnings.__exit__()
    if code == 0 and history:
        last = history[-1]
        losses = ", ".join(f"{r['loss']:.4g}" for r in last["replicas"])
        say(f"done: step {last['step']}, final loss per replica {losses}; "
                      f"checkpoints, metrics.json and loss.png in {cluster.out}")
    return code
