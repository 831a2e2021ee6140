"""`membrane trace connect`: tcpconnect. One line per active TCP open (connect), IPv4 and
IPv6: who connected, from which address and port to which."""

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
    *address_columns("saddr", "sport", "S"),
    *address_columns("daddr", "dport", "D"),
]


def fields(batch: np.ndarray, times: bool = True) -> dict[str, list[object]]:
    """Decoded events, column by column; the keys are a stable JSON contract. "time" only
    with `times` (the table shows it only with -T)."""
    out: dict[str, list[object]] = {}
    if times:
        out["time"] = list(ktimes_to_iso(batch["hdr"]["ts_ns"]))
    out.update(task_fields(batch["task"]))
    out.update(endpoint_fields(batch["tuple"], local=("saddr", "sport"), remote=("daddr", "dport")))
    return out


def command(
    pid: int = PID,
    comm: str = COMM,
    uid: int = UID,
    duration: float = DURATION,
    output: str = OUTPUT,
    timestamp: bool = TIMESTAMP,
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
    opts = TraceOptions.parse(pid, comm, uid, duration, output)
    stream_events(
        "trace_tcp_connect",
        "tcp_open_event",
        opts,
        (COLUMNS_TIME if timestamp else []) + COLUMNS,
        fields,
        timestamps=timestamp,
    )


TOOL = Tool(
    name="connect",
    summary="tcpconnect: every TCP connect (IPv4/IPv6) with pid, comm, addresses and ports",
    requires=("tracepoint",),
    command=command,
)
