"""Judging a `membrane` command refused as bad input, the way DESIGN.md says it must be:
exit code 2, exactly one stderr line `membrane: error: ...` naming the problem, no
traceback, nothing on stdout."""

from __future__ import annotations

import subprocess


def user_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """The one stderr line of a refused command; each of `words` must be in it."""
    shown = f"{result.args} exit {result.returncode}\nout: {result.stdout}\nerr: {result.stderr}"
    assert result.returncode == 2, f"exit code is not 2: {shown}"
    assert "Traceback" not in result.stderr, shown
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"stderr is not exactly one line: {shown}"
    assert lines[0].startswith("membrane: error: "), shown
    assert not result.stdout, f"a refused command printed on stdout: {shown}"
    for word in words:
        assert word in lines[0], f"{word!r} is not named: {shown}"
    return lines[0]
