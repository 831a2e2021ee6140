"""`membrane trace open`: opensnoop. One line per openat/openat2 call: who opened what,
and the fd or the error it got."""

from __future__ import annotations

import errno
import os

import numpy as np
import typer

from membrane.bpf.ktime import ktime_to_iso
from membrane.trace.options import COMM, DURATION, OUTPUT, PID, UID, TraceOptions
from membrane.trace.output import Column, Printer, text
from membrane.trace.session import TraceSession
from membrane.trace.tools import Tool

_FLAG_NAMES = [(getattr(os, n), n) for n in (
    "O_WRONLY", "O_RDWR", "O_CREAT", "O_EXCL", "O_NOCTTY", "O_TRUNC", "O_APPEND", "O_NONBLOCK",
    "O_DSYNC", "O_DIRECT", "O_LARGEFILE", "O_DIRECTORY", "O_NOFOLLOW", "O_NOATIME",
    "O_CLOEXEC", "O_PATH", "O_TMPFILE") if hasattr(os, n)]
_FLAG_NAMES = [(v, n) for v, n in _FLAG_NAMES if n != "O_TMPFILE"]  # O_TMPFILE includes
_SYSCALLS = ("openat", "openat2")                                   # O_DIRECTORY's bit


def flags_text(flags: int) -> str:
    """O_RDONLY|O_CLOEXEC style, like strace prints them."""
    names = [] if flags & os.O_ACCMODE else ["O_RDONLY"]
    rest = flags
    for value, name in _FLAG_NAMES:
        if value and flags & value == value:
            names.append(name)
            rest &= ~value
    if rest & ~os.O_ACCMODE:
        names.append(hex(rest & ~os.O_ACCMODE))
    return "|".join(names)


COLUMNS_TIME = [Column("time", "TIME", 15)]
COLUMNS = [
    Column("pid", "PID", 7, right=True),
    Column("comm", "COMM", 16),
    Column("fd", "FD", 4, right=True),
    Column("error", "ERR", 7),
    Column("flags_text", "FLAGS", 20),
    Column("path", "PATH", 0),
]


def records(batch: np.ndarray) -> list[dict[str, object]]:
    """Decoded events; field names are a stable JSON contract."""
    task = batch["task"]
    out = []
    for ts, pid, tid, uid, comm, ret, flags, syscall, path in zip(
            batch["hdr"]["ts_ns"].tolist(), task["pid"].tolist(), task["tid"].tolist(),
            task["uid"].tolist(), task["comm"].tolist(), batch["ret"].tolist(),
            batch["flags"].tolist(), batch["syscall"].tolist(), batch["path"].tolist(),
            strict=True):
        out.append({
            "time": ktime_to_iso(ts),
            "pid": pid,
            "tid": tid,
            "uid": uid,
            "comm": text(comm),
            "ret": ret,
            "fd": ret if ret >= 0 else None,
            "error": errno.errorcode.get(-ret, str(-ret)) if ret < 0 else None,
            "flags": flags,
            "flags_text": flags_text(flags),
            "syscall": _SYSCALLS[syscall] if syscall < len(_SYSCALLS) else str(syscall),
            "path": text(path),
        })
    return out


def command(
    pid: int = PID,
    comm: str = COMM,
    uid: int = UID,
    duration: float = DURATION,
    output: str = OUTPUT,
    failed: bool = typer.Option(False, "--failed", "-x", help="Only opens that failed."),
    timestamp: bool = typer.Option(False, "--timestamp", "-T", help="Show a time column."),
) -> None:
    """Trace open() calls (openat, openat2): pid, command, fd or error, flags, path.

    Examples:

      membrane trace open                  # every open on the machine

      membrane trace open -p 1234 -x       # failed opens of process 1234

      membrane trace open -c nginx -o json # nginx's opens as JSON lines
    """
    opts = TraceOptions.parse(pid, comm, uid, duration, output)
    printer = Printer((COLUMNS_TIME if timestamp else []) + COLUMNS, opts.output)
    with TraceSession("trace_open", opts) as session:
        ring = session.ring("open_event")
        printer.header()

        def show(batch: np.ndarray) -> None:
            for rec in records(batch):
                if not failed or rec["ret"] < 0:  # type: ignore[operator]
                    printer.record(rec)
            printer.flush()

        seconds = session.run(ring, show)
        printer.summary(events=printer.count, lost=ring.lost, seconds=round(seconds, 3))


TOOL = Tool(
    name="open",
    summary="opensnoop: every openat/openat2 with pid, comm, fd or error, flags, path",
    requires=("tracepoint",),
    command=command,
)
