"""Policy over time: namespace and pod changes re-evaluate policy, deletes and replacements
take effect, replies of allowed connections always pass, established connections meet a
new deny on their next packet, and `policy trace` / `observe` say which rule decided.
The node ("host") is one of the peers policy applies to (`--allow-localhost=policy`).
"""

from __future__ import annotations

import json
import select
import signal
import subprocess

import pytest
from agent_support import net_fixture, shared_cluster_fixture

from membrane import netns
from membrane.testing.agent import membrane_command
from membrane.testing.cluster import Cluster
from membrane.testing.reachability import Connection
from membrane.testing.waiting import wait_for

pytestmark = pytest.mark.root

cluster = shared_cluster_fixture(allow_localhost="policy")
net = net_fixture()

PODS = [f"{ns}/{p}" for ns in "xyz" for p in "abc"]

A_FROM_BLUE_NAMESPACES = """
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: a-from-blue, namespace: x}
    spec:
      podSelector: {matchLabels: {pod: a}}
      ingress:
      - from:
        - namespaceSelector: {matchLabels: {team: blue}}
"""
DENY_INGRESS_Y = """
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: deny-ingress, namespace: y}
    spec:
      podSelector: {}
      policyTypes: [Ingress]
"""


def identity(net: Cluster, key: str) -> int:
    return int(net.agent.cli_json("endpoint", "get", key)["identity"])


# ---- labels and identities -------------------------------------------------------------
def test_namespace_label_change_reevaluates_policy(net: Cluster) -> None:
    net.import_policy(A_FROM_BLUE_NAMESPACES)
    net.check(net.reach().deny(to="x/a"))

    net.label_namespace("y", "team=blue")
    net.check(net.reach().deny(to="x/a").allow("y/*", "x/a"))

    net.label_namespace("z", "team=blue")
    net.label_namespace("y", "team-")
    net.check(net.reach().deny(to="x/a").allow("z/*", "x/a"))


def test_equal_labels_share_an_identity_and_namespaces_tell_them_apart(net: Cluster) -> None:
    twin = net.add_pod("x", "twin", {"pod": "a"}, serve=False)
    other = net.add_pod("x", "other", {"pod": "other"}, serve=False)
    ids = net.agent.identities()
    assert twin.info["identity"] == ids["x/a"] == identity(net, "x/twin")
    assert other.info["identity"] != ids["x/a"]
    assert ids["y/a"] != ids["x/a"]  # the namespace is a label too
    assert len({ids[p] for p in PODS}) == len(PODS)
    # Namespace labels are part of the identity: both pods move, and stay together.
    net.label_namespace("x", "tier=web")
    now = net.agent.identities()
    assert now["x/a"] == now["x/twin"] != ids["x/a"]
    assert now["y/a"] == ids["y/a"]


def test_new_pod_matching_a_policy_is_enforced_as_target_and_as_peer(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: a-from-b, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress:
          - from: [{podSelector: {matchLabels: {pod: b}}}]
    """)
    net.add_pod("x", "a2", {"pod": "a"})
    net.add_pod("x", "b2", {"pod": "b"})
    pods = [*PODS, "x/a2", "x/b2"]
    reach = net.reach(sources=pods, destinations=pods, ports=[(80, "TCP"), (81, "UDP")])
    net.check(reach.deny(to="x/a*").allow("x/b*", "x/a*"))


def test_deleted_pod_is_gone_and_its_peers_unaffected(net: Cluster) -> None:
    gone = net.add_pod("z", "gone", {"pod": "a"})
    net.delete_pod("z/gone")
    assert "z/gone" not in {f"{e['namespace']}/{e['name']}" for e in net.agent.endpoints()}
    assert gone.netns not in netns.names()
    net.check(net.reach(ports=[(80, "TCP")]))


# ---- policy life cycle -----------------------------------------------------------------
def test_policy_delete_restores_reachability(net: Cluster) -> None:
    net.import_policy(DENY_INGRESS_Y)
    net.check(net.reach().deny(to="y/*"))
    net.cli("policy", "delete", "y/deny-ingress")
    assert net.agent.policies() == []
    net.check(net.reach())


def test_reimport_under_the_same_name_replaces_the_policy(net: Cluster) -> None:
    net.import_policy(A_FROM_BLUE_NAMESPACES)
    net.import_policy(A_FROM_BLUE_NAMESPACES.replace("team: blue", "ns: z"))
    assert [p["name"] for p in net.agent.policies()] == ["a-from-blue"]
    net.check(net.reach().deny(to="x/a").allow("z/*", "x/a"))


def test_delete_all_covers_every_kind(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: cilium.io/v2
        kind: CiliumClusterwideNetworkPolicy
        metadata: {name: no-ingress-for-c}
        spec:
          endpointSelector: {matchLabels: {pod: c}}
          ingressDeny:
          - fromEntities: [all]
        ---
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: b-egress, namespace: z}
        spec:
          endpointSelector: {matchLabels: {pod: b}}
          egress:
          - toEndpoints: [{}]
    """)
    net.check(net.reach(ports=[(80, "TCP")]).deny(to="*/c").deny("z/b", "[xy]/*"))
    net.cli("policy", "delete", "--all")
    assert net.agent.policies() == []
    net.check(net.reach(ports=[(80, "TCP")]))


# ---- replies and established connections -----------------------------------------------
def test_replies_pass_under_ingress_only_deny(net: Cluster) -> None:
    """y takes nothing in, yet what y starts works: the answers are replies."""
    net.import_policy(DENY_INGRESS_Y)
    net.check(net.reach(sources=[*PODS, "host", "world"]).deny(to="y/*"))
    out_of_y = net.reach(sources=["y/a", "y/b"], destinations=["x/a", "z/c", "host", "world"])
    net.check(out_of_y)


def test_established_connection_meets_a_new_deny_on_its_next_packet(net: Cluster) -> None:
    """Cilium behaviour: conntrack does not grandfather a connection that policy now
    denies; its next packets in the original direction are dropped. Deleting the policy
    lets the same connection carry on (TCP retransmits what was dropped)."""
    conn = Connection(net.peers["x/a"], net.peers["y/b"], 80)
    try:
        assert conn.echo(), "the connection does not work before any policy"
        net.import_policy(DENY_INGRESS_Y)
        assert not conn.echo(), "an established connection still passes a new deny"
        net.cli("policy", "delete", "y/deny-ingress")
        assert conn.echo(timeout=5), "the connection did not recover after the delete"
    finally:
        conn.close()


def test_established_connection_meets_a_new_egress_deny(net: Cluster) -> None:
    conn = Connection(net.peers["z/a"], net.peers["x/c"], 81)
    try:
        assert conn.echo()
        net.import_policy("""
            apiVersion: cilium.io/v2
            kind: CiliumNetworkPolicy
            metadata: {name: a-no-egress, namespace: z}
            spec:
              endpointSelector: {matchLabels: {pod: a}}
              egressDeny:
              - toEndpoints:
                - matchLabels: {io.kubernetes.pod.namespace: x}
              egress:
              - toEntities: [all]
        """)
        assert not conn.echo()
    finally:
        conn.close()


def test_unrelated_policy_change_leaves_a_connection_alone(net: Cluster) -> None:
    conn = Connection(net.peers["x/b"], net.peers["z/c"], 80)
    try:
        assert conn.echo()
        net.import_policy(DENY_INGRESS_Y)
        net.import_policy(A_FROM_BLUE_NAMESPACES)
        assert conn.echo()
    finally:
        conn.close()


# ---- explaining verdicts ---------------------------------------------------------------
def test_trace_names_the_deciding_rule(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: a-from-y-80, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress:
          - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
            ports: [{port: 80}]
        ---
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: no-y-c, namespace: x}
        spec:
          endpointSelector: {matchLabels: {pod: a}}
          ingressDeny:
          - fromEndpoints:
            - matchLabels: {io.kubernetes.pod.namespace: y, pod: c}
    """)
    allowed = net.agent.trace("y/b", "x/a", "80/TCP")
    assert allowed["verdict"] == "ALLOWED", allowed
    assert any("x/a-from-y-80" in (s.get("deciding_rule") or "") for s in allowed["steps"]), allowed

    denied = net.agent.trace("y/c", "x/a", "80/TCP")
    assert denied["verdict"] == "DENIED", denied
    rules = [s.get("deciding_rule") or "" for s in denied["steps"]]
    assert any("x/no-y-c" in r and "ingressDeny" in r for r in rules), denied

    default = net.agent.trace("z/b", "x/a", "80/TCP")
    assert default["verdict"] == "DENIED", default
    assert net.agent.trace("y/b", "x/a", "81/TCP")["verdict"] == "DENIED"
    assert net.agent.trace("y/b", "x/b", "81/TCP")["verdict"] == "ALLOWED"
    # ...and what trace says is what the traffic does.
    net.check(
        net.reach(sources=["y/b", "y/c", "z/b"], destinations=["x/a", "x/b"], ports=[(80, "TCP")])
        .deny(to="x/a")
        .allow("y/b", "x/a")
    )


def _flows_for(net: Cluster, src: str, dst: str, verdict: str) -> list[dict]:
    s_ns, s_name = src.split("/")
    d_ns, d_name = dst.split("/")
    return [
        f
        for f in (r["flow"] for r in net.agent.observe(2000) if "flow" in r)
        if f.get("verdict") == verdict
        and f.get("source", {}).get("namespace") == s_ns
        and f.get("source", {}).get("pod_name") == s_name
        and f.get("destination", {}).get("namespace") == d_ns
        and f.get("destination", {}).get("pod_name") == d_name
    ]


def test_observe_shows_drops_with_reason_and_policy(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: z-b-rules, namespace: z}
        spec:
          endpointSelector: {matchLabels: {pod: b}}
          ingress:
          - fromEndpoints: [{matchLabels: {pod: a}}]
          ingressDeny:
          - fromEndpoints: [{matchLabels: {pod: c}}]
    """)
    net.check(
        net.reach(sources=["z/a", "z/c", "y/a"], destinations=["z/b"], ports=[(80, "TCP")])
        .deny(to="z/b")
        .allow("z/a", "z/b")
    )
    denied = wait_for(
        "a POLICY_DENY flow z/c -> z/b", lambda: _flows_for(net, "z/c", "z/b", "DROPPED")
    )
    assert any(f.get("drop_reason_desc") == "POLICY_DENY" for f in denied), denied
    deny = next(f for f in denied if f.get("drop_reason_desc") == "POLICY_DENY")
    (by,) = deny["ingress_denied_by"]
    assert (by["namespace"], by["name"], by["kind"]) == ("z", "z-b-rules", "CiliumNetworkPolicy")
    assert deny["traffic_direction"] == "INGRESS", deny
    assert deny["source"]["identity"] == identity(net, "z/c"), deny

    default = wait_for("a drop y/a -> z/b", lambda: _flows_for(net, "y/a", "z/b", "DROPPED"))
    assert {f.get("drop_reason_desc") for f in default} == {"POLICY_DENIED"}, default

    passed = wait_for("a flow z/a -> z/b", lambda: _flows_for(net, "z/a", "z/b", "FORWARDED"))
    assert passed[0]["destination"]["identity"] == identity(net, "z/b"), passed


def test_observe_follow_streams_flows_as_they_happen(net: Cluster) -> None:
    """`observe -f` prints flows that happen after it started (the agent streams them,
    chunked, over one long response) and ends quietly on Ctrl-C."""
    follower = subprocess.Popen(
        [membrane_command(), "observe", "-f", "--last", "0", "-o", "json", "--pod", "z/b"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=net.agent.env,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        seen: list[dict] = []

        def streamed_flow() -> bool:
            net.check(net.reach(sources=["z/a"], destinations=["z/b"], ports=[(80, "TCP")]))
            while select.select([follower.stdout], [], [], 0.5)[0]:
                line = follower.stdout.readline()  # type: ignore[union-attr]
                if not line:
                    break
                seen.append(json.loads(line))
            flows = [r["flow"] for r in seen if "flow" in r]  # GetFlowsResponse lines
            return any(
                f.get("source", {}).get("pod_name") == "a"
                and f.get("destination", {}).get("pod_name") == "b"
                for f in flows
            )

        wait_for("a flow z/a -> z/b on the follow stream", streamed_flow, timeout=30)
        follower.send_signal(signal.SIGINT)
        _, err = follower.communicate(timeout=10)
        assert follower.returncode == 0, err
        assert err == "", err
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
