"""The node and its pods (`membrane agent run --allow-localhost`), on real traffic.

Kubernetes: traffic to and from the node where a pod runs is always allowed; Cilium's
`allow-localhost` lets the node through its pods' policy. That is the agent's default
(`always`): default deny never stops the node, deny rules still do. `policy` makes the
node a peer like any other. The agent, `policy trace` and the flows must agree on which
mode is in force. "host" is the node namespace (198.19.0.1), the agent's host side.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from agent_support import cluster_fixture, net_fixture

from membrane.testing.agent import NODE_IP, membrane_command
from membrane.testing.cluster import Cluster
from membrane.testing.waiting import wait_for

pytestmark = pytest.mark.root

cluster = cluster_fixture(namespaces=("x",), pod_names=("a", "b"))  # the agent's default
net = net_fixture()

PEERS = ["x/a", "x/b", "host"]
DENY_ALL_X_A = """
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: deny-all, namespace: x}
    spec:
      podSelector: {matchLabels: {pod: a}}
      policyTypes: [Ingress, Egress]
"""


@pytest.fixture
def policy_mode(net: Cluster) -> Iterator[Cluster]:
    """The same agent restarted with `--allow-localhost=policy`, and back afterwards."""
    net.agent.allow_localhost = "policy"
    net.agent.restart()
    try:
        yield net
    finally:
        net.agent.allow_localhost = None
        net.agent.restart()


def status(net: Cluster) -> dict[str, Any]:
    return net.agent.cli_json("agent", "status")


def node_flows(net: Cluster, verdict: str) -> list[dict[str, Any]]:
    """Flows between the node and x/a (either way) with `verdict`."""
    a = net.pods["x/a"].ip
    return [
        f
        for f in (r["flow"] for r in net.agent.observe(2000) if "flow" in r)
        if f.get("verdict") == verdict
        and {f["IP"]["source"], f["IP"]["destination"]} == {NODE_IP, a}
    ]


def test_the_node_reaches_a_default_deny_pod_by_default(net: Cluster) -> None:
    assert status(net)["allow_localhost"] == "always"
    net.import_policy(DENY_ALL_X_A)
    reach = net.reach(sources=PEERS, destinations=PEERS).deny(to="x/a").deny(from_="x/a")
    net.check(reach.allow("host", "x/a").allow("x/a", "host"))

    for src, dst, direction in (("host", "x/a", "ingress"), ("x/a", "host", "egress")):
        trace = net.agent.trace(src, dst, "80/TCP")
        (step,) = trace["steps"]
        assert trace["verdict"] == "ALLOWED" and step["datapath_allowed"], trace
        assert step["enforced"] and step["direction"] == direction, trace
        assert step["deciding_rule"] == step["datapath_rule"], trace
        assert step["deciding_rule"].startswith(f"allow-localhost {direction}"), trace

    flows = wait_for("a flow between the node and x/a", lambda: node_flows(net, "FORWARDED"))
    by_node = [f for f in flows if f["traffic_direction"] == "INGRESS"]
    assert by_node, flows
    flow = by_node[0]
    assert flow["source"]["labels"] == ["reserved:host"], flow
    (by,) = flow["ingress_allowed_by"]
    assert (by["name"], by["kind"]) == ("allow-localhost", "AgentOption"), flow
    assert flow["policy_match_type"] == 1, flow  # L3-Only: the node, every port


def test_deny_rules_still_apply_to_the_node(net: Cluster) -> None:
    """As in Cilium: allow-localhost is an allow, and deny rules win over allows."""
    net.import_policy("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: no-node-on-80, namespace: x}
        spec:
          endpointSelector: {matchLabels: {pod: a}}
          ingress: [{fromEndpoints: [{matchLabels: {pod: b}}]}]
          ingressDeny:
          - fromEntities: [host]
            toPorts: [{ports: [{port: "80", protocol: TCP}]}]
    """)
    reach = net.reach(sources=PEERS, destinations=["x/a"]).deny("host", "x/a", port=80, proto="TCP")
    net.check(reach)
    trace = net.agent.trace("host", "x/a", "80/TCP")
    assert trace["verdict"] == "DENIED" and not trace["steps"][0]["datapath_allowed"], trace
    assert "ingressDeny[0]" in trace["steps"][0]["deciding_rule"], trace
    assert net.agent.trace("host", "x/a", "81/TCP")["verdict"] == "ALLOWED"


def test_with_allow_localhost_policy_the_node_is_a_peer_like_any_other(
    policy_mode: Cluster,
) -> None:
    net = policy_mode
    assert status(net)["allow_localhost"] == "policy"
    net.import_policy(DENY_ALL_X_A)
    net.check(net.reach(sources=PEERS, destinations=PEERS).deny(to="x/a").deny(from_="x/a"))

    for src, dst in (("host", "x/a"), ("x/a", "host")):
        trace = net.agent.trace(src, dst, "80/TCP")
        (step,) = trace["steps"]
        assert trace["verdict"] == "DENIED" and not step["datapath_allowed"], trace
        assert step["deciding_rule"] is None and step["datapath_rule"] is None, trace

    drops = wait_for("a drop between the node and x/a", lambda: node_flows(net, "DROPPED"))
    assert {f["drop_reason_desc"] for f in drops} == {"POLICY_DENIED"}, drops
    assert not any(k.endswith(("_allowed_by", "_denied_by")) for f in drops for k in f), drops


def test_a_bad_mode_is_one_line_and_changes_nothing(net: Cluster) -> None:
    argv = [arg for arg in net.agent.argv() if arg != membrane_command()]
    bad = subprocess.run(
        [membrane_command(), *argv, "--allow-localhost", "sometimes"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2, bad
    assert bad.stderr.splitlines() == [
        "membrane: error: allow-localhost: 'sometimes' is not one of always, policy"
    ], bad
    assert status(net)["allow_localhost"] == "always"  # the running agent is untouched
