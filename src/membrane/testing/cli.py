"""Judging a `membrane` command refused as bad input, the way DESIGN.md says it must be:
exit code 2, exactly one stderr line `membrane: error: ...` naming the problem, no
traceback, nothing on stdout; and running one without privileges."""

from __future__ import annotations

import subprocess

# Prefix a command to run it without any capability, still as uid 0: the inheritable and
# bounding sets emptied, so the exec grants root nothing. `membrane` says what it lacks
# from its missing capabilities (membrane.bpf.probe.missing_capabilities), so this is what
# an unprivileged user sees, while the checkout stays readable: switching to `nobody`
# instead fails with "No module named membrane" in a clone under /root (mode 0700).
WITHOUT_CAPABILITIES = ("setpriv", "--inh-caps=-all", "--bounding-set=-all", "--")


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
