"""`membrane trace accept` reports exactly the connections a server process accepts, with
that process (not whoever ran the softirq of the handshake) and both ends right."""

from __future__ import annotations

import pytest
from trace_support import stop_tracer
from trace_tcp_support import add_ipv6, as_thread, exchange, start_server, token

from membrane.netns import Pair, Topology
from membrane.testing.tracer import start_tracer, stop_tracer_text

pytestmark = pytest.mark.root
ACCEPT_FIELDS = {"time", "pid", "tid", "uid", "comm", "ip", "laddr", "lport", "raddr", "rport"}


def test_ipv4_accepts_exactly_once_each(topology: Topology, pair: Pair) -> None:
    server = start_server(topology, pair.server.ns, pair.server.ip)
    tracer = start_tracer("accept", "--comm", server.comm, "-o", "json")
    # The client runs in this process: its pid must not show up as the accepting one,
    # although its connect drives the server's handshake.
    ports, _ = as_thread(
        token(),
        lambda: [exchange(pair.client.ns, server.host, server.port, send=1) for _ in range(3)],
    )
    records, summary = stop_tracer(tracer)

    assert summary["lost"] == 0 and summary["events"] == len(records) == 3
    assert all(set(r) == ACCEPT_FIELDS for r in records)
    assert {(r["pid"], r["tid"], r["uid"], r["comm"]) for r in records} == {
        (server.pid, server.pid, 0, server.comm)
    }
    assert [(r["ip"], r["laddr"], r["lport"], r["raddr"], r["rport"]) for r in records] == [
        (4, server.host, server.port, pair.client.ip, port) for port in ports
    ]


def test_ipv6_accept(topology: Topology, pair: Pair) -> None:
    client_ip, server_ip = add_ipv6(pair)
    server = start_server(topology, pair.server.ns, server_ip)
    tracer = start_tracer("accept", "--pid", str(server.pid), "-o", "json")
    sport, _ = as_thread(token(), lambda: exchange(pair.client.ns, server_ip, server.port))
    records, _ = stop_tracer(tracer)
    assert [
        (r["pid"], r["ip"], r["laddr"], r["lport"], r["raddr"], r["rport"]) for r in records
    ] == [(server.pid, 6, server_ip, server.port, client_ip, sport)]


def test_filters_keep_other_servers_out(topology: Topology, pair: Pair) -> None:
    """Two servers; --pid selects one and --comm the other."""
    first = start_server(topology, pair.server.ns, pair.server.ip)
    second = start_server(topology, pair.server.ns, pair.server.ip)
    by_pid = start_tracer("accept", "--pid", str(first.pid), "-o", "json")
    by_comm = start_tracer("accept", "--comm", second.comm, "-o", "json")
    as_thread(
        token(), lambda: [exchange(pair.client.ns, s.host, s.port) for s in (first, second, first)]
    )
    pid_records, _ = stop_tracer(by_pid)
    comm_records, _ = stop_tracer(by_comm)
    assert [(r["pid"], r["lport"]) for r in pid_records] == [(first.pid, first.port)] * 2
    assert [(r["comm"], r["lport"]) for r in comm_records] == [(second.comm, second.port)]


def test_table_has_bcc_columns(topology: Topology, pair: Pair) -> None:
    server = start_server(topology, pair.server.ns, pair.server.ip)
    tracer = start_tracer("accept", "--pid", str(server.pid))
    sport, _ = as_thread(token(), lambda: exchange(pair.client.ns, server.host, server.port))
    out, err = stop_tracer_text(tracer)
    header, *rows = out.splitlines()
    assert header.split() == ["PID", "COMM", "IP", "RADDR", "RPORT", "LADDR", "LPORT"]
    assert [row.split() for row in rows] == [
        [
            str(server.pid),
            server.comm,
            "4",
            pair.client.ip,
            str(sport),
            server.host,
            str(server.port),
        ]
    ]
    assert "events: 1, lost: 0" in err
