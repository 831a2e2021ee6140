"""`membrane trace accept`: tcpaccept. One line per passive TCP open, as the process that
accepts it sees it: who accepted, on which local address and port, from which peer."""

from __future__ import annotations

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
from membrane.trace.tcp import (
    IP_COLUMN,
    TASK_COLUMNS,
    address_columns,
    endpoint_cells,
)
from membrane.trace.tools import Tool

_RING_BYTES = 32 << 20
_RING_HOLDS = "0.25 s of a million events a second"

COLUMNS_TIME = [Column("time", "TIME", 15)]
COLUMNS = [
    *TASK_COLUMNS,
    IP_COLUMN,
    *address_columns("raddr", "rport", "R"),
    *address_columns("laddr", "lport", "L"),
]


def cells(batch: EventBatch, times: bool = True) -> dict[str, Cells]:
    """Decoded events, column by column; the keys are a stable JSON contract. "time" only
    with `times` (the table shows it only with -T)."""
    ts_ns = batch["hdr"]["ts_ns"] if times else None
    out = cell.task(batch["task"], ts_ns, unknown_null=True)
    out.update(endpoint_cells(batch["tuple"]))
    return out


def command(
    pid: int = PID,
    comm: str = COMM,
    uid: int = UID,
    duration: float = DURATION,
    output: str = OUTPUT,
    timestamp: bool = TIMESTAMP,
    buffer_size: str = buffer_size_option(_RING_BYTES, _RING_HOLDS),
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
    opts = TraceOptions.parse(pid, comm, uid, duration, output, buffer_size)
    stream_events(
        "trace_tcp_accept",
        "tcp_open_event",
        opts,
        (COLUMNS_TIME if timestamp else []) + COLUMNS,
        cells,
        timestamps=timestamp,
        ring_bytes=_RING_BYTES,
    )


TOOL = Tool(
    name="accept",
    summary="tcpaccept: every accepted TCP connection with pid, comm, addresses and ports",
    requires=("tracepoint",),
    command=command,
)
