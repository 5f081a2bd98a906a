"""The rights table against the generated descriptors, and the roles file."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

import downpour.v1
from downpour.rpc import rights


def _every_method() -> set[str]:
    out = set()
    for mod in pkgutil.iter_modules(downpour.v1.__path__):
        if not mod.name.endswith("_pb2"):
            continue
        desc = importlib.import_module(f"downpour.v1.{mod.name}").DESCRIPTOR
        for service in desc.services_by_name.values():
            out |= {f"/{service.full_name}/{m.name}" for m in service.methods}
    return out


def test_the_table_names_every_method_of_every_service_and_nothing_else():
    methods = _every_method()
    assert len(methods) > 20  # the descriptors were found
    assert set(rights.RIGHTS) == methods, (
        f"missing from downpour.rpc.rights: {sorted(methods - set(rights.RIGHTS))}; "
        f"no such method: {sorted(set(rights.RIGHTS) - methods)}"
    )


def test_admin_may_call_everything_and_every_role_is_known():
    for method, roles in rights.RIGHTS.items():
        assert rights.ADMIN in roles, method
        assert roles <= set(rights.ROLES), method


def test_the_neurons_role_only_reads_and_the_reader_only_queries():
    neurons = {m for m, r in rights.RIGHTS.items() if "neurons" in r}
    assert neurons == {
        "/downpour.v1.ParameterServer/ListBlocks",
        "/downpour.v1.ParameterServer/Pull",
        "/downpour.v1.Coordinator/JobStatus",
    }
    reader = {m for m, r in rights.RIGHTS.items() if "reader" in r}
    assert reader and all(m.startswith("/downpour.v1.Neurons/") for m in reader)
    for role in ("paramserver", "feeder"):  # they call nobody
        assert not any(role in r for r in rights.RIGHTS.values()), role


def test_unlisted_downpour_methods_are_denied_and_health_is_open_to_every_role():
    assert not rights.allowed(rights.ADMIN, "/downpour.v1.ParameterServer/Wipe")
    assert not rights.allowed("worker", "/downpour.v2.ParameterServer/Pull")
    for role in rights.ROLES:
        assert rights.allowed(role, "/grpc.health.v1.Health/Watch")
    assert rights.allowed("worker", "/downpour.v1.ParameterServer/Push")
    assert not rights.allowed("neurons", "/downpour.v1.ParameterServer/InitBlocks")


def test_written_credentials_read_back_one_role_per_token(tmp_path):
    creds = rights.write_role_credentials(tmp_path)
    entries = rights.read_roles_file(creds["roles_file"])
    assert sorted(r for _, r in entries) == sorted(rights.ROLES)
    for role in rights.ROLES:
        token = (tmp_path / f"token-{role}").read_text().strip()
        assert rights.role_of(token, entries) == role
        assert oct((tmp_path / f"token-{role}").stat().st_mode & 0o777) == "0o600"
    assert rights.role_of("not a token of any role", entries) is None
    assert token not in (tmp_path / "roles").read_text()  # digests only


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("", "no role in it"),
        ("# only a comment\n", "no role in it"),
        ("wizard " + "ab" * 32 + "\n", "line 1: unknown role 'wizard'"),
        ("worker abc\n", "line 1: the digest is not 64 hex digits"),
        ("worker\n", "line 1: expected '<role> <sha256 hex of the token>'"),
        ("worker " + "ab" * 32 + "\nadmin " + "ab" * 32 + "\n", "line 2: this token's digest is listed twice"),
    ],
)
def test_a_malformed_roles_file_stops_the_service_naming_the_line(tmp_path, content, says):
    path = tmp_path / "roles"
    path.write_text(content)
    with pytest.raises(SystemExit) as e:
        rights.read_roles_file(str(path))
    assert str(path) in str(e.value) and says in str(e.value)


def test_a_missing_roles_file_is_named(tmp_path):
    with pytest.raises(SystemExit, match="cannot read it"):
        rights.read_roles_file(str(tmp_path / "nope"))


def test_docs_show_the_rights_table_as_it_is():
    docs = (Path(__file__).parents[2] / "docs" / "operations.md").read_text(encoding="utf-8")
    assert rights.markdown_table() in docs, "paste downpour.rpc.rights.markdown_table() into docs/operations.md"
