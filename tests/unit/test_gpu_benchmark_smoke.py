"""benchmarks/kernels_gpu.py runs end to end without a GPU (--smoke: NumPy, small shapes, tiny).

The script's GPU numbers can only come from a GPU host (benchmarks/gpu.sh);
this keeps the script itself working in between: every workload, the
roofline, the training-rate loop with its time budget, and the JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_gpu_smoke_run_writes_its_json(tmp_path):
    out = tmp_path / "k.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "services"))
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "kernels_gpu.py"),
            "--smoke",
            "--no-torch",
            "--out",
            str(out),
            "--reps",
            "2",
            "--warmup",
            "1",
            "--le2012-batches",
            "8,100000",
            "--le2012-steps",
            "2",
            "--le2012-budget",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["smoke"] and d["device"].startswith("cpu")
    assert [w["workload"] for w in d["workloads"]] == ["stage", "tica_rec"]
    for w in d["workloads"]:
        assert w["impls"]["ours"]["ms"] > 0 and w["flops"] > 0 and w["roofline_tflops"] > 0
        assert w["ours_fraction_of_roofline"] > 0
    runs = d["tiny"]["runs"]
    assert runs[0]["B"] == 8 and runs[0]["images_per_second"] > 0 and runs[0]["loss_last"] < runs[0]["loss_first"]
    assert "skipped" in runs[1] and "time budget" in runs[1]["skipped"]  # a batch that cannot fit is not started
    assert d["met"] == {"stage_speedup_vs_torch": None, "le2012_images_per_second": None}
