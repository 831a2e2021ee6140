"""The suite passes however it is started. Under `nohup`, or in the background of a
non-interactive shell (`make test &` from a script), SIGINT and SIGQUIT arrive ignored and
every child inherits that: tests that Ctrl-C a tracer, expect KeyboardInterrupt or a death
by SIGQUIT must set the default action in the child (membrane.testing.signals), and the
cleanup must still kill what they started. Here those tests run in a pytest of their own,
started the way such a shell starts it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
# Each relies on a default disposition in a child: KeyboardInterrupt on SIGINT, a death
# by SIGQUIT, a tracer that ends (with its summary) on Ctrl-C.
GUARDED = (
    "tests/integration/test_netns.py::test_ctrl_c_cleans_up",
    "tests/integration/test_trace_exit.py::test_exit_codes_signals_and_lifetimes",
    "tests/integration/test_trace_tcp_accept.py::test_table_has_bcc_columns",
)


def ignoring_int_and_quit(argv: list[str]) -> list[str]:
    """`argv` started as `nohup` or a background job of `sh -c` would start it."""
    return ["bash", "-c", 'trap "" INT QUIT; exec "$@"', "bash", *argv]


def test_the_wrapper_ignores_what_nohup_ignores() -> None:
    probe = "import signal as s; print(s.getsignal(s.SIGINT), s.getsignal(s.SIGQUIT))"
    out = subprocess.run(
        ignoring_int_and_quit([sys.executable, "-c", probe]),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [str(signal.SIG_IGN)] * 2


def test_signal_tests_pass_with_sigint_and_sigquit_ignored() -> None:
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=90"]
    result = subprocess.run(
        ignoring_int_and_quit([*argv, *GUARDED]),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"{len(GUARDED)} passed" in result.stdout, result.stdout[-2000:]
