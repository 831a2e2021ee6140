"""`membrane trace exec`: execsnoop. One line per execve/execveat: who ran what (the full
argv, bounded), under which parent, and whether it worked."""

from __future__ import annotations

import errno

import numpy as np
import typer

from membrane.abi import ExecFlag
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

_SYSCALLS = ("execve", "execveat")
_TRUNCATED = ExecFlag.ARGS_MORE | ExecFlag.ARG_CUT | ExecFlag.ARG_FAULT
# Records are ~130 bytes + the path and arguments as long as they are (at most 8 KiB):
# 16 MiB holds 100,000 execs of a typical command line, 2,000 of the longest.
_RING_BYTES = 16 << 20
_RING_HOLDS = "100,000 execs of ~150 bytes of path and arguments"

COLUMNS_TIME = [Column("time", "TIME", 32)]
COLUMNS = [
    Column("comm", "PCOMM", 16),
    Column("pid", "PID", 7, right=True),
    Column("ppid", "PPID", 7, right=True),
    Column("ret", "RET", 4, right=True),
    Column("args", "ARGS", 0),
]


def _error(ret: int) -> str | None:
    return None if ret >= 0 else errno.errorcode.get(-ret, str(-ret))


def _syscall(number: int) -> str:
    return _SYSCALLS[number] if number < len(_SYSCALLS) else str(number)


def cells(batch: EventBatch, times: bool = True) -> dict[str, Cells]:
    """Decoded events, column by column; the keys are a stable JSON contract. "time" only
    with `times` (the table shows it only with -T). The record's tail is the path, then
    argv, each with its NUL (bpf/abi/trace_proc.h)."""
    task = batch["task"]
    rets = batch["ret"]
    starts, sent = batch.tail()  # sent: without the final NUL
    sent = sent + (batch["data_len"] > 0)  # argv's items keep their NULs
    path_len = np.minimum(batch["path_len"].astype(np.int64), sent)
    argv_starts = starts + path_len
    argv_len = np.maximum(sent - path_len, 0)
    truncated = (batch["flags"] & int(_TRUNCATED)) != 0
    out = cell.task(task, batch["hdr"]["ts_ns"] if times else None, ppid=batch["ppid"])
    out.update(
        ret=cell.ints(rets),
        error=cell.mapped(np.minimum(rets, 0), _error),  # one value for every success
        syscall=cell.mapped(batch["syscall"], _syscall),
        path=cell.tail_text(batch.records.block, starts, np.maximum(path_len - 1, 0)),
        argv=cell.text_lists(batch.records.block, argv_starts, argv_len),
        argv_truncated=cell.booleans(truncated),
        args=cell.text_lists(batch.records.block, argv_starts, argv_len, join=True, more=truncated),
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

    Arguments are shown as long as they are, up to 128 of them and 8 KiB with the
    path; " ..." at the end (in JSON: argv_truncated) says that more were cut.
    PCOMM is the new command name after a successful exec, the caller's after a
    failed one. --pid, --comm and --uid select the process that CALLS exec, as it
    is at that moment: -c bash shows what bash processes run.

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
        cells,
        timestamps=timestamp,
        ring_bytes=_RING_BYTES,
        config={"failed_only": failed},
        tail="data",
        tail_len="data_len",
    )


TOOL = Tool(
    name="exec",
    summary="execsnoop: every execve/execveat with pid, parent, full argv, result",
    requires=("tracepoint",),
    command=command,
)
