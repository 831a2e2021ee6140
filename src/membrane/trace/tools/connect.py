"""`membrane trace connect`: tcpconnect. One line per active TCP open (connect), IPv4 and
IPv6: who connected, from which address and port to which."""

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
    *address_columns("saddr", "sport", "S"),
    *address_columns("daddr", "dport", "D"),
]


def cells(batch: EventBatch, times: bool = True) -> dict[str, Cells]:
    """Decoded events, column by column; the keys are a stable JSON contract. "time" only
    with `times` (the table shows it only with -T)."""
    ts_ns = batch["hdr"]["ts_ns"] if times else None
    out = cell.task(batch["task"], ts_ns, unknown_null=True)
    out.update(endpoint_cells(batch["tuple"], local=("saddr", "sport"), remote=("daddr", "dport")))
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
    """Trace TCP connects (active opens, IPv4 and IPv6): pid, command, source and
    destination address and port. Sockets of every network namespace are
    seen.

    A connect is reported when its source port is known: when connect()
    returns (at once for a non-blocking connect, after the handshake for a
    blocking one) or when the socket leaves SYN_SENT, whichever is first.
    Failed attempts are reported too.

    Examples:

      membrane trace connect                 # every connect on the machine

      membrane trace connect -p 1234         # connects of process 1234

      membrane trace connect -c curl -o json # curl's connects as JSON lines
    """
    opts = TraceOptions.parse(pid, comm, uid, duration, output, buffer_size)
    stream_events(
        "trace_tcp_connect",
        "tcp_open_event",
        opts,
        (COLUMNS_TIME if timestamp else []) + COLUMNS,
        cells,
        timestamps=timestamp,
        ring_bytes=_RING_BYTES,
    )


TOOL = Tool(
    name="connect",
    summary="tcpconnect: every TCP connect (IPv4/IPv6) with pid, comm, addresses and ports",
    requires=("tracepoint",),
    command=command,
)
