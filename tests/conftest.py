"""Shared by every test directory: the process harness's failure-log hooks and its ``procs`` fixture."""

from __future__ import annotations

# Imported by name so that pytest registers them; they live with the harness they report on.
from harness import procs, pytest_runtest_makereport, pytest_runtest_setup  # noqa: F401 - registered by name
