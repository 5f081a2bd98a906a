"""The checked-in stubs in services/downpour/v1 are exactly what
scripts/gen_protos.py generates from proto/downpour/v1 (no hand edits, no
forgotten regeneration)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKED_IN = ROOT / "services" / "downpour" / "v1"


def _load_gen():
    pytest.importorskip("grpc_tools")
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def test_regenerating_changes_nothing(tmp_path: Path) -> None:
    gen = _load_gen()
    gen.generate(tmp_path)
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "downpour" / "v1").iterdir() if p.is_file()}
    current = {p.name: p.read_bytes() for p in CHECKED_IN.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(current), "stub files differ: run scripts/gen_protos.py"
    stale = [name for name in fresh if fresh[name] != current[name]]
    assert not stale, f"stale stubs {stale}: run scripts/gen_protos.py"


def test_contract_conventions() -> None:
    """package downpour.v1, *_UNSPECIFIED enum zeros, one Request/Response per RPC."""
    from downpour.v1 import common_pb2, coordinator_pb2, feeder_pb2, neurons_pb2, paramserver_pb2, worker_pb2

    for mod in (common_pb2, coordinator_pb2, feeder_pb2, neurons_pb2, paramserver_pb2, worker_pb2):
        fd = mod.DESCRIPTOR
        assert fd.package == "downpour.v1"
        for enum in fd.enum_types_by_name.values():
            assert enum.values_by_number[0].name.endswith("_UNSPECIFIED"), enum.full_name
        for svc in fd.services_by_name.values():
            for m in svc.methods:
                assert m.input_type.name == f"{m.name}Request", m.full_name
                assert m.output_type.name == f"{m.name}Response", m.full_name
