#!/usr/bin/env bash
# Wheels of the services' Python dependencies that a GPU host with CuPy, PyTorch,
# numpy, grpcio and prometheus-client may lack or have in other versions (the
# gRPC health, reflection and status packages, protobuf and grpcio matching the
# generated stubs, cryptography), for a host without a package index:
#
#   benchmarks/gpu_wheels.sh [DIR]     # default benchmarks/wheels (git-ignored)
#
# benchmarks/gpu.sh installs them from there into a temporary folder for its
# end-to-end step only. Versions are those installed here (PYTHON, default
# .venv/bin/python); PYVER (default 3.12) is the GPU host's Python.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/wheels}
PY=${PYTHON:-.venv/bin/python}
PYVER=${PYVER:-3.12}
mkdir -p "$out"
specs=()
for n in grpcio grpcio-health-checking grpcio-reflection grpcio-status googleapis-common-protos protobuf cryptography cffi pycparser; do
    v=$("$PY" -c "import importlib.metadata as m; print(m.version('$n'))")
    specs+=("$n==$v")
done
# manylinux tags differ per package; pip matches each tag exactly, so list the usual ones.
plats=()
for t in manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014; do
    plats+=(--platform "${t}_x86_64")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${plats[@]}" -d "$out" "${specs[@]}"
ls -1 "$out"/*.whl
du -sh "$out"
