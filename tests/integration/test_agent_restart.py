"""The datapath outlives the agent: with the agent killed (-9) or stopped (SIGTERM), an
allowed TCP stream keeps flowing, a denied path stays denied and new allowed connections
still work; a restarted agent with the same options adopts everything (same endpoint ids,
identities and addresses, no duplicates; same policies), the stream never notices, and
the adopted state is live (later changes take effect). The adoption tests run in both
attach modes: auto (tcx where the kernel has it) and clsact (the fallback of kernels
without tcx, forced with --attach=clsact): a restart finds the clsact filters again and
never adds a second one beside them."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from agent_support import cluster_fixture, net_fixture

from membrane.bpf.probe import supports
from membrane.datapath.endpoint_prog import HOOKS, attached_programs
from membrane.testing.cluster import Cluster
from membrane.testing.reachability import MAX_STALL, Reachability, Stream
from membrane.testing.tc import clsact_filters

pytestmark = pytest.mark.root

cluster = cluster_fixture(namespaces=("x", "y"), pod_names=("a", "b"))
clsact_cluster = cluster_fixture(namespaces=("x", "y"), pod_names=("a", "b"), attach="clsact")
net = net_fixture()


@pytest.fixture(params=["auto", "clsact"])
def adopting(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The module's cluster in each attach mode (for the tests about adoption)."""
    c = request.getfixturevalue("cluster" if request.param == "auto" else "clsact_cluster")
    yield c
    c.reset()


def attachments(net: Cluster) -> dict[str, tuple[str, dict[str, int], list[int]]]:
    """pod -> (attach mode it records, direction -> program id attached, and the number
    of clsact filters on each hook of its veth, as `tc` counts them)."""
    out = {}
    for e in net.agent.endpoints():
        filters = [len(clsact_filters(net.agent.node_netns, e["host_ifname"], d)) for d in HOOKS]
        programs = attached_programs(str(net.agent.bpf_dir), e["id"])
        out[f"{e['namespace']}/{e['name']}"] = (e["attach_mode"], programs, filters)
    return out


def check_attached(net: Cluster) -> dict[str, tuple[str, dict[str, int], list[int]]]:
    """Every pod's programs attached once, in the mode the agent was asked for."""
    mode = net.agent.attach or "auto"
    expected = mode if mode != "auto" else ("tcx" if supports("tcx") else "clsact")
    found = attachments(net)
    for pod, (recorded, programs, filters) in found.items():
        assert recorded == expected, f"{pod} attached with {recorded}, not {expected}"
        assert set(programs) == set(HOOKS), f"{pod} lacks a program: {programs}"
        assert filters == ([1, 1] if expected == "clsact" else [0, 0]), f"{pod}: {filters}"
    return found


PODS = ["x/a", "x/b", "y/a", "y/b"]
Y_A_FROM_X_A_ONLY = """
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: a-from-x-a, namespace: y}
    spec:
      podSelector: {matchLabels: {pod: a}}
      ingress:
      - from:
        - namespaceSelector: {matchLabels: {ns: x}}
          podSelector: {matchLabels: {pod: a}}
"""


@pytest.fixture
def stream(request: pytest.FixtureRequest) -> Iterator[Stream]:
    """x/a -> y/a:80, allowed by the policy in force (imported first), on the cluster the
    test uses (`adopting` or `net`)."""
    net = request.getfixturevalue("adopting" if "adopting" in request.fixturenames else "net")
    net.import_policy(Y_A_FROM_X_A_ONLY)
    s = Stream(net.peers["x/a"], net.peers["y/a"], 80)
    try:
        s.flowing()
        yield s
        assert s.failure is None, s.failure
        assert s.max_gap < MAX_STALL, f"the stream stalled for {s.max_gap:.2f} s"
    finally:
        s.close()


def expected(net: Cluster) -> Reachability:
    return net.reach(sources=PODS, destinations=PODS).deny(to="y/a").allow("x/a", "y/a")


def snapshot(net: Cluster) -> list[tuple[str, int, int, str]]:
    eps = net.agent.endpoints()
    return sorted((f"{e['namespace']}/{e['name']}", e["id"], e["identity"], e["ipv4"]) for e in eps)


def agent_is_down(net: Cluster) -> None:
    result = net.agent.cli("endpoint", "list", check=False)
    assert result.returncode == 1, f"the agent still answers: {result}"


def test_kill9_datapath_keeps_enforcing_and_restart_adopts(
    adopting: Cluster, stream: Stream
) -> None:
    net = adopting
    endpoints, policies = snapshot(net), net.agent.policies()
    attached = check_attached(net)
    assert len({ep[0] for ep in endpoints}) == len(endpoints) == 4
    net.check(expected(net))

    net.agent.kill9()
    agent_is_down(net)
    stream.flowing()
    net.check(expected(net))  # new connections: x/a still allowed, the others still denied
    stream.flowing()

    net.agent.start()
    assert snapshot(net) == endpoints, "the restarted agent renumbered or duplicated endpoints"
    assert net.agent.policies() == policies
    assert check_attached(net) == attached, "the same build's programs were not kept"
    stream.flowing()
    net.check(expected(net))

    # What was adopted is live: a change after the restart takes effect at once.
    net.cli("policy", "delete", "--all")
    net.check(net.reach(sources=PODS, destinations=PODS))
    stream.flowing()


def test_sigterm_stop_and_start(net: Cluster, stream: Stream) -> None:
    endpoints = snapshot(net)
    assert net.agent.stop() == 0, f"exit code after SIGTERM:\n{net.agent.log_tail()}"
    agent_is_down(net)
    net.check(expected(net))
    stream.flowing()

    net.agent.start()
    assert snapshot(net) == endpoints
    check_attached(net)
    net.check(expected(net))
    stream.flowing()


def test_pods_added_after_a_restart_get_fresh_ids_and_addresses(net: Cluster) -> None:
    net.agent.kill9()
    net.agent.start()
    before = snapshot(net)
    new = net.add_pod("x", "late", {"pod": "a"})
    after = snapshot(net)
    assert len(after) == len(before) + 1
    assert len({e[1] for e in after}) == len(after), f"endpoint ids repeat: {after}"
    assert len({e[3] for e in after}) == len(after), f"addresses repeat: {after}"
    assert new.info["identity"] == dict((e[0], e[2]) for e in after)["x/a"]
    net.import_policy(Y_A_FROM_X_A_ONLY)
    reach = net.reach(sources=[*PODS, "x/late"], destinations=["y/a", "x/late"])
    net.check(reach.deny(to="y/a").allow("x/a", "y/a").allow("x/late", "y/a"))


def test_restart_twice_in_a_row_changes_nothing(adopting: Cluster) -> None:
    net = adopting
    net.import_policy(Y_A_FROM_X_A_ONLY)
    endpoints, policies = snapshot(net), net.agent.policies()
    attached = check_attached(net)
    for _ in range(2):
        net.agent.restart()
        assert snapshot(net) == endpoints
        assert net.agent.policies() == policies
        assert check_attached(net) == attached
    net.check(expected(net))


def test_a_restart_completes_an_endpoint_whose_plumbing_is_missing(adopting: Cluster) -> None:
    """What an agent killed in the middle of `endpoint add` leaves: the endpoint recorded
    (it is recorded first) but its veth gone. The restarted agent rebuilds it in place."""
    net = adopting
    net.import_policy(Y_A_FROM_X_A_ONLY)
    endpoints = snapshot(net)
    broken = next(e for e in net.agent.endpoints() if e["namespace"] == "x" and e["name"] == "b")
    net.agent.kill9()
    subprocess.run(
        ["ip", "-n", net.agent.node_netns, "link", "del", broken["host_ifname"]], check=True
    )
    net.agent.start()
    assert snapshot(net) == endpoints
    check_attached(net)
    net.check(expected(net))
