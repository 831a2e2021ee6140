"""`membrane trace exec`: execsnoop. One line per execve/execveat: who ran what (the full
argv, bounded), under which parent, and whether it worked."""

from __future__ import annotations

import errno

import numpy as np
import typer

from membrane.abi import ExecFlag
from membrane.bpf.ktime import ktimes_to_iso
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
from membrane.trace.output import Column, text
from membrane.trace.session import stream_events
from membrane.trace.tools import Tool

_SYSCALLS = ("execve", "execveat")
_TRUNCATED = ExecFlag.ARGS_MORE | ExecFlag.ARG_CUT | ExecFlag.ARG_FAULT
_RING_BYTES = 16 << 20  # ~5,700 events of 2.9 KB: an exec storm between two polls fits
_RING_HOLDS = "5,700 execs (records of 2.9 KB)"

COLUMNS_TIME = [Column("time", "TIME", 32)]
COLUMNS = [
    Column("comm", "PCOMM", 16),
    Column("pid", "PID", 7, right=True),
    Column("ppid", "PPID", 7, right=True),
    Column("ret", "RET", 4, right=True),
    Column("args", "ARGS", 0),
]


def records(batch: np.ndarray, times: bool = True) -> list[dict[str, object]]:
    """Decoded events; field names are a stable JSON contract. Without `times`, "time" is
    None (the table shows it only with -T)."""
    task = batch["task"]
    stamps = ktimes_to_iso(batch["hdr"]["ts_ns"]) if times else [None] * len(batch)
    out = []
    for ts, pid, tid, uid, comm, ppid, ret, argc, flags, syscall, path, argv in zip(
        stamps,
        task["pid"].tolist(),
        task["tid"].tolist(),
        task["uid"].tolist(),
        task["comm"].tolist(),
        batch["ppid"].tolist(),
        batch["ret"].tolist(),
        batch["argc"].tolist(),
        batch["flags"].tolist(),
        batch["syscall"].tolist(),
        batch["path"].tolist(),
        batch["argv"].tolist(),
        strict=True,
    ):
        args = [text(a) for a in argv[:argc]]
        truncated = bool(flags & _TRUNCATED)
        out.append(
            {
                "time": ts,
                "pid": pid,
                "tid": tid,
                "ppid": ppid,
                "uid": uid,
                "comm": text(comm),
                "ret": ret,
                "error": errno.errorcode.get(-ret, str(-ret)) if ret < 0 else None,
                "syscall": _SYSCALLS[syscall] if syscall < len(_SYSCALLS) else str(syscall),
                "path": text(path),
                "argv": args,
                "argv_truncated": truncated,
                "args": " ".join(args) + (" ..." if truncated else ""),
            }
        )
    return out


def command(
    pid: int = PID,
    comm: str = COMM,
    uid: int = UID,
    duration: float = DURATION,
    output: str = OUTPUT,
    failed: bool = typer.Option(False, "--failed", "-x", help="Only execs that failed."),
    timestamp: bool = TIMESTAMP,
    buffer_size: str = buffer_size_option(_RING_BYTES, _RING_HOLDS),
) -> None:
    """Trace exec() calls (execve, execveat): command, pid, parent, result, argv.

    Up to 20 arguments of up to 127 bytes each are shown; " ..." at the end (in
    JSON: argv_truncated) says that more were cut. PCOMM is the new command name
    after a successful exec, the caller's after a failed one. --pid, --comm and
    --uid select the process that CALLS exec, as it is at that moment: -c bash
    shows what bash processes run.

    Examples:

      membrane trace exec                   # every exec on the machine

      membrane trace exec -x                # only execs that failed (ENOENT...)

      membrane trace exec -c cron -T        # what cron starts, with times

      membrane trace exec -u 1000 -o json   # user 1000's execs as JSON lines
    """
    opts = TraceOptions.parse(pid, comm, uid, duration, output, buffer_size)
    stream_events(
        "trace_exec",
        "exec_event",
        opts,
        (COLUMNS_TIME if timestamp else []) + COLUMNS,
        records,
        timestamps=timestamp,
        ring_bytes=_RING_BYTES,
        config={"failed_only": failed},
    )


TOOL = Tool(
    name="exec",
    summary="execsnoop: every execve/execveat with pid, parent, full argv, result",
    requires=("tracepoint",),
    command=command,
)
