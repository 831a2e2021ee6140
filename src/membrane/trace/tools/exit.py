"""`membrane trace exit`: exitsnoop. One line per process that ends: how (exit code, or the
signal that killed it and whether it dumped core) and how long it lived."""

from __future__ import annotations

import signal

import numpy as np
import typer

from membrane.bpf.ktime import ktimes_to_iso
from membrane.trace.options import COMM, DURATION, OUTPUT, PID, TIMESTAMP, UID, TraceOptions
from membrane.trace.output import Column, text
from membrane.trace.session import stream_events
from membrane.trace.tools import Tool

COLUMNS_TIME = [Column("time", "TIME", 32)]
COLUMNS = [
    Column("comm", "PCOMM", 16),
    Column("pid", "PID", 7, right=True),
    Column("ppid", "PPID", 7, right=True),
    Column("tid", "TID", 7, right=True),
    Column("lifetime_s", "AGE(s)", 8, right=True, fmt="{:.2f}".format),
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


def records(batch: np.ndarray, times: bool = True) -> list[dict[str, object]]:
    """Decoded events; field names are a stable JSON contract. Without `times`, "time" is
    None (the table shows it only with -T)."""
    task = batch["task"]
    stamps = ktimes_to_iso(batch["hdr"]["ts_ns"]) if times else [None] * len(batch)
    out = []
    for ts, pid, tid, uid, comm, ppid, status, lifetime, ends in zip(
        stamps,
        task["pid"].tolist(),
        task["tid"].tolist(),
        task["uid"].tolist(),
        task["comm"].tolist(),
        batch["ppid"].tolist(),
        batch["status"].tolist(),
        batch["lifetime_ns"].tolist(),
        batch["ends_process"].tolist(),
        strict=True,
    ):
        code, sig, core = decode_status(status)
        name = signal_name(sig) if sig else None
        how = (
            f"code {code}"
            if sig is None
            else f"signal {sig} ({name})" + (", core dumped" if core else "")
        )
        out.append(
            {
                "time": ts,
                "pid": pid,
                "tid": tid,
                "ppid": ppid,
                "uid": uid,
                "comm": text(comm),
                "status": status,
                "exit_code": code,
                "signal": sig,
                "signal_name": name,
                "core_dumped": core,
                "exit": how,
                "lifetime_s": round(lifetime / 1e9, 6),
                "ends_process": bool(ends),
            }
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
    opts = TraceOptions.parse(pid, comm, uid, duration, output)
    stream_events(
        "trace_exit",
        "exit_event",
        opts,
        (COLUMNS_TIME if timestamp else []) + COLUMNS,
        records,
        timestamps=timestamp,
        config={"failed_only": failed, "per_thread": per_thread},
    )


TOOL = Tool(
    name="exit",
    summary="exitsnoop: every process exit with pid, parent, age, exit code or signal",
    requires=("tracepoint",),
    command=command,
)
