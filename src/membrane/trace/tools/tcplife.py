"""`membrane trace tcplife`: one line per closed TCP connection with its process, ends,
bytes sent and received, and how long it lived."""

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

# open_state of struct tcp_life_event: TCP_SYN_SENT, TCP_SYN_RECV (else: before the trace)
_ROLES = {2: "client", 3: "server"}

COLUMNS_TIME = [Column("time", "TIME", 15)]
COLUMNS = [
    *TASK_COLUMNS,
    IP_COLUMN,
    *address_columns("laddr", "lport", "L"),
    *address_columns("raddr", "rport", "R"),
    Column("tx_bytes", "TX_BYTES", 10, right=True),
    Column("rx_bytes", "RX_BYTES", 10, right=True),
    Column("duration_ms", "MS", 10, right=True, fmt="{:.2f}".format),
]


def fields(batch: np.ndarray, times: bool = True) -> dict[str, list[object]]:
    """Decoded events, column by column; the keys are a stable JSON contract. "time" (of
    the close) only with `times` (the table shows it only with -T). tx_bytes is data the
    peer acknowledged, rx_bytes data that arrived."""
    out: dict[str, list[object]] = {}
    if times:
        out["time"] = list(ktimes_to_iso(batch["hdr"]["ts_ns"]))
    out.update(task_fields(batch["task"]))
    out.update(endpoint_fields(batch["tuple"]))
    out.update(
        tx_bytes=batch["tx_bytes"].tolist(),
        rx_bytes=batch["rx_bytes"].tolist(),
        duration_ms=np.round(batch["duration_ns"] / 1e6, 3).tolist(),
        role=[_ROLES.get(s) for s in batch["open_state"].tolist()],
    )
    return out


def command(
    pid: int = PID,
    comm: str = COMM,
    uid: int = UID,
    duration: float = DURATION,
    output: str = OUTPUT,
    timestamp: bool = TIMESTAMP,
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
    opts = TraceOptions.parse(pid, comm, uid, duration, output)
    stream_events(
        "trace_tcp_life",
        "tcp_life_event",
        opts,
        (COLUMNS_TIME if timestamp else []) + COLUMNS,
        fields,
        timestamps=timestamp,
    )


TOOL = Tool(
    name="tcplife",
    summary="tcplife: every closed TCP connection with pid, comm, ends, bytes and lifetime",
    requires=("tracepoint",),
    command=command,
)
