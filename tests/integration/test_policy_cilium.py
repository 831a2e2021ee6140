"""CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy semantics on real traffic.

Same cluster as test_policy_k8s (x, y, z; pods a, b, c; c pods also team=red; the host is
subject to policy, `--allow-localhost=policy`). What is
Cilium's own: a CNP's selectors are scoped to its namespace unless they name
io.kubernetes.pod.namespace, a CCNP's are not (but still match pods only); deny rules win
over every allow, from any policy kind; a policy with only deny rules still puts the
endpoint in default deny for that direction unless enableDefaultDeny says otherwise;
toPorts protocol ANY; icmps.
"""

from __future__ import annotations

import pytest
from agent_support import net_fixture, shared_cluster_fixture

from membrane.testing.cluster import Cluster

pytestmark = pytest.mark.root

cluster = shared_cluster_fixture(allow_localhost="policy")
net = net_fixture(families=(4, 6))  # every table over IPv4 and over IPv6

PODS = [f"{ns}/{p}" for ns in "xyz" for p in "abc"]
OUTSIDE = ["host", "world"]


def test_empty_selectors_are_scoped_to_the_policy_namespace(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: same-namespace, namespace: x}
        spec:
          endpointSelector: {}
          ingress:
          - fromEndpoints:
            - {}
    """)
    net.check(net.reach(sources=PODS + OUTSIDE).deny(to="x/*").allow("x/*", "x/*"))


def test_label_selectors_are_scoped_to_the_policy_namespace(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: a-from-b, namespace: y}
        spec:
          endpointSelector: {matchLabels: {pod: a}}
          ingress:
          - fromEndpoints:
            - matchLabels: {pod: b}
    """)
    net.check(net.reach().deny(to="y/a").allow("y/b", "y/a"))


def test_pod_namespace_label_selects_across_namespaces(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: a-from-z, namespace: x}
        spec:
          endpointSelector: {matchLabels: {pod: a}}
          ingress:
          - fromEndpoints:
            - matchLabels: {io.kubernetes.pod.namespace: z}
    """)
    net.check(net.reach().deny(to="x/a").allow("z/*", "x/a"))


def test_k8s_prefixed_labels_select_like_plain_ones(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: prefixed, namespace: x}
        spec:
          endpointSelector: {matchLabels: {"k8s:pod": a}}
          ingress:
          - fromEndpoints:
            - matchLabels:
                k8s:io.kubernetes.pod.namespace: y
                k8s:pod: c
    """)
    net.check(net.reach().deny(to="x/a").allow("y/c", "x/a"))


def test_namespace_label_selector_in_a_cnp_stays_in_its_namespace(net: Cluster) -> None:
    """It names namespace labels, not io.kubernetes.pod.namespace: still scoped to x,
    where no pod has ns=y, so it matches nobody. This is the rule DESIGN.md states (and
    Cilium up to 1.15); newer Cilium also exempts io.cilium.k8s.namespace.labels.*
    selectors from the scoping, which would allow y here."""
    net.import_policy("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: ns-labels-scoped, namespace: x}
        spec:
          endpointSelector: {matchLabels: {pod: a}}
          ingress:
          - fromEndpoints:
            - matchLabels: {io.cilium.k8s.namespace.labels.ns: y}
    """)
    net.check(net.reach().deny(to="x/a"))


def test_namespace_label_selector_in_a_ccnp_selects_that_namespace(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: cilium.io/v2
        kind: CiliumClusterwideNetworkPolicy
        metadata: {name: a-from-ns-y}
        spec:
          endpointSelector: {matchLabels: {pod: a}}
          ingress:
          - fromEndpoints:
            - matchLabels: {io.cilium.k8s.namespace.labels.ns: y}
    """)
    net.check(net.reach().deny(to="*/a").allow("y/*", "*/a"))


def test_clusterwide_selectors_span_namespaces(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: cilium.io/v2
        kind: CiliumClusterwideNetworkPolicy
        metadata: {name: a-from-b}
        spec:
          endpointSelector: {matchLabels: {pod: a}}
          ingress:
          - fromEndpoints:
            - matchLabels: {pod: b}
    """)
    net.check(net.reach(sources=PODS + OUTSIDE).deny(to="*/a").allow("*/b", "*/a"))


def test_clusterwide_empty_peer_selector_means_pods_only(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: cilium.io/v2
        kind: CiliumClusterwideNetworkPolicy
        metadata: {name: c-from-pods}
        spec:
          endpointSelector: {matchLabels: {pod: c}}
          ingress:
          - fromEndpoints: [{}]
    """)
    net.check(net.reach(sources=PODS + OUTSIDE).deny(to="*/c").allow("*/*", "*/c"))


@pytest.mark.parametrize(
    ("expression", "allowed_from"),
    [
        ("{key: pod, operator: In, values: [b]}", "*/b"),
        ("{key: pod, operator: NotIn, values: [b, c]}", "*/a"),
        ("{key: team, operator: Exists}", "*/c"),
        ("{key: team, operator: DoesNotExist}", "*/[ab]"),
    ],
    ids=["In", "NotIn", "Exists", "DoesNotExist"],
)
def test_match_expressions(net: Cluster, expression: str, allowed_from: str) -> None:
    """Clusterwide peer selectors without a namespace still match pods only (Cilium adds
    `io.kubernetes.pod.namespace Exists`): NotIn and DoesNotExist leave host and world out."""
    net.import_policy(f"""
        apiVersion: cilium.io/v2
        kind: CiliumClusterwideNetworkPolicy
        metadata: {{name: expressions}}
        spec:
          endpointSelector: {{matchLabels: {{pod: a}}}}
          ingress:
          - fromEndpoints:
            - matchExpressions:
              - {expression}
    """)
    reach = net.reach(sources=PODS + OUTSIDE, ports=[(80, "TCP")])
    net.check(reach.deny(to="*/a").allow(allowed_from, "*/a"))


def test_ingress_deny_wins_over_allow_in_the_same_policy(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: allow-x-but-b, namespace: x}
        spec:
          endpointSelector: {}
          ingress:
          - fromEndpoints: [{}]
          ingressDeny:
          - fromEndpoints:
            - matchLabels: {pod: b}
    """)
    net.check(net.reach().deny(to="x/*").allow("x/[ac]", "x/*"))


def test_deny_in_a_cilium_policy_beats_allow_in_a_kubernetes_policy(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: allow-all-into-a, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress: [{}]
        ---
        apiVersion: cilium.io/v2
        kind: CiliumClusterwideNetworkPolicy
        metadata: {name: no-y-into-a}
        spec:
          endpointSelector: {matchLabels: {pod: a}}
          enableDefaultDeny: {ingress: false}
          ingressDeny:
          - fromEndpoints:
            - matchLabels: {io.kubernetes.pod.namespace: y}
    """)
    net.check(net.reach(sources=PODS + OUTSIDE).deny("y/*", "*/a"))


def test_deny_only_policy_still_enables_default_deny(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: deny-only, namespace: x}
        spec:
          endpointSelector: {matchLabels: {pod: a}}
          ingressDeny:
          - fromEndpoints:
            - matchLabels: {pod: b}
    """)
    net.check(net.reach(sources=PODS + OUTSIDE).deny(to="x/a"))


def test_enable_default_deny_false_denies_only_what_it_names(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: deny-z-only, namespace: x}
        spec:
          endpointSelector: {matchLabels: {pod: a}}
          enableDefaultDeny: {ingress: false, egress: false}
          ingressDeny:
          - fromEndpoints:
            - matchLabels: {io.kubernetes.pod.namespace: z}
          egressDeny:
          - toEndpoints:
            - matchLabels: {io.kubernetes.pod.namespace: y, pod: b}
    """)
    reach = net.reach(sources=PODS + OUTSIDE, destinations=PODS + OUTSIDE)
    net.check(reach.deny("z/*", "x/a").deny("x/a", "y/b"))


def test_deny_on_one_port_leaves_the_others_allowed(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: y-but-not-80-tcp, namespace: y}
        spec:
          endpointSelector: {}
          ingress:
          - fromEndpoints: [{}]
          ingressDeny:
          - fromEndpoints: [{}]
            toPorts:
            - ports: [{port: "80", protocol: TCP}]
    """)
    reach = net.reach().deny(to="y/*").allow("y/*", "y/*").deny("y/*", "y/*", port=80, proto="TCP")
    net.check(reach)


def test_to_ports_protocol_any(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: port-80-any, namespace: x}
        spec:
          endpointSelector: {matchLabels: {pod: a}}
          ingress:
          - fromEndpoints:
            - matchLabels: {io.kubernetes.pod.namespace: y}
            toPorts:
            - ports: [{port: "80", protocol: ANY}]
    """)
    net.check(net.reach().deny(to="x/a").allow("y/*", "x/a", port=80))


def test_to_ports_end_port_range(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: udp-81-82, namespace: z}
        spec:
          endpointSelector: {matchLabels: {pod: b}}
          ingress:
          - toPorts:
            - ports: [{port: "81", endPort: 82, protocol: UDP}]
    """)
    ports = [(80, "UDP"), (81, "UDP"), (82, "UDP"), (81, "TCP")]
    reach = net.reach(ports=ports).deny(to="z/b")
    net.check(reach.allow(to="z/b", port=81, proto="UDP").allow(to="z/b", port=82, proto="UDP"))


def test_egress_to_endpoints(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: a-to-c, namespace: x}
        spec:
          endpointSelector: {matchLabels: {pod: a}}
          egress:
          - toEndpoints:
            - matchLabels: {pod: c}
          - toEndpoints:
            - matchExpressions:
              - {key: io.kubernetes.pod.namespace, operator: In, values: [z]}
            toPorts:
            - ports: [{port: "81", protocol: TCP}]
    """)
    reach = net.reach(destinations=PODS + OUTSIDE).deny(from_="x/a").allow("x/a", "x/c")
    net.check(reach.allow("x/a", "z/*", port=81, proto="TCP"))


def test_clusterwide_egress_port_for_every_pod(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: cilium.io/v2
        kind: CiliumClusterwideNetworkPolicy
        metadata: {name: pods-talk-81-tcp}
        spec:
          endpointSelector: {}
          egress:
          - toEndpoints: [{}]
            toPorts:
            - ports: [{port: "81", protocol: TCP}]
    """)
    reach = net.reach(destinations=PODS + OUTSIDE).deny(from_="*/*")
    net.check(reach.allow("*/*", "[xyz]/*", port=81, proto="TCP"))


def test_icmp_allowed_by_icmps_rule_only(net: Cluster) -> None:
    """x/a: echo requests from x, TCP 80 from y; nothing else (so no ping from y)."""
    net.import_policy("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: ping-from-x, namespace: x}
        spec:
          endpointSelector: {matchLabels: {pod: a}}
          ingress:
          - fromEndpoints: [{}]
            icmps:
            - fields:
              - {type: 8, family: IPv4}
              - {type: 128, family: IPv6}
          - fromEndpoints:
            - matchLabels: {io.kubernetes.pod.namespace: y}
            toPorts:
            - ports: [{port: "80", protocol: TCP}]
    """)
    reach = net.reach(ports=[(0, "ICMP"), (80, "TCP"), (81, "TCP")]).deny(to="x/a")
    net.check(reach.allow("x/*", "x/a", proto="ICMP").allow("y/*", "x/a", port=80, proto="TCP"))


def test_icmp_by_name_on_egress(net: Cluster) -> None:
    net.import_policy("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: ping-out, namespace: y}
        spec:
          endpointSelector: {matchLabels: {pod: c}}
          egress:
          - toEndpoints:
            - matchLabels: {io.kubernetes.pod.namespace: z}
            icmps:
            - fields:
              - {type: EchoRequest, family: IPv4}
              - {type: EchoRequest, family: IPv6}
    """)
    reach = net.reach(ports=[(0, "ICMP"), (80, "TCP")]).deny(from_="y/c")
    net.check(reach.allow("y/c", "z/*", proto="ICMP"))
