"""`membrane trace accept`: tcpaccept. One line per passive TCP open, as the process that
accepts it sees it: who accepted, on which local address and port, from which peer."""

from __future__ import annotations

import numpy as np

from membrane.bpf.ktime import ktimes_to_iso
from membrane.trace.options import COMM, DURATION, OUTPUT, PID, TIMESTAMP, UID, TraceOptions
from membrane.trace.output import Column
from membrane.trace.session import stream_events
from membrane.trace.tcp import (
    IP_COLUMN,
    TASK_COLUMNS,
    address_columns,
    endpoint_fields,
    task_fields,
)
from membrane.trace.tools import Tool

COLUMNS_TIME = [Column("time", "TIME", 15)]
COLUMNS = [
    *TASK_COLUMNS,
    IP_COLUMN,
    *address_columns("raddr", "rport", "R"),
    *address_columns("laddr", "lport", "L"),
]


def fields(batch: np.ndarray, times: bool = True) -> dict[str, list[object]]:
    """Decoded events, column by column; the keys are a stable JSON contract. "time" only
    with `times` (the table shows it only with -T)."""
    out: dict[str, list[object]] = {}
    if times:
        out["time"] = list(ktimes_to_iso(batch["hdr"]["ts_ns"]))
    out.update(task_fields(batch["task"]))
    out.update(endpoint_fields(batch["tuple"]))
    return out


def command(
    pid: int = PID,
    comm: str = COMM,
    uid: int = UID,
    duration: float = DURATION,
    output: str = OUTPUT,
    timestamp: bool = TIMESTAMP,
) -> None:
    """Trace TCP accepts (passive opens, IPv4 and IPv6): pid, command, remote and
    local address and port. Sockets of every network namespace are seen.

    An accept is reported when accept()/accept4() returns the connection
    to a process; connections nobody accepts, and accepts through
    io_uring, are not reported.

    Examples:

      membrane trace accept                  # every accepted connection

      membrane trace accept -c nginx         # connections nginx accepts

      membrane trace accept -o json          # as JSON lines
    """
    opts = TraceOptions.parse(pid, comm, uid, duration, output)
    stream_events(
        "trace_tcp_accept",
        "tcp_open_event",
        opts,
        (COLUMNS_TIME if timestamp else []) + COLUMNS,
        fields,
        timestamps=timestamp,
    )


TOOL = Tool(
    name="accept",
    summary="tcpaccept: every accepted TCP connection with pid, comm, addresses and ports",
    requires=("tracepoint",),
    command=command,
)
