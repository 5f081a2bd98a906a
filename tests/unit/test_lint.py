"""ruff (lint and format) and mypy over the code, as part of the test command.

They run here rather than only in `.ci/run` so that the one command a contributor runs before
pushing is the one CI runs. Both come with the `dev` extra; the settings are in pyproject.toml.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TREES = ["services", "tests", "benchmarks", "scripts"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_lint():
    r = run("ruff", "check", "--no-cache", *TREES)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format():
    r = run("ruff", "format", "--check", "--no-cache", *TREES)
    assert r.returncode == 0, "run `ruff format` on:\n" + r.stdout + r.stderr


def test_mypy():
    # the file list and the excluded generated stubs are in [tool.mypy]
    r = run("mypy")
    assert r.returncode == 0, r.stdout + r.stderr
