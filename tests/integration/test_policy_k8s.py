"""Kubernetes NetworkPolicy semantics on real traffic, as reachability truth tables.

The cluster (agent_support.Cluster): namespaces x, y, z labelled ns=NS, pods a, b, c in each
labelled pod=NAME (c pods also team=red), every pod serving TCP and UDP echo on 80-82 with
named ports serve-80-tcp, serve-81-tcp, serve-80-udp, serve-81-udp; "host" is the node
(198.19.0.1), "world" an outside host. The agent runs with `--allow-localhost=policy`, so
that the host is a peer policy applies to, like world (by default the node passes default
deny, as Kubernetes says: test_policy_allow_localhost.py). Each case imports its policy,
states the expected table with allow/deny patterns over the default "everything allowed",
and probes it all. A pod talking to itself never leaves its namespace, so those cells are
always allowed. Every table is checked over IPv4 and over IPv6 (the pods' and the outside
host's IPv6 addresses): the same policy must give the same answers.
"""

from __future__ import annotations

import pytest
from agent_support import net_fixture, shared_cluster_fixture

from membrane.testing.cluster import Cluster

pytestmark = pytest.mark.root

cluster = shared_cluster_fixture(allow_localhost="policy")  # see above
net = net_fixture(families=(4, 6))  # every table over IPv4 and over IPv6

PODS = [f"{ns}/{p}" for ns in "xyz" for p in "abc"]
OUTSIDE = ["host", "world"]


def test_without_policy_everything_reaches_everything(net: Cluster) -> None:
    net.check(net.reach(sources=PODS + OUTSIDE, destinations=PODS + OUTSIDE))


def test_default_deny_ingress_isolates_one_namespace(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: default-deny-ingress, namespace: x}
        spec:
          podSelector: {}
          policyTypes: [Ingress]
    """)
    reach = net.reach(sources=PODS + OUTSIDE).deny(to="x/*")
    net.check(reach)


def test_default_deny_egress_still_lets_replies_in(net: Cluster) -> None:
    """x may not start anything; connections into x still work (x's answers are replies)."""
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: default-deny-egress, namespace: x}
        spec:
          podSelector: {}
          policyTypes: [Egress]
    """)
    reach = net.reach(sources=PODS + OUTSIDE, destinations=PODS + OUTSIDE)
    net.check(reach.deny(from_="x/*"))


def test_allow_from_same_namespace(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: allow-same-namespace, namespace: x}
        spec:
          podSelector: {}
          ingress:
          - from:
            - podSelector: {}
    """)
    reach = net.reach(sources=PODS + OUTSIDE).deny(to="x/*").allow("x/*", "x/*")
    net.check(reach)


def test_pod_selector_selects_target_and_peer_in_policy_namespace(net: Cluster) -> None:
    """pod=a in x only; the peer pod=b means x/b, not y/b."""
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: a-from-b, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress:
          - from:
            - podSelector: {matchLabels: {pod: b}}
    """)
    net.check(net.reach().deny(to="x/a").allow("x/b", "x/a"))


def test_namespace_selector(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: a-from-y, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress:
          - from:
            - namespaceSelector: {matchLabels: {ns: y}}
    """)
    net.check(net.reach().deny(to="x/a").allow("y/*", "x/a"))


def test_namespace_selector_on_the_implicit_name_label(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: from-z-by-name, namespace: y}
        spec:
          podSelector: {}
          ingress:
          - from:
            - namespaceSelector:
                matchLabels: {kubernetes.io/metadata.name: z}
    """)
    net.check(net.reach().deny(to="y/*").allow("z/*", "y/*"))


def test_namespace_and_pod_selector_in_one_peer_mean_both(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: from-y-b, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress:
          - from:
            - namespaceSelector: {matchLabels: {ns: y}}
              podSelector: {matchLabels: {pod: b}}
    """)
    net.check(net.reach().deny(to="x/a").allow("y/b", "x/a"))


def test_namespace_and_pod_selector_as_two_peers_mean_either(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: from-y-or-b, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress:
          - from:
            - namespaceSelector: {matchLabels: {ns: y}}
            - podSelector: {matchLabels: {pod: b}}
    """)
    net.check(net.reach().deny(to="x/a").allow("y/*", "x/a").allow("x/b", "x/a"))


def test_empty_namespace_selector_means_every_namespace(net: Cluster) -> None:
    """... with a pod selector: pod=c anywhere."""
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: from-any-c, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress:
          - from:
            - namespaceSelector: {}
              podSelector: {matchLabels: {pod: c}}
    """)
    net.check(net.reach().deny(to="x/a").allow("*/c", "x/a"))


def test_empty_namespace_selector_alone_means_every_pod_but_not_host_or_world(
    net: Cluster,
) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: from-all-pods, namespace: z}
        spec:
          podSelector: {}
          ingress:
          - from:
            - namespaceSelector: {}
    """)
    reach = net.reach(sources=PODS + OUTSIDE).deny(to="z/*").allow("*/*", "z/*")
    net.check(reach)


def test_empty_ingress_rule_allows_everything(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: allow-all, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress:
          - {}
    """)
    net.check(net.reach(sources=PODS + OUTSIDE))


def test_policy_types_default_to_ingress_plus_egress_when_egress_is_given(net: Cluster) -> None:
    """No policyTypes and only an egress section: Ingress is implied as well, so x/a takes
    nothing in, and sends only to y."""
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: a-only-to-y, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          egress:
          - to:
            - namespaceSelector: {matchLabels: {ns: y}}
    """)
    reach = net.reach().deny(to="x/a").deny(from_="x/a").allow("x/a", "y/*")
    net.check(reach)


def test_policy_types_egress_ignores_an_ingress_section(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: egress-only, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          policyTypes: [Egress]
          ingress:
          - from:
            - podSelector: {matchLabels: {pod: b}}
          egress:
          - {}
    """)
    net.check(net.reach())


def test_policies_selecting_one_pod_are_a_union(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: a-from-b, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress:
          - from: [{podSelector: {matchLabels: {pod: b}}}]
        ---
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: a-from-z-c, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress:
          - from:
            - namespaceSelector: {matchLabels: {ns: z}}
              podSelector: {matchLabels: {pod: c}}
    """)
    net.check(net.reach().deny(to="x/a").allow("x/b", "x/a").allow("z/c", "x/a"))


def test_policy_in_one_namespace_leaves_equal_labels_elsewhere_alone(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: deny-a, namespace: y}
        spec:
          podSelector: {matchLabels: {pod: a}}
          policyTypes: [Ingress]
    """)
    net.check(net.reach().deny(to="y/a"))


def test_match_expressions_in_pod_selectors(net: Cluster) -> None:
    """Targets: pod NotIn [a], i.e. x/b and x/c; peers: pod In [a, b, c] and no team label,
    i.e. x/a and x/b."""
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: expressions, namespace: x}
        spec:
          podSelector:
            matchExpressions:
            - {key: pod, operator: NotIn, values: [a]}
          ingress:
          - from:
            - podSelector:
                matchExpressions:
                - {key: pod, operator: In, values: [a, b, c]}
                - {key: team, operator: DoesNotExist}
    """)
    reach = net.reach().deny(to="x/b").deny(to="x/c").allow("x/a", "x/[bc]").allow("x/b", "x/c")
    net.check(reach)


def test_match_expressions_in_namespace_selectors(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: from-y-and-z-red, namespace: x}
        spec:
          podSelector: {}
          ingress:
          - from:
            - namespaceSelector:
                matchExpressions:
                - {key: ns, operator: In, values: [y, z]}
              podSelector:
                matchExpressions:
                - {key: team, operator: Exists}
    """)
    net.check(net.reach().deny(to="x/*").allow("[yz]/c", "x/*"))


def test_port_restricts_protocol_and_number(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: only-80-tcp, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress:
          - ports:
            - {port: 80, protocol: TCP}
    """)
    reach = net.reach(sources=PODS + OUTSIDE).deny(to="x/a").allow(to="x/a", port=80, proto="TCP")
    net.check(reach)


def test_udp_port(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: only-81-udp, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress:
          - from: [{namespaceSelector: {}}]
            ports:
            - {port: 81, protocol: UDP}
    """)
    net.check(net.reach().deny(to="x/a").allow(to="x/a", port=81, proto="UDP"))


def test_port_range_with_end_port(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: range-81-82, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress:
          - ports:
            - {port: 81, endPort: 82, protocol: TCP}
    """)
    ports = [(80, "TCP"), (81, "TCP"), (82, "TCP"), (81, "UDP")]
    reach = net.reach(ports=ports).deny(to="x/a")
    net.check(reach.allow(to="x/a", port=81, proto="TCP").allow(to="x/a", port=82, proto="TCP"))


def test_named_ports_on_ingress(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: named, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress:
          - ports:
            - {port: serve-81-tcp}
            - {port: serve-80-udp, protocol: UDP}
    """)
    reach = net.reach().deny(to="x/a")
    net.check(reach.allow(to="x/a", port=81, proto="TCP").allow(to="x/a", port=80, proto="UDP"))


def test_named_port_on_egress_resolves_at_the_destination(net: Cluster) -> None:
    """The name is looked up at the destination pods (all of them call 80/TCP so). Only
    pods are probed: outside peers have no named ports, and Cilium resolves egress names
    node-wide, so what it does to them is not Kubernetes' business."""
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: egress-named, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          policyTypes: [Egress]
          egress:
          - ports:
            - {port: serve-80-tcp}
    """)
    reach = net.reach().deny(from_="x/a")
    net.check(reach.allow("x/a", "*/*", port=80, proto="TCP"))


def test_egress_to_namespace_and_port(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: a-to-y-80, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          policyTypes: [Egress]
          egress:
          - to: [{namespaceSelector: {matchLabels: {ns: y}}}]
            ports: [{port: 80}]
    """)
    reach = net.reach(destinations=PODS + OUTSIDE).deny(from_="x/a")
    net.check(reach.allow("x/a", "y/*", port=80, proto="TCP"))


def test_egress_deny_at_the_source_beats_ingress_allow_at_the_destination(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: a-sends-nothing, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          policyTypes: [Egress]
        ---
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: b-from-x-a, namespace: y}
        spec:
          podSelector: {matchLabels: {pod: b}}
          ingress:
          - from:
            - namespaceSelector: {matchLabels: {ns: x}}
              podSelector: {matchLabels: {pod: a}}
    """)
    net.check(net.reach().deny(from_="x/a").deny(to="y/b"))


def test_ingress_and_egress_in_one_policy(net: Cluster) -> None:
    """z/b takes from z/a only, and sends to x/c only (and replies to what it accepted)."""
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: both, namespace: z}
        spec:
          podSelector: {matchLabels: {pod: b}}
          policyTypes: [Ingress, Egress]
          ingress:
          - from: [{podSelector: {matchLabels: {pod: a}}}]
          egress:
          - to:
            - namespaceSelector: {matchLabels: {ns: x}}
              podSelector: {matchLabels: {pod: c}}
    """)
    reach = net.reach().deny(to="z/b").allow("z/a", "z/b").deny(from_="z/b").allow("z/b", "x/c")
    net.check(reach)
