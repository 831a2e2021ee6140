"""Kubernetes NetworkPolicy ipBlock selects pods by address, as the upstream e2e tests
expect ("should allow egress access to server in CIDR block", "should enforce except
clause while egress access to server in CIDR block", "should ensure an IP overlapping both
IPBlock.CIDR and IPBlock.Except is allowed"), over IPv4 and IPv6 alike; a
CiliumNetworkPolicy CIDR rule keeps Cilium's reading (world addresses only).

Two extra pods, x/twin1 and x/twin2, carry the same labels (one identity): an ipBlock of
one's address must select that pod and not its twin, so the datapath cannot be deciding by
identity alone."""

from __future__ import annotations

import pytest
from agent_support import net_fixture, shared_cluster_fixture

from membrane.testing.agent import POD_CIDR, POD_CIDR6
from membrane.testing.cluster import Cluster

pytestmark = pytest.mark.root

cluster = shared_cluster_fixture(allow_localhost="policy")
net = net_fixture()

FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
SERVERS = ["x/twin1", "x/twin2", "y/b"]
TCP80 = ((80, "TCP"),)


def twins(net: Cluster, family: int) -> str:
    """Add the twins; the address of twin1 as a host prefix of `family`."""
    for name in ("twin1", "twin2"):
        net.add_pod("x", name, {"pod": "twin"})
    one = net.pods["x/twin1"]
    return f"{one.ip}/32" if family == 4 else f"{one.ip6}/128"


def egress_policy(*blocks: str) -> str:
    """x/a may talk to these ipBlocks on TCP 80 (each a YAML flow mapping)."""
    rules = "\n".join(
        f"          - to: [{{ipBlock: {b}}}]\n            ports: [{{port: 80}}]" for b in blocks
    )
    return f"""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {{name: client-egress, namespace: x}}
        spec:
          podSelector: {{matchLabels: {{pod: a}}}}
          policyTypes: [Egress]
          egress:
{rules}
    """


@FAMILIES
def test_egress_to_a_server_in_a_cidr_block(net: Cluster, family: int) -> None:
    server = twins(net, family)
    net.import_policy(egress_policy(f"{{cidr: {server}}}"))
    reach = net.reach(sources=["x/a"], destinations=SERVERS, ports=TCP80, default=False)
    net.check(reach.allow(to="x/twin1"), family=family)


@FAMILIES
def test_except_clause_takes_the_server_out(net: Cluster, family: int) -> None:
    server = twins(net, family)
    pods = POD_CIDR if family == 4 else POD_CIDR6
    net.import_policy(egress_policy(f"{{cidr: {pods}, except: [{server}]}}"))
    reach = net.reach(sources=["x/a"], destinations=SERVERS, ports=TCP80)
    net.check(reach.deny(to="x/twin1"), family=family)


@FAMILIES
def test_an_address_in_both_cidr_and_except_is_allowed(net: Cluster, family: int) -> None:
    server = twins(net, family)
    pods = POD_CIDR if family == 4 else POD_CIDR6
    net.import_policy(egress_policy(f"{{cidr: {pods}, except: [{server}]}}", f"{{cidr: {server}}}"))
    net.check(net.reach(sources=["x/a"], destinations=SERVERS, ports=TCP80), family=family)


@FAMILIES
def test_a_cilium_cidr_rule_matches_world_addresses_only(net: Cluster, family: int) -> None:
    """Cilium's documented reading (its --policy-cidr-match-mode default): toCIDR of a pod
    address does not select the pod."""
    server = twins(net, family)
    net.import_policy(f"""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: client-egress, namespace: x}}
        spec:
          endpointSelector: {{matchLabels: {{pod: a}}}}
          egress:
          - toCIDR: ["{server}"]
    """)
    reach = net.reach(sources=["x/a"], destinations=SERVERS, ports=TCP80, default=False)
    net.check(reach, family=family)
