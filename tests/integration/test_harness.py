"""The test harness itself: wait_for's deadline and message, start-up failures, logs in failure reports."""

from __future__ import annotations

import sys
import time

import pytest

import harness

pytest_plugins = ["pytester"]


def test_wait_for_returns_the_first_truthy_value():
    seen = iter([0, None, "", 7])
    assert harness.wait_for(lambda: next(seen), 5, "a value", every=0.001) == 7


def test_wait_for_keeps_its_deadline_and_says_what_it_waited_for():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"timed out after 0.3 s waiting for the moon to turn blue"):
        harness.wait_for(lambda: False, 0.3, "the moon to turn blue")
    assert 0.3 <= time.monotonic() - t0 < 2


def test_wait_for_quotes_the_last_ignored_error():
    def flaky():
        raise ConnectionError("refused")

    with pytest.raises(TimeoutError, match=r"waiting for a socket \(last: ConnectionError: refused\)"):
        harness.wait_for(flaky, 0.2, "a socket", ignore=(ConnectionError,))
    with pytest.raises(ZeroDivisionError):  # what is not ignored is not swallowed
        harness.wait_for(lambda: 1 / 0, 5, "arithmetic")


def test_a_process_that_exits_ends_the_wait_with_its_exit_code_and_log(tmp_path):
    with harness.Procs(tmp_path) as procs:
        p = procs.cli("bad-config", "serve", "feeder", "--data", str(tmp_path / "nowhere.npz"), "--shape", "1,8,8")
        with pytest.raises(AssertionError) as err:
            harness.wait_for(lambda: False, 120, "the feeder", procs=[p])
    assert "bad-config exited with code 2 while waiting for the feeder" in str(err.value)
    assert "nowhere.npz" in str(err.value)  # its log came with the error


def test_a_service_that_exits_at_start_up_is_reported_with_its_log(tmp_path):
    with harness.Procs(tmp_path) as procs, pytest.raises(AssertionError) as err:
        procs.serve("feeder", "--data", str(tmp_path / "missing"), "--shape", "1,8,8")
    assert "feeder exited with code 2 while waiting for feeder at 127.0.0.1:" in str(err.value)
    assert "missing" in str(err.value).split("== feeder (exit code 2)")[1]


def test_stop_terminates_then_kills(tmp_path):
    # A child that ignores SIGTERM: stop() must still end it.
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    p = harness.Proc("stubborn", [sys.executable, "-c", code], tmp_path / "stubborn.log")
    harness.wait_for(lambda: "up" in p.text(), 30, "the child to install its handler")
    t0 = time.monotonic()
    assert p.stop(timeout=0.5) == -9
    assert time.monotonic() - t0 < 10


def test_a_failing_test_shows_the_logs_of_its_processes(pytester):
    pytester.makeconftest(
        "from harness import procs, pytest_runtest_makereport, pytest_runtest_setup  # noqa: F401 - the hooks are used by pytest, by name\n"
    )
    pytester.makepyfile(
        """
        import sys
        import harness

        def test_fails(procs):
            p = procs.cli("talker", "--help")
            harness.Proc("echo", [sys.executable, "-c", "print('a line from the child')"], procs.tmp / "echo.log").wait(30)
            p.wait(60)
            assert False, "the test's own failure"

        def test_passes(procs):
            harness.Proc("quiet", [sys.executable, "-c", "print('nothing to see')"], procs.tmp / "q.log").wait(30)
        """
    )
    res = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    res.assert_outcomes(passed=1, failed=1)
    out = res.stdout.str()
    assert "log of echo" in out and "a line from the child" in out and "log of talker" in out
    assert "nothing to see" not in out  # a passing test's logs stay out of the report
