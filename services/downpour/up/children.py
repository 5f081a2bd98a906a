"""One child process of ``downpour up``: how it is started, stopped and read (the child's own
half of the contract that no child outlives the launcher is ``downpour.parent``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field

from downpour.parent import LAUNCHER_PID


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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
        cmd = [
            sys.executable,
            "-m",
            "downpour.cli",
            "serve",
            self.role,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
            *self.args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.extra_env, **{LAUNCHER_PID: str(os.getpid())})
        # Children ignore the terminal's Ctrl-C (their own session): the launcher
        # stops them in order. If the launcher itself is killed, the kernel sends
        # them SIGTERM (``die_with_launcher``), so no cluster outlives its ``downpour up``.
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
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

    def exit_code(self) -> int | None:
        """The process's exit code; None while it runs or before it was started."""
        return self.proc.poll() if self.proc is not None else None

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (if not sent yet), then SIGKILL after ``timeout`` seconds."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
