"""What the TCP trace tools (connect, accept, tcplife, tcp-count) share: the columns of
`struct trace_task` and `struct tcp_tuple` (abi/trace.h, abi/trace_tcp.h) decoded from a
batch of events as whole columns (trace/cells.py), formatting each distinct address once."""

from __future__ import annotations

import socket

import numpy as np

from membrane.trace import cells as cell
from membrane.trace.cells import Cells
from membrane.trace.output import Column

AF_INET6 = 10
ADDR_WIDTH = 25  # an IPv4, a v4-mapped or a typical IPv6 address; longer ones push right

TASK_COLUMNS = [Column("pid", "PID", 7, right=True), Column("comm", "COMM", 16)]
IP_COLUMN = Column("ip", "IP", 2, right=True)


def address_columns(addr: str, port: str, prefix: str) -> list[Column]:
    """An address and a port column, e.g. ("raddr", "rport", "R"): RADDR RPORT."""
    return [Column(addr, f"{prefix}ADDR", ADDR_WIDTH), Column(port, f"{prefix}PORT", 5, right=True)]


def endpoint_cells(
    tuples: np.ndarray,
    local: tuple[str, str] = ("laddr", "lport"),
    remote: tuple[str, str] = ("raddr", "rport"),
) -> dict[str, Cells]:
    """ip (4 or 6) and the local and remote address and port of each `struct tcp_tuple`,
    under the given (address, port) keys; each distinct address is formatted once."""
    six = tuples["family"] == AF_INET6
    return {
        "ip": cell.ints(np.where(six, 6, 4)),
        local[0]: _addresses(tuples["saddr"], six),
        local[1]: cell.ints(tuples["sport"]),
        remote[0]: _addresses(tuples["daddr"], six),
        remote[1]: cell.ints(tuples["dport"]),
    }


def _addresses(raw: np.ndarray, six: np.ndarray) -> Cells:
    # key: the family flag and the 16 address bytes, as one opaque value per event
    keys = np.empty((len(raw), 17), dtype=np.uint8)
    keys[:, 0] = six
    keys[:, 1:] = np.ascontiguousarray(raw).view(np.uint8).reshape(len(raw), 16)
    return cell.mapped(keys.view("V17").reshape(-1), _address_text)


def _address_text(key: bytes) -> str:
    if key[0]:
        return socket.inet_ntop(socket.AF_INET6, key[1:17])
    return socket.inet_ntop(socket.AF_INET, key[1:5])


def endpoint_fields(
    tuples: np.ndarray,
    local: tuple[str, str] = ("laddr", "lport"),
    remote: tuple[str, str] = ("raddr", "rport"),
) -> dict[str, list[object]]:
    """endpoint_cells as lists of values, for the few rows of a tcp-count report."""
    six = (tuples["family"] == AF_INET6).tolist()
    raw = (
        np.ascontiguousarray(tuples["saddr"]).tolist(),
        np.ascontiguousarray(tuples["daddr"]).tolist(),
    )
    return {
        "ip": [6 if s else 4 for s in six],
        local[0]: [_address_text(bytes([s]) + bytes(a)) for s, a in zip(six, raw[0], strict=True)],
        local[1]: tuples["sport"].tolist(),
        remote[0]: [_address_text(bytes([s]) + bytes(a)) for s, a in zip(six, raw[1], strict=True)],
        remote[1]: tuples["dport"].tolist(),
    }
