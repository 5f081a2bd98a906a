"""A full disk loses nothing: checkpoints of a real ``downpour up`` on a small tmpfs that fills.

The run's ``checkpoints/`` is a tmpfs of a few MB (``mount -t tmpfs``: needs
root; the tests skip, saying so, where mounting is not possible). A filler file
takes the free space so that the next shard file fails part-way through: the
checkpoint fails with RESOURCE_EXHAUSTED, leaves no folder behind, shows in the
log and the metrics, training goes on, and every committed checkpoint still
verifies; once the filler is gone the next checkpoint commits. A job whose
final checkpoint cannot be written exits 1 and says why.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time

import grpc
import pytest

import harness
from downpour import checkpoint as cks
from downpour.up import request_checkpoint

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def small_tmpfs(path, size: str):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs at {path} (needs root): {r.stderr.strip() or r.returncode}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)  # busy: detach it anyway


def fill(directory, leave: int) -> str:
    """A file taking all but ``leave`` bytes of the file system's free space."""
    path = os.path.join(directory, "filler")
    st = os.statvfs(directory)
    size = max(0, st.f_bavail * st.f_frsize - leave)
    with open(path, "wb") as f:
        try:
            f.write(b"\0" * size)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return path


def _metric(port: int, name: str, **labels) -> float:
    return harness.metric_value(harness.scrape(port), name, **labels) or 0.0


def _folders(ckdir) -> tuple[list[str], list[str]]:
    """(committed, uncommitted) checkpoint folders."""
    names = sorted(n for n in os.listdir(ckdir) if os.path.isdir(os.path.join(ckdir, n)))
    committed = [n for n in names if os.path.exists(os.path.join(ckdir, n, cks.MANIFEST))]
    return committed, [n for n in names if n not in committed]


def _up(procs, out, steps: int, **env) -> harness.Proc:
    return procs.up(
        out,
        "--quiet",
        "--no-neurons",
        *harness.TINY_CLUSTER,
        "--steps",
        str(steps),
        env=env,
        new_session=True,
    )


def test_a_disk_that_fills_fails_checkpoints_cleanly_training_goes_on_and_they_commit_again(tmp_path, procs):
    out = tmp_path / "run"
    ckdir = out / "checkpoints"
    with small_tmpfs(ckdir, "3m"):
        proc = _up(procs, out, 100000, DOWNPOUR_CHECKPOINT_EVERY="50", DOWNPOUR_KEEP_CHECKPOINTS="2")
        try:
            harness.wait_for(lambda: harness.cluster(out) and _folders(ckdir)[0], 90, "a first checkpoint", 0.2, [proc])
            newest = harness.wait_for(lambda: cks.newest_valid(str(ckdir)), 10, "a valid checkpoint", 0.2)
            # One shard file is ~220 kB: leave 100 kB, so the next checkpoint runs out part-way through.
            filler = fill(ckdir, leave=100_000)
            # A checkpoint in flight when the disk filled may still commit: give it the time one takes
            # (attempts follow each other too closely for "none in flight" to be awaited).
            time.sleep(1.0)
            newest = cks.newest_valid(str(ckdir))
            step0 = harness.job_status(out, timeout=2.0).step
            with pytest.raises(grpc.RpcError) as exc:
                request_checkpoint(harness.cluster(out)["coordinator"]["address"], timeout=30)
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.value
            assert "disk is full" in exc.value.details(), exc.value.details()
            # Several failed attempts (the background's too): none leaves a folder, none is taken as valid.
            seen_uncommitted = 0
            for _ in range(25):  # watched for 5 s: the behaviour under test is what stays true meanwhile
                committed, uncommitted = _folders(ckdir)
                seen_uncommitted = max(seen_uncommitted, len(uncommitted))
                assert len(uncommitted) <= 1, uncommitted  # at most the attempt in progress
                assert cks.newest_valid(str(ckdir))["checkpoint_id"] == newest["checkpoint_id"]
                time.sleep(0.2)
            assert harness.job_status(out, timeout=2.0).step > step0 + 20, "training stopped while the disk was full"
            cl = harness.cluster(out)
            assert (
                _metric(
                    cl["coordinator"]["metrics_port"],
                    "downpour_checkpoint_failures_total",
                    component="coordinator",
                    reason="disk_full",
                )
                >= 2
            )
            assert (
                sum(
                    _metric(
                        cl[f"paramserver-{i}"]["metrics_port"],
                        "downpour_checkpoint_failures_total",
                        component="paramserver",
                        reason="disk_full",
                    )
                    for i in (0, 1)
                )
                >= 1
            )
            # The metrics above count the failures; the logs are what an operator reads: they must say why.
            log = (out / "logs" / "coordinator.log").read_text()
            assert "the disk is full" in log and "next attempt in" in log, log[-2000:]
            for i in (0, 1):
                assert "not written" in (out / "logs" / f"paramserver-{i}.log").read_text()
            # Space returns: the next checkpoint (the backoff is at most a few seconds here) commits.
            os.unlink(filler)
            after = harness.wait_for(
                lambda: (lambda m: m if m and m["checkpoint_id"] != newest["checkpoint_id"] else None)(
                    cks.newest_valid(str(ckdir))
                ),
                40,
                "a checkpoint after the disk had room again",
                0.2,
                [proc],
            )
            assert after["step"] > newest["step"]
        finally:
            code = proc.kill(signal.SIGINT, timeout=90)
        assert code == 130, proc.report()
        committed, uncommitted = _folders(ckdir)
        assert not uncommitted, uncommitted
        assert len(committed) <= 2  # keep_checkpoints
        for m in cks.list_manifests(str(ckdir)):
            cks.verify(str(ckdir), m)  # raises on a corrupt or partial one
        assert not [f for _, _, files in os.walk(ckdir) for f in files if ".tmp" in f]  # no temp file left


def test_a_final_checkpoint_that_cannot_be_written_ends_the_job_with_a_clear_error(tmp_path, procs):
    out = tmp_path / "run"
    ckdir = out / "checkpoints"
    with small_tmpfs(ckdir, "1m"):
        fill(ckdir, leave=0)
        t0 = time.monotonic()
        proc = _up(procs, out, 150)
        code = proc.wait(150)
        err = " ".join(proc.text().split())  # the console wraps long lines
        took = time.monotonic() - t0
        assert code == 1, err[-3000:]
        # The exit code says it failed; only its message can say why.
        assert "final checkpoint could not be written" in err and "disk is full" in err, err[-3000:]
        assert took < 120, took  # it did not retry forever
        assert _folders(ckdir) == ([], []), os.listdir(ckdir)
