"""A datapath write that fails part of the way leaves no half-state (issue 16 item 6).

The real agent runs in this process on its own node namespace, and one batch write of a
node map (policy, endpoint states or ipcache) is made to fail after writing half of its
keys. The change is then undone: the policy map, the ipcache and every endpoint's
generation, enforcement and identity are exactly as before (only policy_rev moves on, so
connections verified meanwhile are checked again), the records, identities and state file
too, traffic gets the old verdicts, and the next change goes through. An endpoint add
whose sync fails leaves nothing of the endpoint: record, programs, ipcache entry, policy
entries and state, conntrack entries, veth, namespace, address; established connections
of the other endpoints keep flowing.
"""

from __future__ import annotations

import contextlib
import errno
import subprocess
import textwrap
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from agent_support import in_process_agent

from membrane import netns
from membrane.agent.agent import Agent
from membrane.api.models import EndpointCreate
from membrane.bpf import BpfError
from membrane.datapath import conntrack
from membrane.datapath.endpoint_prog import pinned_endpoint_ids
from membrane.datapath.ipcache import read_ipcache
from membrane.datapath.policy import PolicyWriter, compile_entries
from membrane.testing.cluster import unique_tag
from membrane.testing.pods import start_echo_server
from membrane.testing.reachability import Connection, Peer, Reachability, check

pytestmark = pytest.mark.root

OLD = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a-in, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints: [{matchLabels: {pod: b}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  egressDeny:
  - toCIDR: [198.19.5.0/24]
"""
# Replaces OLD (80 -> 81, another CIDR: a new CIDR identity, the old one on its way out,
# so the sync writes policy twice around the ipcache) and adds a policy for x/b.
NEW = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a-in, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints: [{matchLabels: {pod: b}}]
    toPorts: [{ports: [{port: "81", protocol: TCP}, {port: "82", protocol: TCP}]}]
  egressDeny:
  - toCIDR: [198.19.6.0/24]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: b-in, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: b}}
  ingress:
  - fromEndpoints: [{matchLabels: {pod: a}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""
# Selects the endpoint the add tests create.
C_IN = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: c-in, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: c}}
  ingress:
  - fromEndpoints: [{matchLabels: {pod: a}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""
# (map, method, which call fails): writes of every kind a sync makes, first and later ones.
FAILURES = [
    ("policy", "update_batch_raw", 1),
    ("policy", "update_batch_raw", 2),
    ("policy", "delete_batch_raw", 1),
    ("policy", "delete_batch_raw", 2),
    ("endpoints", "update_batch_raw", 1),
    ("endpoints", "update_batch_raw", 2),
    ("ipcache", "update_batch_raw", 1),
    ("ipcache", "delete_batch_raw", 1),
]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    """x/a and x/b (echo servers on 80-82) under OLD."""
    servers: list[subprocess.Popen[str]] = []
    with in_process_agent(tmp_path, unique_tag("w")) as started:
        try:
            for name in ("a", "b"):
                ep = started.add_endpoint(
                    EndpointCreate(namespace="x", name=name, labels={"pod": name})
                )
                servers.append(start_echo_server(ep.netns))
            started.import_policies(OLD)
            yield started
        finally:
            for server in servers:
                with contextlib.suppress(Exception):
                    netns.stop(server)


@contextlib.contextmanager
def half_then_fail(agent: Agent, map_name: str, method: str, nth: int) -> Iterator[list[Any]]:
    """The `nth` call of `method` on the node map writes the first half of its batch and
    raises BpfError (as a batch the kernel stops in the middle of). Yields the endpoint
    records at the moment of the failure."""
    m = getattr(agent.maps, map_name)
    original = getattr(m, method)
    calls = 0
    seen: list[Any] = []

    def failing(keys: bytes, *rest: Any) -> int:
        nonlocal calls
        calls += 1
        if calls != nth:
            return original(keys, *rest)
        n = len(keys) // m.key_size
        half = n // 2
        if rest:  # an update: values follow the keys
            value_size = len(rest[0]) // n
            original(keys[: half * m.key_size], rest[0][: half * value_size], *rest[1:])
        else:
            original(keys[: half * m.key_size])
        seen.extend(agent.state.endpoints.values())
        raise BpfError(f"injected failure of {map_name}.{method} #{nth}", errno.EIO)

    setattr(m, method, failing)
    try:
        yield seen
    finally:
        delattr(m, method)
    assert calls >= nth, f"{map_name}.{method} was called {calls} times, never failed"


def datapath(agent: Agent) -> dict[str, Any]:
    """What the kernel enforces: the policy map, the ipcache, every endpoint's state
    (identity, generations, enforcement; policy_rev apart)."""
    maps = agent.maps
    states = {int(k): v for k, v in maps.endpoints.lookup_batch()}
    return {
        "policy": sorted((bytes(k), bytes(v)) for k, v in maps.policy.lookup_batch()),
        "ipcache": read_ipcache(maps),
        "states": {ep: (int(v.identity), list(v.gen), list(v.enforce)) for ep, v in states.items()},
    }


def records(agent: Agent) -> dict[str, Any]:
    """What the agent remembers: endpoints, policies, identities, the files it saved."""
    numbers = agent.identities.to_json()
    return {
        "endpoints": dict(agent.state.endpoints),
        "policies": [p.to_json() for p in agent.policies.current.stored],
        "revision": agent.state.policy_revision,
        "identities": (dict(numbers["endpoint"]), dict(numbers["cidr"])),  # to_json shares
        "files": {str(p): p.read_bytes() for p in agent.state_file.dir.rglob("*") if p.is_file()},
    }


def assert_enforces_records(agent: Agent) -> None:
    """The policy map holds exactly the compiled policy of every endpoint (its live
    generation; nothing in the idle one, nothing of unknown endpoints)."""
    written = PolicyWriter(agent.maps).written()
    expected = {}
    for ep_id, policy in agent.snapshot.compiled.items():
        state = agent.maps.endpoints.lookup(ep_id)
        assert list(state.gen) in ([0, 0], [1, 1]), (ep_id, list(state.gen))
        if policy.entries:
            expected[(ep_id, int(state.gen[0]))] = compile_entries(policy.entries)
    assert written == expected


def peers(agent: Agent) -> dict[str, Peer]:
    return {ep.key: Peer(ep.key, ep.netns, ep.ipv4) for ep in agent.state.endpoints.values()}


def old_verdicts() -> Reachability:
    return Reachability(["x/b"], ["x/a"], [(80, "TCP"), (81, "TCP")]).deny("x/b", "x/a", port=81)


@pytest.mark.parametrize(("map_name", "method", "nth"), FAILURES)
def test_a_failed_policy_write_restores_the_old_policy(
    agent: Agent, map_name: str, method: str, nth: int
) -> None:
    kernel, remembered = datapath(agent), records(agent)
    snapshot = agent.snapshot
    with half_then_fail(agent, map_name, method, nth), pytest.raises(BpfError, match="injected"):
        agent.import_policies(textwrap.dedent(NEW))

    assert datapath(agent) == kernel
    assert records(agent) == remembered
    assert agent.snapshot is snapshot
    assert_enforces_records(agent)
    check(peers(agent), old_verdicts())

    agent.import_policies(NEW)  # the next change goes through
    assert_enforces_records(agent)
    assert [p["name"] for p in records(agent)["policies"]] == ["a-in", "b-in"]
    reach = Reachability(["x/b"], ["x/a"], [(80, "TCP"), (81, "TCP")]).deny(port=80)
    check(peers(agent), reach)


@pytest.mark.parametrize(
    ("map_name", "method", "nth"),
    [  # what an endpoint add writes (it deletes nothing)
        ("policy", "update_batch_raw", 1),
        ("endpoints", "update_batch_raw", 1),
        ("endpoints", "update_batch_raw", 2),
        ("ipcache", "update_batch_raw", 1),
    ],
)
def test_an_endpoint_add_whose_sync_fails_leaves_nothing(
    agent: Agent, map_name: str, method: str, nth: int
) -> None:
    agent.import_policies(C_IN)
    a, b = (agent.snapshot.endpoint("x", name) for name in ("a", "b"))
    assert a is not None and b is not None
    stream = Connection(Peer(b.key, b.netns, b.ipv4), Peer(a.key, a.netns, a.ipv4), 80)
    try:
        assert stream.echo()
        kernel = datapath(agent)
        links = pinned_endpoint_ids(agent.config.bpf_dir)
        tracked = conntrack.entries(agent.maps)
        assert tracked
        remembered = records(agent)
        failing = half_then_fail(agent, map_name, method, nth)
        with failing as at_failure, pytest.raises(BpfError, match="injected"):
            agent.add_endpoint(EndpointCreate(namespace="x", name="c", labels={"pod": "c"}))
        (failed,) = [ep for ep in at_failure if ep.name == "c"]

        assert "x/c" not in {ep.key for ep in agent.state.endpoints.values()}
        assert agent.snapshot.endpoint("x", "c") is None
        assert agent.state_file.load().endpoints.keys() == remembered["endpoints"].keys()
        assert datapath(agent) == kernel  # its state, policy entries, ipcache entry
        assert pinned_endpoint_ids(agent.config.bpf_dir) == links
        assert conntrack.entries(agent.maps, failed.id) == []
        assert not netns.exists(failed.netns)
        with pytest.raises(LookupError):
            netns.ifindex(agent.config.node_netns, failed.host_ifname)
        assert agent.endpoints.ipam.owner(IPv4Address(failed.ipv4)) is None
        assert_enforces_records(agent)
        assert stream.echo()  # the established connection never noticed
        now = {(e.ep_id, e.src, e.dst, e.sport, e.dport) for e in conntrack.entries(agent.maps)}
        assert {(e.ep_id, e.src, e.dst, e.sport, e.dport) for e in tracked} <= now
    finally:
        stream.close()

    added = agent.add_endpoint(EndpointCreate(namespace="x", name="c", labels={"pod": "c"}))
    assert_enforces_records(agent)
    assert read_ipcache(agent.maps)[IPv4Network(f"{added.ipv4}/32")] == (added.identity, added.id)
