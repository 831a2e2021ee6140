"""`membrane trace tcplife` reports each closed connection of a workload once per side,
with the process of that side, the data bytes exactly as the workload moved them, and a
lifetime the workload controls."""

from __future__ import annotations

import os

import pytest
from trace_support import stop_tracer
from trace_tcp_support import (
    add_ipv6,
    as_thread,
    exchange,
    refused,
    start_server,
    token,
    wait_closed,
)

from membrane.netns import Pair, Topology
from membrane.testing.tracer import start_tracer, stop_tracer_text

pytestmark = pytest.mark.root
LIFE_FIELDS = {
    "time",
    "pid",
    "tid",
    "uid",
    "comm",
    "ip",
    "laddr",
    "lport",
    "raddr",
    "rport",
    "tx_bytes",
    "rx_bytes",
    "duration_ms",
    "role",
}
SENT, REPLY, HOLD = 300_000, 12_345, 0.3


def ends(record: dict) -> tuple[str, int, str, int]:
    return record["laddr"], record["lport"], record["raddr"], record["rport"]


def test_both_sides_with_exact_bytes_and_lifetime(topology: Topology, pair: Pair) -> None:
    server = start_server(topology, pair.server.ns, pair.server.ip, reply=REPLY)
    comm, closed = token(), server.port + 1
    tracer = start_tracer("tcplife", "-o", "json")
    (sport, refused_port), tid = as_thread(
        comm,
        lambda: (
            exchange(pair.client.ns, server.host, server.port, send=SENT, hold=HOLD),
            refused(pair.client.ns, server.host, closed),
        ),
    )
    wait_closed(pair.server.ns, [sport])
    records, summary = stop_tracer(tracer)
    assert summary["lost"] == 0 and summary["events"] == len(records)
    assert all(set(r) == LIFE_FIELDS for r in records)

    client_end = (pair.client.ip, sport, server.host, server.port)
    server_end = (server.host, server.port, pair.client.ip, sport)
    client = [r for r in records if ends(r) == client_end]
    served = [r for r in records if ends(r) == server_end]
    assert len(client) == len(served) == 1
    (client_rec,), (server_rec,) = client, served
    assert (client_rec["pid"], client_rec["tid"], client_rec["comm"], client_rec["role"]) == (
        os.getpid(),
        tid,
        comm,
        "client",
    )
    assert (client_rec["tx_bytes"], client_rec["rx_bytes"]) == (SENT, REPLY)
    assert (server_rec["pid"], server_rec["comm"], server_rec["role"]) == (
        server.pid,
        server.comm,
        "server",
    )
    assert (server_rec["tx_bytes"], server_rec["rx_bytes"]) == (REPLY, SENT)
    for rec in (client_rec, server_rec):
        assert rec["ip"] == 4
        assert HOLD * 1000 <= rec["duration_ms"] < HOLD * 1000 + 5000

    (refused_rec,) = [
        r for r in records if ends(r) == (pair.client.ip, refused_port, server.host, closed)
    ]
    assert (refused_rec["comm"], refused_rec["role"]) == (comm, "client")
    assert (refused_rec["tx_bytes"], refused_rec["rx_bytes"]) == (0, 0)
    assert refused_rec["duration_ms"] < HOLD * 1000


def test_ipv6(topology: Topology, pair: Pair) -> None:
    client_ip, server_ip = add_ipv6(pair)
    server = start_server(topology, pair.server.ns, server_ip, reply=7)
    comm = token()
    tracer = start_tracer("tcplife", "--comm", comm, "-o", "json")
    sport, _ = as_thread(comm, lambda: exchange(pair.client.ns, server_ip, server.port, send=1000))
    records, _ = stop_tracer(tracer)
    assert [(r["ip"], *ends(r), r["tx_bytes"], r["rx_bytes"]) for r in records] == [
        (6, client_ip, sport, server_ip, server.port, 1000, 7)
    ]


def test_filters_pick_one_side(topology: Topology, pair: Pair) -> None:
    server = start_server(topology, pair.server.ns, pair.server.ip, reply=10)
    comm = token()
    by_pid = start_tracer("tcplife", "--pid", str(server.pid), "-o", "json")
    by_comm = start_tracer("tcplife", "--comm", comm, "-o", "json")
    ports, _ = as_thread(
        comm,
        lambda: [exchange(pair.client.ns, server.host, server.port, send=20) for _ in range(2)],
    )
    wait_closed(pair.server.ns, ports)
    server_side, _ = stop_tracer(by_pid)
    client_side, _ = stop_tracer(by_comm)
    assert [(r["pid"], r["role"], r["rport"], r["tx_bytes"]) for r in server_side] == [
        (server.pid, "server", port, 10) for port in ports
    ]
    assert [(r["comm"], r["role"], r["lport"], r["tx_bytes"]) for r in client_side] == [
        (comm, "client", port, 20) for port in ports
    ]


def test_table_has_bcc_columns(topology: Topology, pair: Pair) -> None:
    server = start_server(topology, pair.server.ns, pair.server.ip, reply=3)
    tracer = start_tracer("tcplife", "--pid", str(server.pid))
    sport, _ = as_thread(
        token(), lambda: exchange(pair.client.ns, server.host, server.port, send=5)
    )
    wait_closed(pair.server.ns, [sport])
    out, err = stop_tracer_text(tracer)
    header, *rows = out.splitlines()
    assert header.split() == [
        "PID",
        "COMM",
        "IP",
        "LADDR",
        "LPORT",
        "RADDR",
        "RPORT",
        "TX_BYTES",
        "RX_BYTES",
        "MS",
    ]
    (row,) = [row.split() for row in rows]
    assert row[:-1] == [
        str(server.pid),
        server.comm,
        "4",
        server.host,
        str(server.port),
        pair.client.ip,
        str(sport),
        "3",
        "5",
    ]
    assert float(row[-1]) >= 0 and "." in row[-1]
    assert "events: 1, lost: 0" in err
