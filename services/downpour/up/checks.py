"""What ``downpour up`` refuses before any process starts (a ValueError naming the problem):
a job whose memory plan does not fit, an ``init_from`` without a valid checkpoint, a device the
workers could not use, a dataset that is missing or empty."""

from __future__ import annotations

import os
import subprocess
import sys

from downpour import checkpoint as cks
from downpour import config as jobconfig
from downpour import memplan
from downpour.evals.common import preprocess_for
from downpour.feeder.datasets import open_dataset

# Run in a child process: the launcher itself keeps no GPU context for the whole run.
_DEVICE_PROBE = (
    "import sys\nfrom downpour import device as d\ntry:\n    d.array_module(sys.argv[1])\n"
    "except d.DeviceError as e:\n    sys.exit(str(e))\n"
)


def check_runnable(cfg: jobconfig.JobConfig, resume: bool, neurons: bool, memory: str) -> None:
    """Every check, in order; makes ``cfg.init_from`` absolute (job.yaml is read from elsewhere later)."""
    try:  # first, before any process starts: a job that cannot fit is refused with the plan's numbers
        memplan.check_fits(cfg, neurons=neurons, memory=memory)
    except MemoryError as e:
        raise ValueError(str(e)) from None
    if cfg.init_from and not resume:
        # job.yaml must mean the same folder to whoever reads it later, whatever its working directory.
        cfg.init_from = os.path.abspath(cfg.init_from)
        if cks.newest_valid(cfg.init_from) is None:
            raise ValueError(f"init_from={cfg.init_from}: no committed checkpoint whose files verify there")
    if cfg.device != "cpu":
        check_device(cfg)
    preflight(cfg)


def check_device(cfg: jobconfig.JobConfig) -> None:
    """Checked here, once: a worker that cannot use the device would exit at start, be restarted, exit..."""
    if cfg.grid() != (1, 1):
        raise ValueError(
            f"device={cfg.device}: model-parallel partitions ({cfg.partitions}) compute on the "
            "CPU only; use partitions 1x1 or device cpu"
        )
    r = subprocess.run([sys.executable, "-c", _DEVICE_PROBE, cfg.device], capture_output=True, text=True)
    if r.returncode != 0:
        raise ValueError(
            r.stderr.strip().splitlines()[-1]
            if r.stderr.strip()
            else f"device={cfg.device}: the device check exited {r.returncode}"
        )


def preflight(cfg: jobconfig.JobConfig) -> None:
    """What can be checked of the dataset before any process starts; raises ValueError naming the problem."""
    if cfg.data != "default" and not cfg.data.startswith("default:"):
        path = cfg.data[len("file://") :] if cfg.data.startswith("file://") else cfg.data
        if not os.path.exists(os.path.expanduser(path)):
            raise ValueError(
                f"--data: dataset {cfg.data!r} not found: expected 'default', a directory of images, "
                f"a .npy/.npz file or an IDX file"
            )
        try:  # what the feeder will do first: a folder without images or a bad file fails here, not in feeder.log
            ds = open_dataset(cfg.data, preprocess_for(cfg.network_spec(), cfg.normalize))
            n = len(ds)
        except (OSError, ValueError) as e:
            raise ValueError(f"--data {cfg.data!r}: {e}") from None
        if n == 0:
            raise ValueError(f"--data {cfg.data!r}: no examples in it")
