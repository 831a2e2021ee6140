"""Dual-stack pods on real traffic: every pod gets an IPv6 address beside its IPv4 one, and
the same policies give the same truth tables over both families (TCP, UDP and echo);
flows and `policy trace` speak IPv6; `--ipv6=false` keeps a node IPv4-only.

The cluster is the standard one (agent_support): namespaces x, y, z with pods a, b, c, the
agent with `--allow-localhost=policy` so the node ("host") is a peer like any other."""

from __future__ import annotations

import ipaddress

import pytest
from agent_support import net_fixture, shared_cluster_fixture

from membrane import netns
from membrane.testing.agent import POD_CIDR6
from membrane.testing.cluster import Cluster, running_cluster
from membrane.testing.reachability import DEFAULT_PORTS
from membrane.testing.waiting import wait_for

pytestmark = pytest.mark.root

cluster = shared_cluster_fixture(allow_localhost="policy")
net = net_fixture()

PODS = [f"{ns}/{p}" for ns in "xyz" for p in "abc"]
WITH_ECHO = (*DEFAULT_PORTS, (0, "ICMP"))
FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])


def test_every_pod_has_an_ipv6_address_of_the_pod_cidr(net: Cluster) -> None:
    listed = net.agent.cli_json("endpoint", "list")
    addresses = [ipaddress.IPv6Address(ep["ipv6"]) for ep in listed]
    assert len(set(addresses)) == len(listed) >= len(PODS)
    assert all(a in ipaddress.IPv6Network(POD_CIDR6) for a in addresses)
    got = net.agent.cli_json("endpoint", "get", "x/a")
    assert got["ipv6"] == net.pods["x/a"].ip6 and got["ipv4"] == net.pods["x/a"].ip


def test_without_policy_everything_reaches_everything_over_ipv6(net: Cluster) -> None:
    peers = [*PODS, "host"]
    net.check(net.reach(sources=peers, destinations=peers, ports=WITH_ECHO), family=6)


@FAMILIES
def test_a_namespace_policy_gives_one_table_over_both_families(net: Cluster, family: int) -> None:
    net.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: from-y-on-80, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          policyTypes: [Ingress]
          ingress:
          - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
            ports: [{port: 80, protocol: TCP}]
    """)
    reach = net.reach(sources=[*PODS, "host"], destinations=["x/a", "x/b"], ports=WITH_ECHO)
    reach.deny(to="x/a").allow(from_="y/*", to="x/a", port=80, proto="TCP")
    net.check(reach, family=family)


@FAMILIES
def test_cilium_egress_rules_and_icmp_types_over_both_families(net: Cluster, family: int) -> None:
    """Echo is allowed by its type in each family (ICMPv4 8, ICMPv6 128), TCP 81 by port."""
    net.import_policy("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: z-out, namespace: z}
        spec:
          endpointSelector: {matchLabels: {pod: b}}
          egress:
          - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: x}}]
            toPorts: [{ports: [{port: "81", protocol: TCP}]}]
          - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: x}}]
            icmps:
            - fields: [{type: 8, family: IPv4}, {type: EchoRequest, family: IPv6}]
    """)
    reach = net.reach(sources=["z/b"], destinations=["x/a", "y/a"], ports=WITH_ECHO)
    reach.deny(from_="z/b").allow(from_="z/b", to="x/*", port=81, proto="TCP")
    reach.allow(from_="z/b", to="x/*", proto="ICMP")
    net.check(reach, family=family)


WORLDS = ["world", "world-2", "world-3"]


def cnp_egress(rule: str) -> str:
    return f"""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: a-out, namespace: x}}
        spec:
          endpointSelector: {{matchLabels: {{pod: a}}}}
          egress:
          - {rule}
    """


@pytest.mark.parametrize(
    ("rule", "reaches"),
    [
        ("toEntities: [world]", {4, 6}),
        ("toEntities: [world-ipv4]", {4}),
        ("toEntities: [world-ipv6]", {6}),
        ('toCIDR: ["0.0.0.0/0", "::/0"]', {4, 6}),
        ('toCIDR: ["::/0"]', {6}),
    ],
)
def test_world_entities_and_cidrs_by_family(net: Cluster, rule: str, reaches: set[int]) -> None:
    net.import_policy(cnp_egress(rule))
    for family in (4, 6):
        reach = net.reach(sources=["x/a"], destinations=[*WORLDS, "y/a"], ports=WITH_ECHO)
        reach.deny(from_="x/a")
        if family in reaches:
            reach.allow(from_="x/a", to="world*")
        net.check(reach, family=family)


def test_an_ipv6_cidr_set_with_an_except(net: Cluster) -> None:
    net.import_policy(
        cnp_egress('toCIDRSet: [{cidr: "2001:db8:ff00::/44", except: ["2001:db8:ff03::/48"]}]')
    )
    reach = net.reach(sources=["x/a"], destinations=WORLDS, ports=((80, "TCP"), (80, "UDP")))
    reach.deny(from_="x/a").allow(from_="x/a", to="world-2")
    net.check(reach, family=6)
    net.check(reach.deny(from_="x/a"), family=4)


def test_ipv6_flows_and_trace_name_the_pods(net: Cluster) -> None:
    a, b = net.pods["x/a"], net.pods["y/b"]
    assert a.ip6 and b.ip6
    assert netns.ping(b.netns, a.ip6)
    net.check(net.reach(sources=["y/b"], destinations=["x/a"], ports=((80, "TCP"),)), family=6)
    records: list[dict] = []

    def tcp_flows_b_to_a() -> list[dict]:
        # the agent reads a quiet ring within its 100 ms poll: wait for the check's flows
        records[:] = [r["flow"] for r in net.agent.observe(300) if "flow" in r]
        return [
            r
            for r in records
            if r["IP"]["ipVersion"] == "IPv6"
            and r["IP"]["source"] == b.ip6
            and r["IP"]["destination"] == a.ip6
            and "TCP" in r.get("l4", {})
        ]

    v6 = wait_for("IPv6 TCP flows from y/b to x/a", tcp_flows_b_to_a, timeout=5.0, interval=0.2)
    assert {v6[-1]["source"].get("pod_name"), v6[-1]["destination"].get("pod_name")} == {"a", "b"}
    echo = [r for r in records if r.get("l4", {}).get("ICMPv6", {}).get("type") == 128]
    assert echo and echo[-1]["Summary"] == "ICMPv6 EchoRequest"
    traced = net.agent.trace("y/b", a.ip6, "80")
    assert traced["dst"] == "x/a" and traced["verdict"] == "ALLOWED"


def test_an_ipv4_only_node_gives_pods_no_ipv6() -> None:
    with running_cluster(
        namespaces=("x",), pod_names=("a", "b"), extra_args=["--ipv6=false"]
    ) as ipv4_only:
        a, b = ipv4_only.pods["x/a"], ipv4_only.pods["x/b"]
        assert a.ip6 is None and ipv4_only.agent.cli_json("endpoint", "get", "x/a")["ipv6"] is None
        assert not netns.ping(b.netns, "2001:db8:1::2", timeout=0.3)
        ipv4_only.check(ipv4_only.reach(sources=["x/b"], destinations=["x/a"]))
        # an IPv6 NodePort or externalIP has no node address to live on: refused, naming it
        for field, spec in (
            ("ipFamilies", "ipFamilies: [IPv6]"),
            ("externalIPs[0]", "externalIPs: ['2001:db8:9::10']"),
        ):
            service = (
                "apiVersion: v1\nkind: Service\nmetadata: {name: web6, namespace: x}\n"
                f"spec:\n  type: NodePort\n  {spec}\n  ports: [{{port: 80}}]\n"
            )
            refused = ipv4_only.agent.cli("service", "import", "-", input=service, check=False)
            assert refused.returncode == 2 and "Traceback" not in refused.stderr
            lines = refused.stderr.strip().splitlines()
            assert len(lines) == 1 and f"spec.{field}" in lines[0], lines
        assert ipv4_only.agent.cli_json("service", "list") == []
