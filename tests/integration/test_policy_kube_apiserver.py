"""The kube-apiserver entity on real traffic: it stands for the addresses given by
`membrane agent run --kube-apiserver-ip` (here two addresses of the outside host, one per
family), so a pod allowed to reach the API server reaches exactly those. Entities that
select nothing on this node (ingress, remote-node, health) are accepted and allow nothing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from membrane.testing.agent import agent_unusable_reason
from membrane.testing.cluster import Cluster, running_cluster

pytestmark = pytest.mark.root

APISERVER4, APISERVER6 = "198.19.2.10", "2001:db8:ff02::10"  # world-2 of the outside host
PORTS = ((80, "TCP"), (81, "UDP"))


@pytest.fixture(scope="module")
def net() -> Iterator[Cluster]:
    reason = agent_unusable_reason()
    if reason:
        pytest.skip(reason)
    with running_cluster(
        namespaces=("x",),
        pod_names=("a", "b"),
        extra_args=[f"--kube-apiserver-ip={APISERVER4},{APISERVER6}"],
    ) as cluster:
        yield cluster


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_kube_apiserver_is_the_given_addresses(net: Cluster, family: int) -> None:
    net.import_policy("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: to-apiserver, namespace: x}
        spec:
          endpointSelector: {matchLabels: {pod: a}}
          egress:
          - toEntities: [kube-apiserver, ingress, remote-node, health]
    """)
    try:
        reach = net.reach(sources=["x/a"], destinations=["world", "world-2", "world-3", "x/b"])
        reach.ports = PORTS
        reach.deny(from_="x/a").allow(from_="x/a", to="world-2")
        net.check(reach, family=family)
        traced = net.agent.trace("x/a", APISERVER4 if family == 4 else APISERVER6, "80")
        assert traced["verdict"] == "ALLOWED"
        assert traced["steps"][0]["peer_identity"] == 7  # reserved:kube-apiserver
    finally:
        net.reset()


def test_entities_that_match_nothing_say_why(net: Cluster) -> None:
    policy = """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: nothing-here, namespace: x}
        spec:
          endpointSelector: {matchLabels: {pod: b}}
          ingress:
          - fromEntities: [remote-node, kube-apiserver]
    """
    try:
        imported = net.import_policy(policy)
        why = "spec.ingress[0].fromEntities[0]: entity remote-node matches nothing"
        assert f"warning: CiliumNetworkPolicy x/nothing-here: {why}" in imported.stderr
        assert "kube-apiserver" not in imported.stderr  # it has addresses on this node
        assert why in net.cli("policy", "get", "x/nothing-here").stderr
        traced = net.agent.trace("x/a", "x/b", "80")
        assert traced["verdict"] == "DENIED"
        assert any(why in note for note in traced["notes"]), traced["notes"]
    finally:
        net.reset()
