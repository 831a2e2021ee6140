"""`membrane trace open`: opensnoop. One line per open/openat/openat2 call: who opened what,
and the fd or the error it got."""

from __future__ import annotations

import errno
import functools
import os
from dataclasses import dataclass

import numpy as np
import typer

from membrane.bpf.fs import ensure_tracefs
from membrane.bpf.probe import supports
from membrane.trace import cells as cell
from membrane.trace.batch import EventBatch
from membrane.trace.cells import Cells
from membrane.trace.options import (
    COMM,
    DURATION,
    OUTPUT,
    PID,
    TIMESTAMP,
    UID,
    TraceOptions,
    buffer_size_option,
)
from membrane.trace.output import Column
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
_SYSCALLS = ("openat", "openat2", "open")  # O_DIRECTORY's bit
# 64 MiB: 0.25 s of a workload opening a million files a second, for paths up to ~180
# bytes (records are 80 bytes + the path; bench/trace_open.py's are ~120 bytes).
_RING_BYTES = 64 << 20
_HAS_OPEN = "syscalls/sys_enter_open"  # not on every architecture (arm64 has only openat)


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


def _error(ret: int) -> str | None:
    return None if ret >= 0 else _ERRORS.get(ret, str(-ret))


def _syscall(number: int) -> str:
    return _SYSCALLS[number] if number < len(_SYSCALLS) else str(number)


def has_open_syscall() -> bool:
    """Whether this kernel has open(2) besides openat (x86_64 does, arm64 does not)."""
    return os.path.exists(f"{ensure_tracefs()}/events/{_HAS_OPEN}")


@dataclass(frozen=True)
class Starts:
    """Where the programs keep an open between entry and exit (bpf/trace_open.bpf.c):
    task-local storage, or where the kernel refuses it from a tracepoint, the `starts`
    hash (the `h_` programs). Only the chosen set loads, and only its map is made."""

    task_storage: bool
    with_open: bool

    @classmethod
    def for_this_kernel(cls) -> Starts:
        return cls(supports("helper_task_storage"), has_open_syscall())

    def programs(self, name: str) -> bool:
        if not self.with_open and name.endswith("_open"):
            return False
        return name.startswith("h_") != self.task_storage

    @property
    def map_sizes(self) -> dict[str, int]:
        return {"starts": 1} if self.task_storage else {}  # the hash preallocates

    @property
    def unused_maps(self) -> tuple[str, ...]:
        return () if self.task_storage else ("task_starts",)


COLUMNS_TIME = [Column("time", "TIME", 15)]
COLUMNS = [
    Column("pid", "PID", 7, right=True),
    Column("comm", "COMM", 16),
    Column("fd", "FD", 4, right=True),
    Column("error", "ERR", 7),
    Column("flags_text", "FLAGS", 20),
    Column("path", "PATH", 0),
]


def cells(batch: EventBatch, times: bool = True) -> dict[str, Cells]:
    """Decoded events, column by column; the keys are a stable JSON contract. "time" only
    with `times` (the table shows it only with -T). Whole columns from numpy; flags,
    errors and syscall names are named once per distinct value."""
    task = batch["task"]
    rets = batch["ret"]
    out = cell.task(task, batch["hdr"]["ts_ns"] if times else None)
    out.update(
        ret=cell.ints(rets),
        fd=cell.ints(rets, nulls=rets < 0),
        error=cell.mapped(np.minimum(rets, 0), _error),  # one value for every success
        flags=cell.ints(batch["flags"]),
        flags_text=cell.mapped(batch["flags"], flags_text),
        syscall=cell.mapped(batch["syscall"], _syscall),
        path=cell.tail_text(batch.records.block, *batch.tail()),
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
    buffer_size: str = buffer_size_option(
        _RING_BYTES, "0.25 s of a million opens a second of paths up to ~180 bytes"
    ),
) -> None:
    """Trace open() calls (openat, openat2, and open where the kernel has it): pid,
    command, fd or error, flags, path (whole, up to PATH_MAX).

    Examples:

      membrane trace open                  # every open on the machine

      membrane trace open -p 1234 -x       # failed opens of process 1234

      membrane trace open -c nginx -o json # nginx's opens as JSON lines
    """
    opts = TraceOptions.parse(pid, comm, uid, duration, output, buffer_size)
    starts = Starts.for_this_kernel()
    stream_events(
        "trace_open",
        "open_event",
        opts,
        (COLUMNS_TIME if timestamp else []) + COLUMNS,
        cells,
        timestamps=timestamp,
        ring_bytes=_RING_BYTES,
        keep=(lambda b: b["ret"] < 0) if failed else None,
        tail="path",
        tail_len="path_len",
        programs=starts.programs,
        map_sizes=starts.map_sizes,
        unused_maps=starts.unused_maps,
    )


TOOL = Tool(
    name="open",
    summary="opensnoop: every open/openat/openat2 with pid, comm, fd or error, flags, path",
    requires=("tracepoint",),
    command=command,
)
