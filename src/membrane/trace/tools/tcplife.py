"""`membrane trace tcplife`: one line per closed TCP connection with its process, ends,
bytes sent and received, and how long it lived."""

from __future__ import annotations

import numpy as np

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

# open_state of struct tcp_life_event: TCP_SYN_SENT, TCP_SYN_RECV (else: before the trace)
_ROLES = {2: "client", 3: "server"}

_RING_BYTES = 32 << 20
_RING_HOLDS = "0.25 s of a million events a second"

COLUMNS_TIME = [Column("time", "TIME", 15)]
COLUMNS = [
    *TASK_COLUMNS,
    IP_COLUMN,
    *address_columns("laddr", "lport", "L"),
    *address_columns("raddr", "rport", "R"),
    Column("tx_bytes", "TX_BYTES", 10, right=True),
    Column("rx_bytes", "RX_BYTES", 10, right=True),
    Column("duration_ms", "MS", 10, right=True),
]


def cells(batch: EventBatch, times: bool = True) -> dict[str, Cells]:
    """Decoded events, column by column; the keys are a stable JSON contract. "time" (of
    the close) only with `times` (the table shows it only with -T). tx_bytes is data the
    peer acknowledged, rx_bytes data that arrived."""
    ts_ns = batch["hdr"]["ts_ns"] if times else None
    out = cell.task(batch["task"], ts_ns, unknown_null=True)
    out.update(endpoint_cells(batch["tuple"]))
    out.update(
        tx_bytes=cell.ints(batch["tx_bytes"]),
        rx_bytes=cell.ints(batch["rx_bytes"]),
        duration_ms=cell.fixed(np.rint(batch["duration_ns"] / 1e3), 3, 2),
        role=cell.mapped(batch["open_state"], _ROLES.get),
    )
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
    """Trace TCP connections as they close: pid, command, local and remote
    address and port, bytes sent (acknowledged by the peer) and received,
    lifetime in ms.

    Bytes are data bytes (the SYN and FIN that the kernel's counters
    include are taken out). The process is the one that connected, the one
    that accepted, or (for a connection opened before the trace) the one
    that closed it; `-` when no process touched it. A connection opened
    before the trace is timed from the first state change seen, and if it
    was a client its SYN counts as one byte sent. JSON lines add role:
    client (connected), server (accepted) or null (opened before the
    trace).

    Examples:

      membrane trace tcplife                 # every connection as it closes

      membrane trace tcplife -c nginx        # nginx's connections

      membrane trace tcplife -o json -d 60   # a minute of closes as JSON lines
    """
    opts = TraceOptions.parse(pid, comm, uid, duration, output, buffer_size)
    stream_events(
        "trace_tcp_life",
        "tcp_life_event",
        opts,
        (COLUMNS_TIME if timestamp else []) + COLUMNS,
        cells,
        timestamps=timestamp,
        ring_bytes=_RING_BYTES,
    )


TOOL = Tool(
    name="tcplife",
    summary="tcplife: every closed TCP connection with pid, comm, ends, bytes and lifetime",
    requires=("tracepoint",),
    command=command,
)
