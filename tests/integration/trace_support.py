"""The trace tools' integration tests beyond starting and stopping a tracer
(membrane.testing.tracer): its JSON lines, and runs that must end by themselves."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from membrane.testing.tracer import TRACE, stop_tracer_text


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
