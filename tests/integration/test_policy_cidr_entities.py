"""Entities (world, host, cluster, all) and CIDR rules, with traffic from and to the node and
an outside host.

Peers beyond the pods: "host" is the node namespace (198.19.0.1, the host entity), "world"
the outside host on its link address 198.19.1.2, "world-2" and "world-3" the same host
sending from its extra addresses 198.19.2.10 and 198.19.3.10. CIDR rules follow Cilium: they
match only addresses that are neither pods nor the node, even when the prefix covers them.

The agent runs with `--allow-localhost=policy`: these cases are about policy applied to
the node (by default the node passes default deny: test_policy_allow_localhost.py).

Every policy selects x/a only; x/b is the unaffected control.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from agent_support import net_fixture, shared_cluster_fixture

from membrane.testing.cluster import Cluster
from membrane.testing.reachability import Reachability

pytestmark = pytest.mark.root

cluster = shared_cluster_fixture(allow_localhost="policy")
net = net_fixture()

WORLD = ["world", "world-2", "world-3"]
INSIDE = ["x/a", "x/b", "y/a", "z/c"]
PEERS = [*INSIDE, "host", *WORLD]
TARGETS = ["x/a", "x/b"]
ForXA = Callable[[str], object]

# The head of every CiliumNetworkPolicy here; each test appends its rules under spec.
X_A = """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: x-a, namespace: x}
        spec:
          endpointSelector: {matchLabels: {pod: a}}"""


@pytest.fixture
def x_a(net: Cluster) -> ForXA:
    """Import the CiliumNetworkPolicy for x/a with the given rules (under spec)."""
    return lambda rules: net.import_policy(X_A + rules)


def ingress(net: Cluster) -> Reachability:
    return net.reach(sources=PEERS, destinations=TARGETS).deny(to="x/a")


def egress(net: Cluster) -> Reachability:
    return net.reach(sources=TARGETS, destinations=PEERS).deny(from_="x/a")


def test_without_policy_outside_peers_reach_pods_and_back(net: Cluster) -> None:
    net.check(net.reach(sources=PEERS, destinations=PEERS))


def test_from_entity_world(net: Cluster, x_a: ForXA) -> None:
    x_a("""
          ingress:
          - fromEntities: [world]
    """)
    net.check(ingress(net).allow("world*", "x/a"))


def test_from_entity_host(net: Cluster, x_a: ForXA) -> None:
    x_a("""
          ingress:
          - fromEntities: [host]
    """)
    net.check(ingress(net).allow("host", "x/a"))


def test_from_entity_cluster_is_pods_and_the_node(net: Cluster, x_a: ForXA) -> None:
    x_a("""
          ingress:
          - fromEntities: [cluster]
    """)
    net.check(ingress(net).allow("*/*", "x/a").allow("host", "x/a"))


def test_from_entity_all(net: Cluster, x_a: ForXA) -> None:
    x_a("""
          ingress:
          - fromEntities: [all]
            toPorts:
            - ports: [{port: "81", protocol: ANY}]
    """)
    net.check(ingress(net).allow(to="x/a", port=81))


def test_host_is_subject_to_default_deny_like_any_peer(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: deny-all, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          policyTypes: [Ingress, Egress]
    """)
    reach = net.reach(sources=PEERS, destinations=PEERS).deny(to="x/a").deny(from_="x/a")
    net.check(reach)


def test_to_entity_world(net: Cluster, x_a: ForXA) -> None:
    x_a("""
          egress:
          - toEntities: [world]
    """)
    net.check(egress(net).allow("x/a", "world*"))


def test_to_entity_host(net: Cluster, x_a: ForXA) -> None:
    x_a("""
          egress:
          - toEntities: [host]
            toPorts:
            - ports: [{port: "80", protocol: TCP}]
    """)
    net.check(egress(net).allow("x/a", "host", port=80, proto="TCP"))


def test_to_entity_cluster(net: Cluster, x_a: ForXA) -> None:
    x_a("""
          egress:
          - toEntities: [cluster]
    """)
    net.check(egress(net).allow("x/a", "*/*").allow("x/a", "host"))


def test_from_cidr_single_address(net: Cluster, x_a: ForXA) -> None:
    x_a("""
          ingress:
          - fromCIDR: [198.19.2.10/32]
    """)
    net.check(ingress(net).allow("world-2", "x/a"))


def test_from_cidr_set_with_except(net: Cluster, x_a: ForXA) -> None:
    """198.19.0.0/16 holds the node IP too, but a CIDR never selects the node."""
    x_a("""
          ingress:
          - fromCIDRSet:
            - cidr: 198.19.0.0/16
              except: [198.19.2.0/24]
    """)
    net.check(ingress(net).allow("world", "x/a").allow("world-3", "x/a"))


def test_cidr_covering_the_pod_range_does_not_select_pods(net: Cluster, x_a: ForXA) -> None:
    x_a("""
          ingress:
          - fromCIDR: [198.18.0.0/15]
    """)
    net.check(ingress(net).allow("world*", "x/a"))


def test_to_cidr_single_address(net: Cluster, x_a: ForXA) -> None:
    x_a("""
          egress:
          - toCIDR: [198.19.3.10/32]
    """)
    net.check(egress(net).allow("x/a", "world-3"))


def test_to_cidr_set_with_except_and_port(net: Cluster, x_a: ForXA) -> None:
    x_a("""
          egress:
          - toCIDRSet:
            - cidr: 198.19.0.0/16
              except: [198.19.3.10/32]
            toPorts:
            - ports: [{port: "80", protocol: TCP}, {port: "81", protocol: UDP}]
    """)
    reach = egress(net)
    for peer in ("world", "world-2"):
        reach.allow("x/a", peer, port=80, proto="TCP").allow("x/a", peer, port=81, proto="UDP")
    net.check(reach)


def test_kubernetes_ip_block_with_except_on_ingress(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: ip-block-in, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress:
          - from:
            - ipBlock:
                cidr: 198.19.0.0/16
                except: [198.19.2.0/24]
    """)
    # the node (198.19.0.1) is in the block too: an ipBlock matches every address in it
    reach = ingress(net).allow("world", "x/a").allow("world-3", "x/a")
    net.check(reach.allow("host", "x/a"))


def test_kubernetes_ip_block_everything_except_one_on_egress(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: ip-block-out, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          policyTypes: [Egress]
          egress:
          - to:
            - ipBlock:
                cidr: 0.0.0.0/0
                except: [198.19.2.10/32]
    """)
    # Kubernetes' reading: every address but the except, pods and the node included
    net.check(egress(net).allow("x/a", "*").deny("x/a", "world-2"))


def test_deny_world_cidr_beats_allow_all_entities(net: Cluster, x_a: ForXA) -> None:
    """The Cilium docs' lock-down pattern: allow all, deny one outside range."""
    x_a("""
          ingress:
          - fromEntities: [all]
          ingressDeny:
          - fromCIDRSet:
            - cidr: 198.19.2.0/23
              except: [198.19.3.0/24]
    """)
    net.check(ingress(net).allow(to="x/a").deny("world-2", "x/a"))
