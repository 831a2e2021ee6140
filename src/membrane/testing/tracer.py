"""Running `membrane trace TOOL` as a user does, for the trace tools' tests and benchmarks:
start it, return once its programs are attached (the ready line, the first thing it says
on stderr), stop it the way a person does (Ctrl-C or SIGTERM)."""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import IO

from membrane.testing.signals import with_default_signals
from membrane.trace.session import READY_LINE

TRACE = [sys.executable, "-m", "membrane", "trace"]


def start_tracer(*args: str, stdout: int | IO[str] = subprocess.PIPE) -> subprocess.Popen[str]:
    """`membrane trace ARGS`, attached: returns once it said so; fails with what it said
    instead (it is killed then). Ctrl-C (SIGINT) stops it even when this process was
    started with SIGINT ignored (signals.with_default_signals)."""
    proc = subprocess.Popen(
        with_default_signals([*TRACE, *args]), stdout=stdout, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()  # blocks until attached (or the tool failed)
    if READY_LINE not in line:
        proc.kill()
        out, err = proc.communicate(timeout=20)
        raise RuntimeError(f"membrane trace {' '.join(args)} did not start: {line}{err}{out or ''}")
    return proc


def stop_tracer_text(
    proc: subprocess.Popen[str], signum: int = signal.SIGINT, timeout: float = 20
) -> tuple[str, str]:
    """Stop a tracer with `signum`; what it printed, (stdout, stderr), once it exited 0.
    A tracer still running after `timeout` seconds is killed before the failure is raised."""
    proc.send_signal(signum)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"membrane trace exited with {proc.returncode}: {err}")
    return out or "", err
