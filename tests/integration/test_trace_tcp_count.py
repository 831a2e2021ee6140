"""`membrane trace tcp-count` counts, in the kernel, exactly the connects of a workload per
destination (or per 4-tuple), and each report holds only its own interval's connects."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pytest
from trace_support import run_trace, stop_tracer
from trace_tcp_support import (
    JsonLines,
    add_ipv6,
    as_thread,
    exchange,
    refused,
    start_server,
    token,
)

from membrane.netns import Pair, Topology
from membrane.testing.cli import user_error
from membrane.testing.tracer import start_tracer, stop_tracer_text

pytestmark = pytest.mark.root
DST_FIELDS = {"time", "seconds", "ip", "daddr", "dport", "count"}
TUPLE_FIELDS = DST_FIELDS | {"saddr", "sport"}


def totals(records: list[dict[str, Any]]) -> Counter[tuple[str, int]]:
    counts: Counter[tuple[str, int]] = Counter()
    for r in records:
        counts[r["daddr"], r["dport"]] += r["count"]
    return counts


def test_counts_per_destination(topology: Topology, pair: Pair) -> None:
    server = start_server(topology, pair.server.ns, pair.server.ip)
    comm, closed = token(), server.port + 1
    tracer = start_tracer("tcp-count", "--comm", comm, "-o", "json")
    as_thread(
        comm,
        lambda: (
            [exchange(pair.client.ns, server.host, server.port) for _ in range(7)],
            [refused(pair.client.ns, server.host, closed) for _ in range(2)],
        ),
    )
    records, summary = stop_tracer(tracer)
    assert all(set(r) == DST_FIELDS and r["ip"] == 4 for r in records)
    assert totals(records) == {(server.host, server.port): 7, (server.host, closed): 2}
    assert summary["connections"] == 9 and summary["lost"] == 0


def test_counts_per_tuple_ipv6(topology: Topology, pair: Pair) -> None:
    client_ip, server_ip = add_ipv6(pair)
    server = start_server(topology, pair.server.ns, server_ip)
    comm = token()
    tracer = start_tracer("tcp-count", "--by", "tuple", "--comm", comm, "-o", "json")
    ports, _ = as_thread(
        comm, lambda: [exchange(pair.client.ns, server_ip, server.port) for _ in range(4)]
    )
    records, _ = stop_tracer(tracer)
    assert all(set(r) == TUPLE_FIELDS for r in records)
    assert sorted(
        (r["ip"], r["saddr"], r["sport"], r["daddr"], r["dport"], r["count"]) for r in records
    ) == sorted((6, client_ip, port, server_ip, server.port, 1) for port in ports)


def test_each_report_has_only_its_interval(topology: Topology, pair: Pair) -> None:
    """Three connects, reports until they are all shown, two more: the reports after that
    add up to two, not five (each interval's counts are taken out of the kernel)."""
    server = start_server(topology, pair.server.ns, pair.server.ip)
    comm = token()
    reports = JsonLines(start_tracer("tcp-count", "--comm", comm, "-i", "0.2", "-o", "json"))

    def connect(n: int) -> int:
        as_thread(
            comm, lambda: [exchange(pair.client.ns, server.host, server.port) for _ in range(n)]
        )
        shown = 0
        while shown < n:
            report = reports.next()
            assert report["dport"] == server.port and 0.1 < report["seconds"] < 5
            shown += report["count"]
        return shown

    assert connect(3) == 3
    assert connect(2) == 2
    rest, summary = reports.stop()
    assert rest == [] and summary == {"connections": 5, "lost": 0, "seconds": summary["seconds"]}


def test_pid_filter_and_table(topology: Topology, pair: Pair) -> None:
    server = start_server(topology, pair.server.ns, pair.server.ip)
    ours = start_tracer("tcp-count", "--pid", str(os.getpid()), "-i", "0")
    other = start_tracer("tcp-count", "--pid", str(server.pid), "-o", "json")
    as_thread(
        token(), lambda: [exchange(pair.client.ns, server.host, server.port) for _ in range(2)]
    )
    out, err = stop_tracer_text(ours)
    others, summary = stop_tracer(other)
    assert others == [] and summary["connections"] == 0  # the server connects nowhere
    clock, header, *rows = out.strip().splitlines()
    assert clock.startswith("[") and clock.endswith("]")
    assert header.split() == ["IP", "DADDR", "DPORT", "COUNT"]
    assert [r.split() for r in rows if str(server.port) in r] == [
        ["4", server.host, str(server.port), "2"]
    ]
    assert "lost: 0" in err


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--by", "src"], "--by"),
        (["--interval", "-1"], "--interval"),
        (["--interval", "nan"], "--interval"),
        (["--interval", "ten"], "--interval"),
    ],
)
def test_bad_tcp_count_options(args: list[str], field: str) -> None:
    """(The options every tool shares are checked in test_trace_options.py.)"""
    user_error(run_trace("tcp-count", *args), field)
