"""Running `membrane trace TOOL` as a user does, for the trace tools' integration tests:
start it, wait until its programs are attached (the ready line on stderr), stop it with
Ctrl-C, and read its JSON lines."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any

from membrane.trace.session import READY_LINE

TRACE = [sys.executable, "-m", "membrane", "trace"]


def start_tracer(tool: str, *args: str) -> subprocess.Popen[str]:
    """The tool, attached: returns once it said so (or fails with what it said instead)."""
    proc = subprocess.Popen(
        [*TRACE, tool, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()  # blocks until attached (or the tool failed)
    if READY_LINE not in line:
        proc.kill()
        out, err = proc.communicate(timeout=20)
        raise AssertionError(f"tracer did not start: {line}{err}{out}")
    return proc


def stop_tracer_text(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Ctrl-C, then everything it printed: (stdout, stderr)."""
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    return out, err


def stop_tracer(proc: subprocess.Popen[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Ctrl-C a tracer run with `-o json`: (its records, its closing summary)."""
    out, _ = stop_tracer_text(proc)
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert lines and set(lines[-1]) == {"summary"}, out[-2000:]
    return lines[:-1], lines[-1]["summary"]


def run_trace(
    tool: str, *args: str, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """One run to completion (for bad input: it must end by itself)."""
    return subprocess.run(
        [*prefix, *TRACE, tool, *args], capture_output=True, text=True, timeout=60, check=False
    )
