"""Bad input is refused with exit code 2 and one stderr line naming the field and the
problem, and whatever was in force stays in force: the policy list is unchanged and real
traffic still follows the policy imported before.

The policy in force for every case: x/a takes traffic from x/b only.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from agent_support import cluster_fixture

from membrane.testing.cli import user_error
from membrane.testing.cluster import Cluster

pytestmark = pytest.mark.root

cluster = cluster_fixture(namespaces=("x", "y"), pod_names=("a", "b", "c"))

IN_FORCE = """
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: a-from-b, namespace: x}
    spec:
      podSelector: {matchLabels: {pod: a}}
      ingress:
      - from: [{podSelector: {matchLabels: {pod: b}}}]
"""


def k8s(spec: str, name: str = "bad") -> str:
    """A NetworkPolicy x/NAME with `spec` (any indentation) under spec:."""
    return (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
        f"metadata: {{name: {name}, namespace: x}}\nspec:\n" + _indented(spec)
    )


def cnp(spec: str) -> str:
    return (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
        "metadata: {name: bad, namespace: x}\nspec:\n" + _indented(spec)
    )


def _indented(spec: str) -> str:
    return textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ") + "\n"


@dataclass
class InForce:
    cluster: Cluster
    policies: list[dict[str, Any]]
    endpoints: list[dict[str, Any]]


@pytest.fixture(scope="module")
def module_in_force(cluster: Cluster) -> InForce:
    cluster.import_policy(IN_FORCE)
    return InForce(cluster, cluster.agent.policies(), cluster.agent.endpoints())


@pytest.fixture
def in_force(module_in_force: InForce) -> Iterator[Cluster]:
    """The policy above, imported once for the module; after each case it must still be
    exactly what is in force (the last test checks traffic and endpoints as well)."""
    yield module_in_force.cluster
    after = module_in_force.cluster.agent.policies()
    assert after == module_in_force.policies, "a refused command changed the policies in force"


BAD_POLICIES = {
    "invalid-yaml": ("apiVersion: networking.k8s.io/v1\nkind: [NetworkPolicy\n", None),
    "not-a-mapping": ("- just\n- a list\n", None),
    "unknown-kind": (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicies\n"
        "metadata: {name: bad, namespace: x}\nspec: {podSelector: {}}\n",
        "kind",
    ),
    "wrong-api-version": (
        "apiVersion: cilium.io/v1\nkind: CiliumNetworkPolicy\n"
        "metadata: {name: bad, namespace: x}\nspec: {endpointSelector: {}}\n",
        "apiVersion",
    ),
    "missing-name": (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
        "metadata: {namespace: x}\nspec: {podSelector: {}}\n",
        "name",
    ),
    "unknown-field": (k8s("  podSelectr: {}\n  policyTypes: [Ingress]"), "podSelectr"),
    "bad-operator": (
        k8s("""
              podSelector:
                matchExpressions:
                - {key: pod, operator: Contains, values: [a]}
            """),
        "operator",
    ),
    "in-without-values": (
        k8s("""
              podSelector:
                matchExpressions:
                - {key: pod, operator: In}
            """),
        "values",
    ),
    "bad-cidr": (
        k8s("""
              podSelector: {}
              ingress:
              - from: [{ipBlock: {cidr: 198.19.300.0/24}}]
            """),
        "cidr",
    ),
    "except-outside-cidr": (
        k8s("""
              podSelector: {}
              ingress:
              - from: [{ipBlock: {cidr: 198.19.2.0/24, except: [198.18.0.0/24]}}]
            """),
        "except",
    ),
    "bad-cilium-cidr": (
        cnp("""
              endpointSelector: {}
              ingress:
              - fromCIDR: [198.19.0.0/33]
            """),
        "fromCIDR",
    ),
    "port-out-of-range": (
        k8s("""
              podSelector: {}
              ingress:
              - ports: [{port: 70000}]
            """),
        "port",
    ),
    "end-port-below-port": (
        k8s("""
              podSelector: {}
              ingress:
              - ports: [{port: 81, endPort: 80}]
            """),
        "endPort",
    ),
    "bad-protocol": (
        k8s("""
              podSelector: {}
              ingress:
              - ports: [{port: 80, protocol: ICMP}]
            """),
        "protocol",
    ),
    "bad-named-port": (
        k8s("""
              podSelector: {}
              ingress:
              - ports: [{port: Serve_80}]
            """),
        "port",
    ),
    "unknown-entity": (
        cnp("""
              endpointSelector: {}
              ingress:
              - fromEntities: [universe]
            """),
        "fromEntities",
    ),
    "cilium-port-out-of-range": (
        cnp("""
              endpointSelector: {}
              ingress:
              - toPorts:
                - ports: [{port: "65536", protocol: TCP}]
            """),
        "port",
    ),
}


@pytest.mark.parametrize("case", list(BAD_POLICIES))
def test_bad_policy_is_refused_and_changes_nothing(in_force: Cluster, case: str) -> None:
    text, field = BAD_POLICIES[case]
    line = user_error(in_force.import_policy(text, check=False))
    if field is not None:
        assert field in line, f"the error does not name {field!r}: {line}"


def test_one_bad_document_refuses_the_whole_file(in_force: Cluster) -> None:
    good = k8s("  podSelector: {}\n  policyTypes: [Ingress]", name="would-deny-x")
    bad = k8s("  podSelector: {}\n  ingress:\n  - ports: [{port: 0}]")
    line = user_error(in_force.import_policy(good + "\n---\n" + bad, check=False))
    assert "port" in line, line


def test_replacing_a_policy_with_a_bad_one_keeps_the_old(in_force: Cluster) -> None:
    broken = textwrap.dedent(IN_FORCE).replace("pod: b", "pod: [b]")
    user_error(in_force.import_policy(broken, check=False))


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["policy", "get", "x/nope"], "x/nope"),
        (["policy", "delete", "x/nope"], "x/nope"),
        (["policy", "delete", "nope-clusterwide"], "nope-clusterwide"),
        (["policy", "trace", "--src", "x/nope", "--dst", "x/a", "--dport", "80/TCP"], "x/nope"),
        (["policy", "trace", "--src", "x/b", "--dst", "y/nope", "--dport", "80/TCP"], "y/nope"),
        (["policy", "trace", "--src", "x/b", "--dst", "x/a", "--dport", "80/XYZ"], "--dport"),
        (["policy", "trace", "--src", "x/b", "--dst", "x/a", "--dport", "99999/TCP"], "--dport"),
        (["endpoint", "get", "x/nope"], "x/nope"),
        (["endpoint", "delete", "x/nope"], "x/nope"),
        (["endpoint", "add", "x/a", "--label", "pod=a"], "x/a"),
        (["endpoint", "add", "x/new", "--label", "pod"], "--label"),
        (["endpoint", "add", "x/new", "--port", "http=eighty/TCP"], "--port"),
        (["namespace", "label", "x", "=blue"], "labels"),
        (["policy", "import", "/nonexistent/policy.yaml"], "/nonexistent/policy.yaml"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_arguments_are_refused_and_change_nothing(
    in_force: Cluster, argv: list[str], field: str
) -> None:
    line = user_error(in_force.cli(*argv, check=False))
    assert field in line, f"the error does not name {field!r}: {line}"


def test_traffic_and_endpoints_are_as_before_all_of_this(module_in_force: InForce) -> None:
    """Last in the module: after every refused command above, the datapath still enforces
    the policy in force, and the endpoints are the ones there were."""
    net = module_in_force.cluster
    assert net.agent.endpoints() == module_in_force.endpoints
    reach = net.reach(sources=["x/b", "x/c", "y/a"], destinations=["x/a", "x/c"])
    net.check(reach.deny(to="x/a").allow("x/b", "x/a"))
