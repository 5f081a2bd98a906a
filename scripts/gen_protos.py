"""Regenerate the Python stubs of the wire contract.

    .venv/bin/python scripts/gen_protos.py [--out services]

Compiles every proto/downpour/v1/*.proto with grpcio-tools into the one
package ``downpour.v1`` (``services/downpour/v1/``): ``*_pb2.py`` messages,
``*_pb2_grpc.py`` stubs and typed ``.pyi`` files from mypy-protobuf.
tests/unit/test_proto_drift.py runs this into a temporary directory and fails
if the checked-in stubs differ, so edit the .proto files, never the stubs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_DIR = PROTO_ROOT / "downpour" / "v1"

INIT = '''"""Generated stubs of the downpour.v1 wire contract (see proto/downpour/v1/).

Regenerate with ``python scripts/gen_protos.py``; do not edit by hand.
"""
'''


def _plugin(name: str) -> str:
    # The plugins are console scripts installed next to the interpreter.
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"gen_protos: {name} not found (pip install mypy-protobuf)")
    return found


def generate(out: Path) -> list[Path]:
    """Generate all stubs under ``out`` (the directory holding ``downpour/``)."""
    from grpc_tools import protoc  # dev dependency only

    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_DIR.glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    # protoc resolves relative paths against the cwd; run from the repo root
    # so that the output does not depend on where the script was started.
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        rc = protoc.main(args)
    finally:
        os.chdir(cwd)
    if rc != 0:
        raise SystemExit(f"gen_protos: protoc failed with exit code {rc}")
    pkg = out / "downpour" / "v1"
    (pkg / "__init__.py").write_text(INIT)
    (pkg / "py.typed").write_text("")
    return sorted(p for p in pkg.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "services", help="directory that holds downpour/")
    args = ap.parse_args(argv)
    for p in generate(args.out):
        print(p.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
