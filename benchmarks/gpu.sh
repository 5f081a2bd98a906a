#!/usr/bin/env bash
# The GPU checks in one run, for a GPU host with CuPy, PyTorch, grpcio, numpy,
# prometheus-client and pytest installed and no network, from the repository
# root, without installing the project (PYTHONPATH=services):
#
#   benchmarks/gpu.sh OUTDIR
#
#   1. parity: tests/unit/test_kernels_gpu.py (downpour.nn on CuPy against
#      NumPy), the host-built kernel tests and the NVRTC compile test;
#   2. benchmarks/kernels_gpu.py: one stage forward+backward against PyTorch
#      CUDA at the CPU benchmark's and le2012's stage shapes (TFLOP/s, fraction
#      of roofline), and le2012's training rate with synthetic input;
#   3. benchmarks/gpu_e2e.py: downpour up --device gpu trains tiny (needs the
#      services' dependencies; where the host lacks them, wheels made by
#      benchmarks/gpu_wheels.sh in benchmarks/wheels are installed into a
#      temporary folder for this step; otherwise it is skipped with the reason).
#
# Writes OUTDIR/gpu-results.json (the GPU's name, every step's status and
# numbers) and each step's log and JSON beside it. Each step has its own time
# limit (120 + 240 + 100 s): the whole run stays under 8 minutes. Exit status: 0 when every step
# that ran passed.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/services${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/downpour-cupy-cache}
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$OUT/nvidia-smi.txt" 2>&1 || true
echo "== GPU: $(head -1 "$OUT/nvidia-smi.txt")"

echo "== 1. parity tests ($(elapsed) s)"
timeout 120 "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT/parity.xml" \
    tests/unit/test_kernels_gpu.py tests/unit/test_kernels_host.py tests/unit/test_kernels_nvrtc.py \
    2>&1 | tee "$OUT/parity.log"
parity_rc=${PIPESTATUS[0]}

echo "== 2. kernel benchmark and le2012 training rate ($(elapsed) s)"
timeout 240 "$PY" benchmarks/kernels_gpu.py --out "$OUT/kernels_gpu.json" --le2012-budget 100 \
    2>&1 | tee "$OUT/kernels_gpu.log"
bench_rc=${PIPESTATUS[0]}

echo "== 3. end to end: downpour up --device gpu ($(elapsed) s)"
E2E_PATH=$PYTHONPATH
if ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
    site=$(mktemp -d /tmp/downpour-site.XXXXXX)
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" benchmarks/wheels/*.whl \
        >"$OUT/wheels.log" 2>&1; then
        E2E_PATH="$PWD/services:$site${PYTHONPATH#"$PWD/services"}"
    else
        echo "installing benchmarks/wheels failed (see wheels.log); using the host's packages"
    fi
fi
PYTHONPATH=$E2E_PATH timeout 100 "$PY" benchmarks/gpu_e2e.py --out "$OUT/e2e.json" --timeout 90 \
    2>&1 | tee "$OUT/e2e.log"
e2e_rc=${PIPESTATUS[0]}

echo "== done in $(elapsed) s"
"$PY" - "$OUT" "$parity_rc" "$bench_rc" "$e2e_rc" "$(elapsed)" <<'PYEOF'
import json, os, sys
import xml.etree.ElementTree as ET

out, parity_rc, bench_rc, e2e_rc, seconds = sys.argv[1], *map(int, sys.argv[2:6])

def load(name):
    try:
        with open(os.path.join(out, name), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}

parity = {"exit_code": parity_rc}
try:
    root = ET.parse(os.path.join(out, "parity.xml")).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    for k in ("tests", "failures", "errors", "skipped"):
        parity[k] = int(suite.get(k, 0))
    parity["skipped_reasons"] = sorted({s.get("message", "") for s in root.iter("skipped")})
    parity["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None]
except (OSError, ET.ParseError) as e:
    parity["error"] = f"{type(e).__name__}: {e}"
with open(os.path.join(out, "nvidia-smi.txt"), encoding="utf-8") as f:
    smi = f.read().strip()
bench, e2e = load("kernels_gpu.json"), load("e2e.json")
result = {"gpu": bench.get("device") or smi, "nvidia_smi": smi, "seconds": seconds, "parity": parity,
          "kernels": dict(bench, exit_code=bench_rc), "e2e": dict(e2e, exit_code=e2e_rc)}
with open(os.path.join(out, "gpu-results.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
print(json.dumps({"gpu": result["gpu"], "seconds": seconds, "parity": {k: parity.get(k) for k in
                  ("tests", "failures", "errors", "skipped")}, "kernels_met": bench.get("met"),
                  "e2e_ok": e2e.get("ok")}))
PYEOF
[ "$parity_rc" = 0 ] && [ "$bench_rc" = 0 ] && { [ "$e2e_rc" = 0 ]; }
