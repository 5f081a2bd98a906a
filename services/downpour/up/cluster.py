"""The children of one ``downpour up``: started in order (shards and feeder, the coordinator,
then the workers and the neurons service), restarted when they die, stopped in reverse, and
described in ``cluster.json`` for operators and tests."""

from __future__ import annotations

import json
import os

from downpour import config as jobconfig
from downpour.rpc.channel import ChannelConfig
from downpour.up.children import Child, free_port
from downpour.up.health import wait_healthy
from downpour.up.threads import threads_env

# Start order; stops run in reverse (the neurons service and the workers first).
ROLE_ORDER = ("paramserver", "feeder", "coordinator", "worker", "neurons")


class Cluster:
    """The children of one ``downpour up`` and what it takes to run them."""

    def __init__(
        self,
        cfg: jobconfig.JobConfig,
        out: str,
        resume: bool,
        secure_env: dict[str, dict[str, str]] | None = None,
        chcfg: ChannelConfig | None = None,
        neurons: bool = True,
    ):
        self.cfg, self.out, self.resume, self.with_neurons = cfg, os.path.abspath(out), resume, neurons
        self.neurons: Child | None = None
        self.coordinator: Child | None = None
        self.children: list[Child] = []
        self.logs = os.path.join(self.out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.ckpt_dir = os.path.join(self.out, "checkpoints")
        self.job_path = os.path.join(self.out, "job.yaml")
        if not resume:
            with open(self.job_path, "w", encoding="utf-8") as f:
                f.write(cfg.to_yaml())
        self.env = secure_env or {}  # role -> its children's DOWNPOUR_* security variables
        self.chcfg = chcfg  # how the launcher itself calls the services (None: plaintext)

    def _child(self, name: str, role: str, args: list[str]) -> Child:
        rows, cols = self.cfg.grid()
        c = Child(
            name,
            role,
            args,
            free_port(),
            free_port(),
            os.path.join(self.logs, f"{name}.log"),
            extra_env={**threads_env(role, self.cfg.replicas * rows * cols), **self.env.get(role, {})},
        )
        self.children.append(c)
        return c

    def start(self, timeout: float = 60.0) -> None:
        cfg = self.cfg
        shards = [
            self._child(f"paramserver-{i}", "paramserver", ["--shard-index", str(i), "--checkpoint-dir", self.ckpt_dir])
            for i in range(cfg.shards)
        ]
        feeder = self._child("feeder", "feeder", ["--config", self.job_path])
        for c in shards + [feeder]:
            c.start()
        for c in shards + [feeder]:
            self._wait_started(c, timeout)
        coord_args = [
            "--config",
            self.job_path,
            "--shards",
            ",".join(s.address for s in shards),
            "--feeder",
            feeder.address,
            "--state-dir",
            os.path.join(self.out, "coordinator"),
            "--checkpoint-dir",
            self.ckpt_dir,
        ]
        if self.resume:
            coord_args.append("--resume")
        coordinator = self.coordinator = self._child("coordinator", "coordinator", coord_args)
        coordinator.start()
        self._wait_started(coordinator, timeout)
        # A restarted coordinator re-adopts the cluster from its state directory:
        # restoring the checkpoint again would throw away the progress since.
        coordinator.args = [a for a in coord_args if a != "--resume"]
        rows, cols = cfg.grid()
        # Workers are interchangeable: the coordinator decides which slot each one fills.
        for i in range(cfg.replicas * rows * cols):
            self._child(f"worker-{i}", "worker", ["--coordinator", coordinator.address, "--device", cfg.device]).start()
        if self.with_neurons:
            # Watch neurons while they train: live parameters from the shards, re-pulled every 5 s.
            # Not waited for: it turns healthy once it holds parameters, and training does not need it.
            self.neurons = self._child(
                "neurons",
                "neurons",
                ["--coordinator", coordinator.address, "--refresh-seconds", "5", "--device", cfg.device],
            )
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
                    raise RuntimeError(
                        f"{c.name} exited with code {c.exit_code()} during start-up: "
                        f"{c.last_line() or '(no output)'}\n  (its log: {c.log_path})"
                    ) from None
                c.new_ports()
                c.start()

    def describe(self) -> None:
        """Write cluster.json: every child's role, addresses and pid (for operators and tests)."""
        rows = [
            {
                "name": c.name,
                "role": c.role,
                "address": c.address,
                "metrics_port": c.metrics_port,
                "pid": c.proc.pid if c.proc else None,
                "restarts": c.restarts,
                "hangs": c.hangs,
            }
            for c in self.children
        ]
        tmp = os.path.join(self.out, ".cluster.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, os.path.join(self.out, "cluster.json"))

    def supervise(self) -> list[str]:
        """Restart children that died (a non-zero exit); returns what was restarted.

        A worker exits 0 when the coordinator tells it the job is over: that one stays down.
        """
        restarted = []
        for c in self.children:
            code = c.exit_code()
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
