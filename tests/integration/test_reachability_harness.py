"""The reachability harness itself, on plain namespaces without the agent: it must call a
path that works "allowed", a silently dropped path "denied" (in well under the time of one
policy test), a refused port neither "allowed" nor "denied" (a dead server is no policy
drop), and show a wrong cell in its tables."""

from __future__ import annotations

import os
import time

import pytest

from membrane import netns
from membrane.netns import Topology
from membrane.testing.agent import agent_unusable_reason
from membrane.testing.cluster import running_cluster
from membrane.testing.pods import start_echo_server
from membrane.testing.reachability import (
    Connection,
    Peer,
    Reachability,
    check,
    compare,
    probe,
    render,
)

pytestmark = pytest.mark.root


@pytest.fixture
def peers(topology: Topology) -> dict[str, Peer]:
    """a <-> b on one veth; "b-silent" is a second address of b whose replies to a go
    nowhere (blackhole route for a's address from that source), i.e. a silent drop."""
    a, b = topology.pair(roles=("a", "b"))
    silent = str(b.address.network[10])  # type: ignore[union-attr]
    netns.add_address(b.ns, "eth0", f"{silent}/32")
    netns.run(b.ns, ["ip", "route", "add", "blackhole", f"{a.ip}/32", "table", "7"])
    netns.run(b.ns, ["ip", "rule", "add", "from", silent, "table", "7"])
    for ns in (a.ns, b.ns):
        server = start_echo_server(ns, (80, 81))
        topology.callback(netns.stop, server)
    return {
        "a": Peer("a", a.ns, a.ip),
        "b": Peer("b", b.ns, b.ip),
        "b-silent": Peer("b-silent", b.ns, silent),
    }


def test_probe_outcomes(peers: dict[str, Peer]) -> None:
    cases = [
        ("a", "b", 80, "TCP"),
        ("a", "b", 81, "UDP"),
        ("b", "a", 80, "TCP"),
        ("a", "b-silent", 80, "TCP"),
        ("a", "b-silent", 80, "UDP"),
        ("a", "b", 82, "TCP"),
        ("a", "b", 82, "UDP"),
        ("a", "b", 0, "ICMP"),
        ("a", "b-silent", 0, "ICMP"),
    ]
    started = time.monotonic()
    got = probe(peers, cases)
    elapsed = time.monotonic() - started
    assert got == {
        ("a", "b", 80, "TCP"): "ok",
        ("a", "b", 81, "UDP"): "ok",
        ("b", "a", 80, "TCP"): "ok",
        ("a", "b-silent", 80, "TCP"): "timeout",
        ("a", "b-silent", 80, "UDP"): "timeout",
        ("a", "b", 82, "TCP"): "refused",
        ("a", "b", 82, "UDP"): "refused",
        ("a", "b", 0, "ICMP"): "ok",
        ("a", "b-silent", 0, "ICMP"): "timeout",
    }
    assert elapsed < 6, f"probing took {elapsed:.1f} s: are the probes not concurrent?"


def test_many_probes_run_concurrently(peers: dict[str, Peer]) -> None:
    reach = Reachability(["a", "b"], ["a", "b", "b-silent"]).expect(to="b-silent", allowed=False)
    reach.expect("b", "b-silent", allowed=True)  # local to b: never leaves the namespace
    started = time.monotonic()
    for _ in range(3):
        check(peers, reach)
    assert time.monotonic() - started < 10


def test_a_wrong_cell_is_shown_in_the_tables(peers: dict[str, Peer]) -> None:
    reach = Reachability(["a"], ["b", "b-silent"], ports=[(80, "TCP")])
    observed = probe(peers, reach.cases())
    wrong = compare(reach, observed)
    assert wrong == [("a", "b-silent", 80, "TCP")]
    text = render(reach, observed, wrong)
    assert "a -> b-silent 80/TCP: expected allowed, got timeout" in text
    with pytest.raises(AssertionError, match="1 of 2 cells wrong"):
        check(peers, reach)


def test_a_missing_server_is_an_error_not_a_denial(peers: dict[str, Peer]) -> None:
    """Nothing listens on port 82 of b: b answers the probes with a TCP RST and an ICMP
    port unreachable. That is no policy drop, and a table expecting a denial must fail."""
    reach = Reachability(["a"], ["b"], ports=[(82, "TCP"), (82, "UDP")], default=False)
    observed = probe(peers, reach.cases())
    assert observed == {c: "refused" for c in reach.cases()}
    assert compare(reach, observed) == reach.cases()
    text = render(reach, observed, reach.cases())
    assert "a -> b 82/TCP: expected denied, got refused (an error, not a policy drop" in text
    assert [line.split("|")[1].split() for line in text.splitlines() if line.startswith("a ")] == [
        ["!"],
        ["!"],
    ]
    with pytest.raises(AssertionError, match="2 of 2 cells wrong"):
        check(peers, reach)
    # the same cells silently dropped are denials
    silent = Reachability(["a"], ["b-silent"], ports=[(80, "TCP"), (80, "UDP")], default=False)
    check(peers, silent)


def test_connection_sees_a_later_drop(peers: dict[str, Peer]) -> None:
    conn = Connection(peers["a"], peers["b"], 80)
    try:
        assert conn.echo()
        # From now on b's replies to a vanish: the open connection goes silent.
        netns.run(peers["b"].netns, ["ip", "route", "add", "blackhole", f"{peers['a'].ip}/32"])
        assert not conn.echo()
        netns.run(peers["b"].netns, ["ip", "route", "del", "blackhole", f"{peers['a'].ip}/32"])
        assert conn.echo(timeout=5)  # TCP retransmits what was owed
    finally:
        conn.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def test_cluster_teardown_leaves_nothing_behind_even_on_failure() -> None:
    if reason := agent_unusable_reason():
        pytest.skip(reason)
    with (
        pytest.raises(RuntimeError, match="the test failed"),
        running_cluster(namespaces=("x",), pod_names=("a",)) as c,
    ):
        agent, ext = c.agent, c.external.netns
        assert c.agent.proc is not None
        pids = [c.agent.proc.pid, *(p.pid for p in c.servers), c.pods["x/a"].server.pid]
        assert agent.bpf_dir.exists() and netns.exists(c.pods["x/a"].netns)
        raise RuntimeError("the test failed")
    left = [n for n in netns.names() if n.startswith(agent.prefix) or n in (agent.node_netns, ext)]
    assert left == []
    assert not agent.bpf_dir.exists()
    assert not os.path.exists(agent.state_dir)
    assert [p for p in pids if _alive(p)] == []
