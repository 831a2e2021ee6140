"""`membrane trace exit`: exitsnoop. One line per process that ends: how (exit code, or the
signal that killed it and whether it dumped core) and how long it lived."""

from __future__ import annotations

import signal

import numpy as np
import typer

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

_RING_BYTES = 32 << 20
_RING_HOLDS = "0.25 s of a million exits a second"

COLUMNS_TIME = [Column("time", "TIME", 32)]
COLUMNS = [
    Column("comm", "PCOMM", 16),
    Column("pid", "PID", 7, right=True),
    Column("ppid", "PPID", 7, right=True),
    Column("tid", "TID", 7, right=True),
    Column("lifetime_s", "AGE(s)", 8, right=True),
    Column("exit", "EXIT", 0),
]


def decode_status(status: int) -> tuple[int | None, int | None, bool]:
    """(exit code, killing signal, core dumped) of a wait(2) status."""
    sig = status & 0x7F
    if sig:
        return None, sig, bool(status & 0x80)
    return (status >> 8) & 0xFF, None, False


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"SIG{sig}"


def _how(status: int) -> str:
    code, sig, core = decode_status(status)
    if sig is None:
        return f"code {code}"
    return f"signal {sig} ({signal_name(sig)})" + (", core dumped" if core else "")


def cells(batch: EventBatch, times: bool = True) -> dict[str, Cells]:
    """Decoded events, column by column; field names are a stable JSON contract. "time"
    only with `times` (the table shows it only with -T)."""
    task = batch["task"]
    status = batch["status"].astype(np.int64)
    sig = status & 0x7F
    out = cell.task(task, batch["hdr"]["ts_ns"] if times else None, ppid=batch["ppid"])
    out.update(
        status=cell.ints(status),
        exit_code=cell.ints((status >> 8) & 0xFF, nulls=sig != 0),
        signal=cell.ints(sig, nulls=sig == 0),
        signal_name=cell.mapped(sig, lambda s: signal_name(s) if s else None),
        core_dumped=cell.booleans((sig != 0) & (status & 0x80 != 0)),
        exit=cell.mapped(status, _how),
        lifetime_s=cell.fixed(np.rint(batch["lifetime_ns"] / 1e3), 6, 2),
        ends_process=cell.booleans(batch["ends_process"]),
    )
    return out


def command(
    pid: int = PID,
    comm: str = COMM,
    uid: int = UID,
    duration: float = DURATION,
    output: str = OUTPUT,
    failed: bool = typer.Option(
        False,
        "--failed",
        "-x",
        help="Only processes that failed: non-zero exit code or killed by a signal.",
    ),
    timestamp: bool = TIMESTAMP,
    per_thread: bool = typer.Option(
        False, "--per-thread", help="One line per thread that exits, not per process."
    ),
    buffer_size: str = buffer_size_option(_RING_BYTES, _RING_HOLDS),
) -> None:
    """Trace process exits: command, pid, parent, age, exit code or killing signal.

    A process is reported when its last thread exits, with the status that its
    parent's wait() gets. PCOMM and AGE(s) are the process's (its main thread's);
    TID is the thread that went last. With --per-thread each thread that exits
    is a line of its own, with that thread's name, age and exit code.

    Examples:

      membrane trace exit                   # every process that ends

      membrane trace exit -x -T             # only failures and kills, with times

      membrane trace exit -c nginx -o json  # nginx processes ending, JSON lines

      membrane trace exit -p 1234 --per-thread  # each thread of 1234 as it ends
    """
    opts = TraceOptions.parse(pid, comm, uid, duration, output, buffer_size)
    stream_events(
        "trace_exit",
        "exit_event",
        opts,
        (COLUMNS_TIME if timestamp else []) + COLUMNS,
        cells,
        timestamps=timestamp,
        ring_bytes=_RING_BYTES,
        # the lifetime is measured from the event's time, printed or not
        config={"failed_only": failed, "per_thread": per_thread, "events_timestamps": True},
    )


TOOL = Tool(
    name="exit",
    summary="exitsnoop: every process exit with pid, parent, age, exit code or signal",
    requires=("tracepoint",),
    command=command,
)
