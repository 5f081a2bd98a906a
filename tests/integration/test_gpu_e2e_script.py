"""benchmarks/gpu_e2e.py with --device cpu: the GPU host's end-to-end check, run where there is no GPU.

The same cluster (downpour up, two replicas of tiny, one shard, the neurons
service) on the CPU, so that the script's checks (exit status, every worker
and the neurons service on the asked device, the loss going down) are known
to work before a GPU host runs them with --device gpu.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_e2e_script_on_the_cpu(tmp_path):
    out = tmp_path / "e2e.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "services"))
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_e2e.py"),
            "--device",
            "cpu",
            "--steps",
            "30",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    d = json.loads(out.read_text())
    assert r.returncode == 0 and d["ok"], {k: v for k, v in d.items()}
    assert d["workers_on_device"] == ["worker-0.log", "worker-1.log"] and d["neurons_on_device"]
    assert d["final"]["step"] == 30
    assert sum(d["loss_last"]) / 2 < max(d["loss_first"])  # it trained (a replica may report only once)
