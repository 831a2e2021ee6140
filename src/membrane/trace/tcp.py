"""What the TCP trace tools (connect, accept, tcplife, tcp-count) share: the columns of
`struct trace_task` and `struct tcp_tuple` (abi/trace.h, abi/trace_tcp.h) decoded from a
batch of events, one list per field, converting each distinct comm and address once."""

from __future__ import annotations

import socket

import numpy as np

from membrane.trace.output import Column, text

AF_INET6 = 10
ADDR_WIDTH = 25  # an IPv4, a v4-mapped or a typical IPv6 address; longer ones push right

TASK_COLUMNS = [Column("pid", "PID", 7, right=True), Column("comm", "COMM", 16)]
IP_COLUMN = Column("ip", "IP", 2, right=True)


def address_columns(addr: str, port: str, prefix: str) -> list[Column]:
    """An address and a port column, e.g. ("raddr", "rport", "R"): RADDR RPORT."""
    return [Column(addr, f"{prefix}ADDR", ADDR_WIDTH), Column(port, f"{prefix}PORT", 5, right=True)]


def task_fields(task: np.ndarray) -> dict[str, list[object]]:
    """pid, tid, uid, comm of each `struct trace_task`; all four None where the pid is 0
    (no process was known)."""
    pids = task["pid"].tolist()
    comms: dict[bytes, str] = {}
    return {
        "pid": [p or None for p in pids],
        "tid": [t if p else None for p, t in zip(pids, task["tid"].tolist(), strict=True)],
        "uid": [u if p else None for p, u in zip(pids, task["uid"].tolist(), strict=True)],
        "comm": [
            (comms.get(c) or comms.setdefault(c, text(c))) if p else None
            for p, c in zip(pids, task["comm"].tolist(), strict=True)
        ],
    }


def endpoint_fields(
    tuples: np.ndarray,
    local: tuple[str, str] = ("laddr", "lport"),
    remote: tuple[str, str] = ("raddr", "rport"),
) -> dict[str, list[object]]:
    """ip (4 or 6) and the local and remote address and port of each `struct tcp_tuple`,
    under the given (address, port) keys."""
    six = [f == AF_INET6 for f in tuples["family"].tolist()]
    return {
        "ip": [6 if s else 4 for s in six],
        local[0]: _addresses(tuples["saddr"], six),
        local[1]: tuples["sport"].tolist(),
        remote[0]: _addresses(tuples["daddr"], six),
        remote[1]: tuples["dport"].tolist(),
    }


def _addresses(raw: np.ndarray, six: list[bool]) -> list[str]:
    data = np.ascontiguousarray(raw).tobytes()
    seen: dict[bytes, str] = {}
    out = []
    for i, v6 in enumerate(six):
        addr = data[16 * i : 16 * i + (16 if v6 else 4)]
        text_ = seen.get(addr)
        if text_ is None:
            text_ = seen[addr] = socket.inet_ntop(socket.AF_INET6 if v6 else socket.AF_INET, addr)
        out.append(text_)
    return out
