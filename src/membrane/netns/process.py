"""Programs inside a namespace (iperf3, ping, iptables, ...).

They are started through `nsenter --net=/run/netns/NAME`, which enters only the network
namespace and then execs the program: the PID we get is the program's own, so it can be
stopped by PID, and /sys is left alone (unlike `ip netns exec`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from typing import Any

from membrane.netns.namespace import path


class CommandError(subprocess.CalledProcessError):
    """A command failed inside a namespace; the message carries its stderr, because
    "exit status 1" alone explains nothing in a test log."""

    def __init__(self, ns: str, result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(result.returncode, result.args, result.stdout, result.stderr)
        self.ns = ns

    def __str__(self) -> str:
        tail = (self.stderr or "").strip()[-2000:]
        return f"{super().__str__()} in network namespace {self.ns}" + (f": {tail}" if tail else "")


def command(ns: str, argv: Sequence[str]) -> list[str]:
    """`argv` wrapped to run in `ns` (also what to show a person who wants to repeat it)."""
    return ["nsenter", f"--net={path(ns)}", "--", *argv]


def run(
    ns: str,
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = 60,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run to completion with text stdout/stderr captured. On timeout or Ctrl-C the
    program is killed (subprocess.run does that) before the exception propagates."""
    result = subprocess.run(
        command(ns, argv), capture_output=True, text=True, timeout=timeout, input=input, check=False
    )
    if check and result.returncode != 0:
        raise CommandError(ns, result)
    return result


def popen(ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
    """Start in the background, in a session of its own so a Ctrl-C meant for us does not
    reach it half-way through; stop it with `stop` (Topology.popen does that for you)."""
    kwargs.setdefault("stdout", subprocess.DEVNULL)
    kwargs.setdefault("stderr", subprocess.DEVNULL)
    kwargs.setdefault("text", True)
    return subprocess.Popen(command(ns, argv), start_new_session=True, **kwargs)


def stop(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    """SIGTERM the program, SIGKILL it after `grace` seconds, and reap it. When it leads a
    process group of its own (`popen` gives it one, so helpers a shell started go too) the
    whole group is signalled; otherwise only the program itself, by its PID: a child that
    shares our group must not take us (or the test run) with it."""
    if proc.poll() is None:
        leads_group = _leads_group(proc.pid)
        _signal(proc, signal.SIGTERM, leads_group)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
        # Still ours: the group id stays allocated while any member lives, even once the
        # leader is reaped, so this reaches only what the program left behind.
        _signal(proc, signal.SIGKILL, leads_group)
        proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _leads_group(pid: int) -> bool:
    """Whether `pid` (a child not reaped yet, so the PID is still its) leads its group."""
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def _signal(proc: subprocess.Popen[Any], signum: int, group: bool) -> None:
    if group:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)  # a no-op once reaped: never a recycled PID
