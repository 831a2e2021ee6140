"""`membrane trace connect` reports exactly the connects of a workload the test runs,
between namespaces it creates, with the right process, addresses and ports, once each."""

from __future__ import annotations

import errno
import os
import socket
import sys
import textwrap
from typing import Any

import pytest
from trace_support import stop_tracer
from trace_tcp_support import (
    JsonLines,
    add_ipv6,
    as_thread,
    exchange,
    refused,
    start_server,
    token,
)

from membrane.netns import Pair, Topology, inside
from membrane.testing.tracer import start_tracer, stop_tracer_text

pytestmark = pytest.mark.root
CONNECT_FIELDS = {"time", "pid", "tid", "uid", "comm", "ip", "saddr", "sport", "daddr", "dport"}


def test_ipv4_connects_exactly_once_each(topology: Topology, pair: Pair) -> None:
    server = start_server(topology, pair.server.ns, pair.server.ip)
    comm, closed = token(), server.port + 1
    tracer = start_tracer("connect", "--comm", comm, "-o", "json")

    def workload() -> list[int]:
        ports = [exchange(pair.client.ns, server.host, server.port, send=10) for _ in range(3)]
        return [*ports, refused(pair.client.ns, server.host, closed)]

    ports, tid = as_thread(comm, workload)
    records, summary = stop_tracer(tracer)

    assert summary["lost"] == 0 and summary["events"] == len(records)
    assert all(set(r) == CONNECT_FIELDS for r in records)
    assert [(r["pid"], r["tid"], r["uid"], r["comm"], r["ip"]) for r in records] == [
        (os.getpid(), tid, os.getuid(), comm, 4)
    ] * 4
    assert [(r["saddr"], r["sport"], r["daddr"], r["dport"]) for r in records] == [
        (pair.client.ip, ports[0], server.host, server.port),
        (pair.client.ip, ports[1], server.host, server.port),
        (pair.client.ip, ports[2], server.host, server.port),
        (pair.client.ip, ports[3], server.host, closed),  # a refused attempt is a connect
    ]


def test_ipv6_connect(topology: Topology, pair: Pair) -> None:
    client_ip, server_ip = add_ipv6(pair)
    server = start_server(topology, pair.server.ns, server_ip)
    comm = token()
    tracer = start_tracer("connect", "--comm", comm, "-o", "json")
    sport, _ = as_thread(comm, lambda: exchange(pair.client.ns, server_ip, server.port))
    records, summary = stop_tracer(tracer)
    assert [
        (r["comm"], r["ip"], r["saddr"], r["sport"], r["daddr"], r["dport"]) for r in records
    ] == [(comm, 6, client_ip, sport, server_ip, server.port)]
    assert summary["lost"] == 0


# Connects once from its own process (another pid) with the comm given in argv[1].
OTHER_CLIENT = textwrap.dedent("""
    import ctypes, socket, sys
    ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
    with socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=10) as s:
        s.shutdown(socket.SHUT_WR)
        s.recv(1)
""")


def test_pid_filter_keeps_other_processes_out(topology: Topology, pair: Pair) -> None:
    server = start_server(topology, pair.server.ns, pair.server.ip)
    comm = token()  # both workloads share it: only the pid tells them apart
    tracer = start_tracer("connect", "--pid", str(os.getpid()), "-o", "json")
    other = topology.popen(
        pair.client.ns, [sys.executable, "-c", OTHER_CLIENT, comm, server.host, str(server.port)]
    )
    assert other.wait(timeout=30) == 0
    sport, _ = as_thread(comm, lambda: exchange(pair.client.ns, server.host, server.port))
    records, _ = stop_tracer(tracer)
    assert {r["pid"] for r in records} == {os.getpid()}
    assert [(r["sport"], r["dport"]) for r in records if r["comm"] == comm] == [
        (sport, server.port)
    ]


def test_table_has_bcc_columns(topology: Topology, pair: Pair) -> None:
    server = start_server(topology, pair.server.ns, pair.server.ip)
    comm = token()
    tracer = start_tracer("connect", "--comm", comm)
    sport, _ = as_thread(comm, lambda: exchange(pair.client.ns, server.host, server.port))
    out, err = stop_tracer_text(tracer)
    header, *rows = out.splitlines()
    assert header.split() == ["PID", "COMM", "IP", "SADDR", "SPORT", "DADDR", "DPORT"]
    assert [row.split() for row in rows] == [
        [str(os.getpid()), comm, "4", pair.client.ip, str(sport), server.host, str(server.port)]
    ]
    assert "events: 1, lost: 0" in err


def test_nonblocking_connect_is_reported_before_any_answer(pair: Pair) -> None:
    """No host has the address: the SYN stays unanswered, the socket in SYN_SENT. The
    connect is reported when connect() returns EINPROGRESS, with its source port, and
    not again when the socket is closed."""
    nobody = str(pair.client.address.network.network_address + 99)  # type: ignore[union-attr]
    comm = token()
    reports = JsonLines(start_tracer("connect", "--comm", comm, "-o", "json"))

    def workload() -> tuple[int, dict[str, Any]]:
        with inside(pair.client.ns):
            sock = socket.socket()
        with sock:
            sock.setblocking(False)
            assert sock.connect_ex((nobody, 80)) == errno.EINPROGRESS
            return sock.getsockname()[1], reports.next()  # while the socket waits

    (sport, record), _ = as_thread(comm, workload)
    rest, summary = reports.stop()
    assert (record["sport"], record["daddr"], record["dport"]) == (sport, nobody, 80)
    assert rest == [] and summary["events"] == 1


def test_fast_open_connect_without_connect_syscall(topology: Topology, pair: Pair) -> None:
    """sendto(MSG_FASTOPEN) opens the connection without connect(2): the open is reported
    when the socket leaves SYN_SENT."""
    server = start_server(topology, pair.server.ns, pair.server.ip, reply=1)
    comm = token()
    tracer = start_tracer("connect", "--comm", comm, "-o", "json")

    def workload() -> int:
        with inside(pair.client.ns):
            sock = socket.socket()
        with sock:  # blocking: a socket with a timeout is non-blocking inside
            sock.sendto(b"hello", socket.MSG_FASTOPEN, (server.host, server.port))
            sock.settimeout(10)
            local_port = sock.getsockname()[1]
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(10) == b"y"
        return local_port

    sport, _ = as_thread(comm, workload)
    records, _ = stop_tracer(tracer)
    assert [(r["sport"], r["daddr"], r["dport"]) for r in records] == [
        (sport, server.host, server.port)
    ]
