"""The new-connections-per-second generator of bench/conn_rate.py (traffic.connection_rate)
counts what it claims: completed echo round trips against the pods' echo server, and
failures by kind when nothing listens or a path drops."""

from __future__ import annotations

import pytest

from membrane import netns
from membrane.netns import Pair, Topology
from membrane.testing.pods import start_echo_server
from membrane.testing.traffic import connection_rate

pytestmark = pytest.mark.root

PORT = 7000


@pytest.fixture
def served(topology: Topology, pair: Pair) -> Pair:
    server = start_echo_server(pair.server.ns, (PORT,))
    topology.callback(netns.stop, server)
    return pair


def test_counts_completed_connections(served: Pair) -> None:
    got = connection_rate(served.client.ns, served.server.ip, PORT, 1.0, processes=2, inflight=8)
    assert got.failed == {}
    assert got.connections > 100 and got.per_s > 100
    # closed connections' ports are reused: no TIME_WAIT exhaustion at thousands a second
    with netns.inside(served.client.ns):
        assert netns.read_sysctl("net.ipv4.tcp_tw_reuse") == "1"


def test_refusals_and_drops_are_failures_not_connections(served: Pair) -> None:
    refused = connection_rate(served.client.ns, served.server.ip, PORT + 1, 0.5, 1, 4)
    assert refused.connections == 0 and refused.failed.get("ECONNREFUSED", 0) > 0
    netns.run(served.server.ns, ["ip", "route", "add", "blackhole", f"{served.client.ip}/32"])
    dropped = connection_rate(served.client.ns, served.server.ip, PORT, 1.5, 1, 4)
    assert dropped.connections == 0 and set(dropped.failed) == {"timeout"}
