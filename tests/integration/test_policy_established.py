"""A deny reaches connections that are already flowing, whatever moved the peer into the
denied identity. The datapath caches a verdict per connection; it is checked again on the
first packet after any change that can alter it: a policy change of the endpoint (its
revision) and an ipcache write that moves addresses to other identities (the writer bumps
every endpoint's revision after the ipcache write, so a packet verified against the old
ipcache in between is checked once more). Each case runs a TCP stream of echo round trips
and expects it cut within seconds of the change, on real traffic. (The cluster is the
policy-test one, `--allow-localhost=policy`; the deny of the host holds in either mode.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from agent_support import net_fixture, shared_cluster_fixture

from membrane.testing.cluster import Cluster
from membrane.testing.reachability import Stream

pytestmark = pytest.mark.root

cluster = shared_cluster_fixture(allow_localhost="policy")
net = net_fixture(families=(4, 6))  # conntrack of both families

X_A_EGRESS_ANYWHERE = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: anywhere, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egress:
  - toEntities: [all]
"""


def x_a_deny_world_host(address: str) -> str:
    host = "128" if ":" in address else "32"
    return f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: deny-host, namespace: x}}
spec:
  endpointSelector: {{matchLabels: {{pod: a}}}}
  egressDeny:
  - toCIDR: ["{address}/{host}"]
"""


Y_A_DENY_QUARANTINED = """
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: quarantine}
spec:
  endpointSelector:
    matchLabels: {k8s:io.kubernetes.pod.namespace: y, pod: a}
  ingress:
  - fromEntities: [cluster]
  ingressDeny:
  - fromEndpoints:
    - matchLabels: {io.cilium.k8s.namespace.labels.quarantine: "yes"}
"""


@pytest.fixture
def streams() -> Iterator[list[Stream]]:
    opened: list[Stream] = []
    yield opened
    for s in opened:
        s.close()


def test_a_cidr_deny_cuts_an_established_stream_to_a_world_address(
    net: Cluster, streams: list[Stream]
) -> None:
    """The deny gives the peer address a new CIDR identity: only the ipcache moves it."""
    net.import_policy(X_A_EGRESS_ANYWHERE)
    stream = Stream(net.peer("x/a"), net.peer("world"), 80)
    streams.append(stream)
    stream.flowing(50)
    net.import_policy(x_a_deny_world_host(net.peer("world").ip))
    stream.cut()


def test_a_namespace_label_moving_a_pod_into_a_denied_identity_cuts_its_stream(
    net: Cluster, streams: list[Stream]
) -> None:
    net.import_policy(Y_A_DENY_QUARANTINED)
    stream = Stream(net.peer("x/a"), net.peer("y/a"), 80)
    streams.append(stream)
    other = Stream(net.peer("z/a"), net.peer("y/a"), 80)  # not quarantined: keeps flowing
    streams.append(other)
    stream.flowing(50)
    other.flowing(20)
    net.label_namespace("x", "quarantine=yes")
    stream.cut()
    other.flowing(50)
