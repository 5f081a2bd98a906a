"""``python -m downpour.rpc.issue``: a deployment's credentials, each in a folder of its own."""

from __future__ import annotations

import pytest

pytest.importorskip("cryptography")

from downpour.rpc import issue, rights


def test_issue_writes_one_folder_per_mount_and_keeps_them_on_a_second_run(tmp_path, capsys):
    assert issue.main([str(tmp_path), "--names", "coordinator,paramserver-0,localhost,127.0.0.1"]) == 0
    entries = rights.read_roles_file(str(tmp_path / "tls" / "roles"))
    assert sorted(r for _, r in entries) == sorted((*issue.SERVICE_ROLES, *issue.PEOPLE))
    for role in issue.SERVICE_ROLES:
        folder = tmp_path / f"token-{role}"
        assert sorted(p.name for p in folder.iterdir()) == ["token"], role  # its own token, nothing else
        assert rights.role_of((folder / "token").read_text().strip(), entries) == role
        assert oct((folder / "token").stat().st_mode & 0o777) == "0o600"
    for person in issue.PEOPLE:
        token = (tmp_path / "operator" / f"token-{person}").read_text().strip()
        assert rights.role_of(token, entries) == person
    assert sorted(p.name for p in (tmp_path / "tls").iterdir()) == ["ca.pem", "node.key", "node.pem", "roles"]
    assert oct((tmp_path / "tls" / "node.key").stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in (tmp_path / "metrics").iterdir()) == ["ca.pem", "client.key", "client.pem"]
    assert not any("token" in p.name for p in (tmp_path / "metrics").iterdir())
    before = (tmp_path / "tls" / "roles").read_text()
    assert issue.main([str(tmp_path), "--names", "x"]) == 0
    assert (tmp_path / "tls" / "roles").read_text() == before  # running again keeps what services hold
    assert "kept" in capsys.readouterr().out
