"""`membrane trace open`: opensnoop. One line per openat/openat2 call: who opened what,
and the fd or the error it got."""

from __future__ import annotations

import errno
import functools
import os

import numpy as np
import typer

from membrane.bpf.ktime import ktimes_to_iso
from membrane.trace.options import COMM, DURATION, OUTPUT, PID, TIMESTAMP, UID, TraceOptions
from membrane.trace.output import Column, text
from membrane.trace.session import stream_events
from membrane.trace.tools import Tool

_FLAG_NAMES = [
    (getattr(os, n), n)
    for n in (
        "O_WRONLY",
        "O_RDWR",
        "O_CREAT",
        "O_EXCL",
        "O_NOCTTY",
        "O_TRUNC",
        "O_APPEND",
        "O_NONBLOCK",
        "O_DSYNC",
        "O_DIRECT",
        "O_LARGEFILE",
        "O_DIRECTORY",
        "O_NOFOLLOW",
        "O_NOATIME",
        "O_CLOEXEC",
        "O_PATH",
        "O_TMPFILE",
    )
    if hasattr(os, n)
]
_FLAG_NAMES = [(v, n) for v, n in _FLAG_NAMES if n != "O_TMPFILE"]  # O_TMPFILE includes
_SYSCALLS = ("openat", "openat2")  # O_DIRECTORY's bit
# ~25,000 events of 336 bytes, ~100 ms of a tight open loop: what the ring must hold while
# the consumer waits for a CPU. With 1 MiB a loaded 2-CPU machine lost 3 % of 300,000
# opens (bench/trace_open.py).
_RING_BYTES = 8 << 20


_ERRORS = {-code: name for code, name in errno.errorcode.items()}  # by the negative ret


@functools.cache  # a handful of distinct values, met once per event
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


def fields(batch: np.ndarray, times: bool = True) -> dict[str, list[object]]:
    """Decoded events, column by column; the keys are a stable JSON contract. "time" only
    with `times`: the table shows it only with -T, and formatting it costs about as much
    as the rest of the event.

    This is the consumer's hot loop (a busy workload opens a file every few microseconds):
    columns come out of numpy as lists, and what repeats (comm, flags) is converted once."""
    task = batch["task"]
    rets = batch["ret"].tolist()
    flags = batch["flags"].tolist()
    comms: dict[bytes, str] = {}
    out: dict[str, list[object]] = {}
    if times:
        out["time"] = list(ktimes_to_iso(batch["hdr"]["ts_ns"]))
    out.update(
        pid=task["pid"].tolist(),
        tid=task["tid"].tolist(),
        uid=task["uid"].tolist(),
        comm=[comms.get(c) or comms.setdefault(c, text(c)) for c in task["comm"].tolist()],
        ret=rets,
        fd=[r if r >= 0 else None for r in rets],
        error=[None if r >= 0 else _ERRORS.get(r, str(-r)) for r in rets],
        flags=flags,
        flags_text=list(map(flags_text, flags)),
        syscall=[_SYSCALLS[s] if s < len(_SYSCALLS) else str(s) for s in batch["syscall"].tolist()],
        path=list(map(text, batch["path"].tolist())),
    )
    return out


def command(
    pid: int = PID,
    comm: str = COMM,
    uid: int = UID,
    duration: float = DURATION,
    output: str = OUTPUT,
    failed: bool = typer.Option(False, "--failed", "-x", help="Only opens that failed."),
    timestamp: bool = TIMESTAMP,
) -> None:
    """Trace open() calls (openat, openat2): pid, command, fd or error, flags, path.

    Examples:

      membrane trace open                  # every open on the machine

      membrane trace open -p 1234 -x       # failed opens of process 1234

      membrane trace open -c nginx -o json # nginx's opens as JSON lines
    """
    opts = TraceOptions.parse(pid, comm, uid, duration, output)
    stream_events(
        "trace_open",
        "open_event",
        opts,
        (COLUMNS_TIME if timestamp else []) + COLUMNS,
        fields,
        timestamps=timestamp,
        keep=(lambda b: b["ret"] < 0) if failed else None,
        map_sizes={"events": _RING_BYTES},
    )


TOOL = Tool(
    name="open",
    summary="opensnoop: every openat/openat2 with pid, comm, fd or error, flags, path",
    requires=("tracepoint",),
    command=command,
)
