"""`downpour up` errors a user can act on: checked before anything starts, or the failing child's own reason.

Each case runs the real launcher in its own process and reads what the
terminal would show (stdout and stderr): here the message is the behaviour under test.
"""

from __future__ import annotations

import subprocess

import numpy as np

import harness


def up(tmp_path, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return harness.run_cli(
        "up",
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--replicas",
        "1",
        "--shards",
        "1",
        "--no-neurons",
        "--out",
        str(tmp_path / "run"),
        *flags,
        env=env,
        timeout=180,
    )


def test_a_missing_or_empty_dataset_is_refused_before_any_process_starts(tmp_path):
    r = up(tmp_path, "--data", "/nonexistent")
    assert r.returncode == 2
    assert "dataset '/nonexistent' not found: expected 'default', a directory of images" in r.stderr
    assert not (tmp_path / "run").exists()  # nothing was started, no run folder left behind
    (tmp_path / "empty").mkdir()
    r = up(tmp_path, "--data", str(tmp_path / "empty"))
    assert r.returncode == 2 and "holds no images" in r.stderr
    np.save(tmp_path / "flat.npy", np.zeros((4, 5, 6, 7, 8), np.uint8))
    r = up(tmp_path, "--data", str(tmp_path / "flat.npy"))
    assert r.returncode == 2 and "flat.npy" in r.stderr, r.stderr


def test_a_child_failing_at_start_shows_its_own_error_and_role(tmp_path):
    """A token file that does not exist: only the children read it. The terminal shows which child failed
    and its own last line; no library warning reaches the terminal (it goes to logs/up.log)."""
    r = up(tmp_path, env={"DOWNPOUR_TOKEN_FILE": str(tmp_path / "no-token")})
    out = " ".join((r.stdout + r.stderr).split())  # the terminal width wraps lines
    assert r.returncode == 1
    assert "paramserver-0 exited with code 1 during start-up" in out
    assert f"No such file or directory: '{tmp_path / 'no-token'}'" in out
    assert "Warning" not in out and "warn" not in out.lower()
