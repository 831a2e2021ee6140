"""Property test: the compiled datapath entries decide every flow exactly as the reference
evaluator reads the policies.

Hypothesis builds small nodes (namespaces with labels, pods with labels, named ports and
addresses, IPv4-only or dual-stack, CIDR and pod-address identities as the agent labels
them: policy_support.py) and random policies of every kind and feature as the YAML users
write, so the parser takes part too, with the node exempt from default deny or not
(`--allow-localhost`) and Cilium CIDRs matching pod addresses or not (`cidr_match_mode`).
For random flows, the compiled entries (both identities of a pod peer with a pod-address
identity, as the datapath looks them up) must give the reference's verdict, name one of
the rules the reference found deciding, and agree on default deny.
"""

from __future__ import annotations

from ipaddress import ip_network
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policy_support import Node, Peer, Pod, build_node, datapath_verdict

from membrane.abi import Direction, Identity
from membrane.policy import (
    AllowLocalhost,
    RuleTable,
    compile_policies,
    evaluate,
    parse_documents,
)
from membrane.policy.model import ENTITIES

NAMESPACES = ["a", "b"]
PODS_LABEL_VALUES = {"app": ["web", "db", "fe"], "tier": ["one", "two"]}
NS_LABEL_VALUES = {"team": ["x", "y"], "env": ["prod", "dev"]}
PORT_NUMBERS = [53, 80, 443, 8080]
NAMED = ["http", "dns"]
PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132}
CIDRS = [
    "0.0.0.0/0",
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.2.0.0/16",
    "192.168.0.0/16",
    "192.168.1.1/32",
    "198.18.0.0/16",  # pods' addresses are in these
    "198.18.0.0/24",
    "198.18.0.7/32",
    "198.19.0.0/16",  # the node's address
    "::/0",
    "2001:db8::/32",
    "2001:db8:1::/48",
    "2001:db8:1::5/128",
    "fd00::/8",
]
POD_V4 = ["198.18.0.7", "198.18.0.9", "198.18.1.3", "10.1.2.3"]
POD_V6 = ["2001:db8:1::5", "2001:db8:1::9", "2001:db8:2::1", "fd00::1"]
GRID = [(proto, port) for proto in (6, 17, 132) for port in PORT_NUMBERS] + [
    (1, 0),
    (1, 8),
    (58, 128),
    (58, 135),
]
QUERY_PORTS = [0, 8, 53, 54, 79, 80, 81, 443, 444, 8080, 8081, 9000, 65535]

# ---- the node --------------------------------------------------------------------------------

namespace_labels = st.dictionaries(
    st.sampled_from(sorted(NS_LABEL_VALUES)), st.sampled_from(["x", "y", "prod", "dev"]), max_size=2
)
pod = st.fixed_dictionaries(
    {
        "namespace": st.sampled_from(NAMESPACES),
        "labels": st.dictionaries(
            st.sampled_from(sorted(PODS_LABEL_VALUES)),
            st.sampled_from(["web", "db", "fe", "one", "two"]),
            max_size=2,
        ),
        "ports": st.dictionaries(
            st.sampled_from(NAMED),
            st.tuples(st.sampled_from(PORT_NUMBERS), st.sampled_from([6, 17])),
            max_size=2,
        ),
        "addresses": st.tuples(st.sampled_from(POD_V4), st.sampled_from(POD_V6)),
    }
)
node = st.fixed_dictionaries(
    {
        "namespaces": st.fixed_dictionaries({ns: namespace_labels for ns in NAMESPACES}),
        "pods": st.lists(pod, min_size=1, max_size=5),
        "extra_cidrs": st.lists(
            st.sampled_from([c for c in CIDRS if not c.endswith("/0")]), max_size=2
        ),
        "dual_stack": st.booleans(),
        "cidr_match_mode": st.sampled_from(["world", "all"]),
    }
)

# ---- selectors -------------------------------------------------------------------------------


def expressions(keys: list[str], values: list[str]) -> st.SearchStrategy[list[dict[str, Any]]]:
    with_values = st.fixed_dictionaries(
        {
            "key": st.sampled_from(keys),
            "operator": st.sampled_from(["In", "NotIn"]),
            "values": st.lists(st.sampled_from(values), min_size=1, max_size=2),
        }
    )
    without = st.fixed_dictionaries(
        {"key": st.sampled_from(keys), "operator": st.sampled_from(["Exists", "DoesNotExist"])}
    )
    return st.lists(with_values | without, max_size=2)


def selector(keys: list[str], values: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    # Half of them empty: random conditions rarely select anything.
    return st.just({}) | st.fixed_dictionaries(
        {},
        optional={
            "matchLabels": st.dictionaries(
                st.sampled_from(keys), st.sampled_from(values), max_size=2
            ),
            "matchExpressions": expressions(keys, values),
        },
    )


POD_VALUES = ["web", "db", "fe", "one", "two"]
k8s_pod_selector = selector(sorted(PODS_LABEL_VALUES), POD_VALUES)
k8s_ns_selector = selector(
    [*sorted(NS_LABEL_VALUES), "kubernetes.io/metadata.name"],
    ["x", "y", "prod", "dev", *NAMESPACES],
)
CILIUM_KEYS = [
    "app",
    "k8s:app",
    "any:tier",
    "io.kubernetes.pod.namespace",
    "k8s:io.kubernetes.pod.namespace",
    "k8s:io.cilium.k8s.namespace.labels.team",
    "io.cilium.k8s.policy.cluster",
]
cilium_selector = selector(CILIUM_KEYS, [*POD_VALUES, *NAMESPACES, "x", "default"]) | st.just(
    {"matchLabels": {"reserved:host": ""}}
)

# ---- ports and CIDRs -------------------------------------------------------------------------


@st.composite
def port_value(draw: st.DrawFn, named: bool = True) -> dict[str, Any]:
    kind = draw(
        st.sampled_from(["number", "range", "named", "none"] if named else ["number", "range"])
    )
    if kind == "none":
        return {}
    if kind == "named":
        return {"port": draw(st.sampled_from(NAMED))}
    port = draw(st.sampled_from(PORT_NUMBERS))
    if kind == "range":
        return {"port": port, "endPort": port + draw(st.sampled_from([1, 3, 100, 1000]))}
    return {"port": port}


@st.composite
def k8s_port(draw: st.DrawFn) -> dict[str, Any]:
    entry = draw(port_value())
    if draw(st.booleans()):
        entry["protocol"] = draw(st.sampled_from(sorted(PROTOCOLS)))
    return entry


@st.composite
def cilium_port(draw: st.DrawFn) -> dict[str, Any]:
    entry = draw(port_value())
    if "port" in entry and not isinstance(entry["port"], str) and draw(st.booleans()):
        entry["port"] = str(entry["port"])  # as the Cilium docs write it
    if draw(st.booleans()):
        entry["protocol"] = draw(st.sampled_from([*sorted(PROTOCOLS), "ANY"]))
    return entry


@st.composite
def cidr_with_excepts(draw: st.DrawFn) -> dict[str, Any]:
    cidr = draw(st.sampled_from(CIDRS))
    net = ip_network(cidr)
    inside = [
        c
        for c in CIDRS
        if ip_network(c).version == net.version and ip_network(c).subnet_of(net) and c != cidr
    ]
    excepts = draw(st.lists(st.sampled_from(inside), max_size=2, unique=True)) if inside else []
    return {"cidr": cidr, "except": excepts} if excepts else {"cidr": cidr}


# ---- NetworkPolicy ---------------------------------------------------------------------------


@st.composite
def k8s_peer(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["pod", "namespace", "both", "ip"]))
    if kind == "ip":
        return {"ipBlock": draw(cidr_with_excepts())}
    peer = {}
    if kind in ("pod", "both"):
        peer["podSelector"] = draw(k8s_pod_selector)
    if kind in ("namespace", "both"):
        peer["namespaceSelector"] = draw(k8s_ns_selector)
    return peer


def k8s_rule(peer_field: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {},
        optional={
            peer_field: st.lists(k8s_peer(), max_size=2),
            "ports": st.lists(k8s_port(), max_size=2),
        },
    )


k8s_spec = st.fixed_dictionaries(
    {"podSelector": k8s_pod_selector},
    optional={
        "policyTypes": st.lists(
            st.sampled_from(["Ingress", "Egress"]), min_size=1, max_size=2, unique=True
        ),
        "ingress": st.lists(k8s_rule("from"), max_size=2),
        "egress": st.lists(k8s_rule("to"), max_size=2),
    },
)

# ---- Cilium ---------------------------------------------------------------------------------


def cilium_rule(prefix: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {},
        optional={
            f"{prefix}Endpoints": st.lists(cilium_selector, max_size=2),
            f"{prefix}CIDR": st.lists(st.sampled_from(CIDRS), max_size=2),
            f"{prefix}CIDRSet": st.lists(cidr_with_excepts(), max_size=2),
            f"{prefix}Entities": st.lists(st.sampled_from(list(ENTITIES)), max_size=2),
            "toPorts": st.lists(
                st.fixed_dictionaries({}, optional={"ports": st.lists(cilium_port(), max_size=2)}),
                max_size=2,
            ),
            "icmps": st.lists(
                st.fixed_dictionaries(
                    {
                        "fields": st.lists(
                            st.fixed_dictionaries({"type": st.sampled_from([0, 8])})
                            | st.fixed_dictionaries(
                                {
                                    "type": st.sampled_from([128, "NeighborSolicitation"]),
                                    "family": st.just("IPv6"),
                                }
                            ),
                            min_size=1,
                            max_size=2,
                        )
                    }
                ),
                max_size=1,
            ),
        },
    )


cilium_spec = st.fixed_dictionaries(
    {"endpointSelector": cilium_selector},
    optional={
        "ingress": st.lists(cilium_rule("from"), max_size=2),
        "ingressDeny": st.lists(cilium_rule("from"), max_size=1),
        "egress": st.lists(cilium_rule("to"), max_size=2),
        "egressDeny": st.lists(cilium_rule("to"), max_size=1),
        "enableDefaultDeny": st.fixed_dictionaries(
            {}, optional={"ingress": st.booleans(), "egress": st.booleans()}
        ),
    },
)


@st.composite
def policy_document(draw: st.DrawFn, number: int) -> dict[str, Any]:
    kind = draw(
        st.sampled_from(["NetworkPolicy", "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"])
    )
    metadata: dict[str, Any] = {"name": f"p{number}"}
    if kind != "CiliumClusterwideNetworkPolicy":
        metadata["namespace"] = draw(st.sampled_from(NAMESPACES))
    if kind == "NetworkPolicy":
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": kind,
            "metadata": metadata,
            "spec": draw(k8s_spec),
        }
    document = {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": metadata}
    if draw(st.booleans()):
        document["spec"] = draw(cilium_spec)
    else:
        document["specs"] = draw(st.lists(cilium_spec, min_size=1, max_size=2))
    return document


@st.composite
def policy_documents(draw: st.DrawFn) -> list[dict[str, Any]]:
    count = draw(st.integers(min_value=1, max_value=5))
    return [draw(policy_document(n)) for n in range(count)]


# ---- the property ----------------------------------------------------------------------------


def node_of(spec: dict[str, Any], policies: list, allow_localhost: AllowLocalhost) -> Node:
    pods = [
        Pod(p["namespace"], f"pod{n}", p["labels"], p["addresses"], p["ports"])
        for n, p in enumerate(spec["pods"], start=1)
    ]
    return build_node(
        pods,
        spec["namespaces"],
        policies,
        dual_stack=spec["dual_stack"],
        cidr_match_mode=spec["cidr_match_mode"],
        extra_cidrs=spec["extra_cidrs"],
        allow_localhost=allow_localhost,
    )


Flow = tuple[int, int, Peer, int, int]  # ep_id, direction, peer, proto, port


@st.composite
def scenario(draw: st.DrawFn) -> tuple[Node, str, list, list[Flow]]:
    spec = draw(node)
    documents = draw(policy_documents())
    policies = parse_documents(yaml.safe_dump_all(documents))
    built = node_of(spec, policies, draw(st.sampled_from(list(AllowLocalhost))))
    peers = [*all_peers(built)]
    flow = st.tuples(
        st.sampled_from(sorted(built.universe.endpoints)),
        st.sampled_from([0, 1]),
        st.sampled_from(peers),
        st.sampled_from([1, 6, 6, 17, 58, 132]),
        st.sampled_from(QUERY_PORTS) | st.sampled_from(QUERY_PORTS) | st.integers(0, 65535),
    )
    return built, spec["cidr_match_mode"], policies, draw(st.lists(flow, max_size=10))


def all_peers(built: Node) -> list[Peer]:
    """Every peer of the node (pods with and without an address), plus an identity nobody
    knows. A pod-address identity is never a peer's own: it comes with its pod's."""
    return [*built.peers.values(), Peer(99999)]


def grid_flows(built: Node) -> list[Flow]:
    """Every endpoint, direction and peer on the ports and ICMP types policies use: where
    rules, named ports and selectors make a difference."""
    return [
        (ep_id, direction, peer, proto, port)
        for ep_id in built.universe.endpoints
        for direction in Direction
        for peer in all_peers(built)
        for proto, port in GRID
    ]


def boundary_flows(built: Node, compiled: dict) -> list[Flow]:
    """Flows at the edges of every compiled entry (its first and last port and the ports just
    outside) for every protocol, for the peers with its identity (or a few, for an any-peer
    entry): where a wrong entry would show."""
    by_identity: dict[int, list[Peer]] = {}
    for peer in all_peers(built):
        by_identity.setdefault(peer.identity, []).append(peer)
        if peer.address_identity is not None:
            by_identity.setdefault(peer.address_identity, []).append(peer)
    endpoint_ids = sorted(e.identity for e in built.universe.endpoints.values())
    any_peers = [Peer(Identity.WORLD), Peer(endpoint_ids[0]), Peer(99999)]
    flows = []
    for ep_id, policy in compiled.items():
        for e in policy.entries:
            size = 1 << (16 - e.port_bits)
            ports = {e.port, e.port + size - 1, max(e.port - 1, 0), min(e.port + size, 65535)}
            for peer in by_identity.get(e.identity, []) if e.identity else any_peers:
                for proto in (1, 6, 17, 58, 132):
                    flows += [(ep_id, e.direction, peer, proto, port) for port in ports]
    return flows


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario())
def test_compiled_entries_decide_like_the_reference(case: tuple) -> None:
    built, cidr_match_mode, policies, flows = case
    universe = built.universe
    rules = RuleTable()
    compiled = compile_policies(policies, universe, rules)  # in the universe's mode
    assert set(compiled) == set(universe.endpoints)
    checks = flows + grid_flows(built) + boundary_flows(built, compiled)
    for ep_id, direction, peer, proto, port in checks:
        endpoint = universe.endpoints[ep_id]
        decision = evaluate(
            policies,
            universe,
            endpoint=endpoint,
            direction=("ingress", "egress")[direction],
            peer_identity=peer.identity,
            proto=proto,
            port=port,
            peer_address=peer.address,
            cidr_match_mode=cidr_match_mode,
        )
        allowed, rule_id = datapath_verdict(compiled[ep_id], direction, peer, proto, port)
        where = (endpoint.namespace, ep_id, direction, peer, proto, port, decision)
        assert allowed == decision.allowed, where
        assert compiled[ep_id].enforces(direction) == decision.enforced, where
        if decision.denied_by:
            assert rules.get(rule_id) in decision.denied_by, where
        elif decision.allowed_by:
            assert rules.get(rule_id) in decision.allowed_by, where
        else:
            assert rule_id == 0, where
