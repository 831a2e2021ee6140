"""Property test: the compiled datapath entries decide every flow exactly as the reference
evaluator reads the policies.

Hypothesis builds small nodes (namespaces with labels, pods with labels and named ports,
CIDR identities) and random policies of every kind and feature as the YAML users write,
so the parser takes part too, with the node exempt from default deny or not
(`--allow-localhost`). For random flows, `lookup` over the compiled entries must
give the reference's verdict, name one of the rules the reference found deciding, and
agree on default deny.
"""

from __future__ import annotations

from ipaddress import IPv4Network
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from membrane.abi import Direction, Identity
from membrane.identity.labels import (
    RESERVED_LABELS,
    cidr_identity_labels,
    endpoint_labels,
)
from membrane.policy import (
    AllowLocalhost,
    EndpointInfo,
    RuleTable,
    Universe,
    compile_policies,
    evaluate,
    lookup,
    parse_documents,
    policy_cidrs,
)

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
]
ENTITIES = ["world", "host", "cluster", "all", "remote-node", "health", "init", "unmanaged"]
GRID = [(proto, port) for proto in (6, 17, 132) for port in PORT_NUMBERS] + [(1, 0), (1, 8)]
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
    }
)
node = st.fixed_dictionaries(
    {
        "namespaces": st.fixed_dictionaries({ns: namespace_labels for ns in NAMESPACES}),
        "pods": st.lists(pod, min_size=1, max_size=5),
        "extra_cidrs": st.lists(st.sampled_from(CIDRS[1:]), max_size=2),
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
    net = IPv4Network(cidr)
    inside = [c for c in CIDRS if IPv4Network(c).subnet_of(net) and c != cidr]
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
            f"{prefix}Entities": st.lists(st.sampled_from(ENTITIES), max_size=2),
            "toPorts": st.lists(
                st.fixed_dictionaries({}, optional={"ports": st.lists(cilium_port(), max_size=2)}),
                max_size=2,
            ),
            "icmps": st.lists(
                st.fixed_dictionaries(
                    {
                        "fields": st.lists(
                            st.fixed_dictionaries({"type": st.sampled_from([0, 8])}),
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


def build_universe(
    spec: dict[str, Any], policies: list, allow_localhost: AllowLocalhost
) -> Universe:
    prefixes = policy_cidrs(policies)
    identities = dict(RESERVED_LABELS)
    endpoints: dict[int, EndpointInfo] = {}
    by_labels: dict[frozenset, int] = {}
    for ep_id, p in enumerate(spec["pods"], start=1):
        labels = endpoint_labels(p["namespace"], p["labels"], spec["namespaces"][p["namespace"]])
        identity = by_labels.setdefault(labels, Identity.FIRST_ENDPOINT + len(by_labels))
        identities[identity] = labels
        endpoints[ep_id] = EndpointInfo(
            ep_id, p["namespace"], f"pod{ep_id}", identity, labels, dict(p["ports"])
        )
    cidr_identities = {}
    all_prefixes = sorted(prefixes | {IPv4Network(c) for c in spec["extra_cidrs"]})
    for n, prefix in enumerate(all_prefixes):
        cidr_identities[Identity.FIRST_CIDR + n] = prefix
        identities[Identity.FIRST_CIDR + n] = cidr_identity_labels(prefix, prefixes)
    return Universe(identities, endpoints, cidr_identities, allow_localhost)


@st.composite
def scenario(draw: st.DrawFn) -> tuple[Universe, list, list[tuple[int, int, int, int, int]]]:
    spec = draw(node)
    documents = draw(policy_documents())
    policies = parse_documents(yaml.safe_dump_all(documents))
    universe = build_universe(spec, policies, draw(st.sampled_from(list(AllowLocalhost))))
    peers = [*sorted(universe.identities), 99999]  # plus an identity nobody knows
    flow = st.tuples(
        st.sampled_from(sorted(universe.endpoints)),
        st.sampled_from([0, 1]),
        st.sampled_from(peers),
        st.sampled_from([1, 6, 6, 17, 132]),
        st.sampled_from(QUERY_PORTS) | st.sampled_from(QUERY_PORTS) | st.integers(0, 65535),
    )
    return universe, policies, draw(st.lists(flow, max_size=10))


def grid_flows(universe: Universe) -> list[tuple[int, int, int, int, int]]:
    """Every endpoint, direction and peer (plus one nobody knows) on the ports and ICMP
    types policies use: where rules, named ports and selectors make a difference."""
    peers = [*sorted(universe.identities), 99999]
    return [
        (ep_id, direction, peer, proto, port)
        for ep_id in universe.endpoints
        for direction in Direction
        for peer in peers
        for proto, port in GRID
    ]


def boundary_flows(universe: Universe, compiled: dict) -> list[tuple[int, int, int, int, int]]:
    """Flows at the edges of every compiled entry (its first and last port and the ports just
    outside) for every protocol, for its own identity (or a few, for an any-peer entry):
    where a wrong entry would show."""
    endpoint_ids = sorted(e.identity for e in universe.endpoints.values())
    any_peers = [Identity.WORLD, endpoint_ids[0], 99999]
    flows = []
    for ep_id, policy in compiled.items():
        for e in policy.entries:
            size = 1 << (16 - e.port_bits)
            ports = {e.port, e.port + size - 1, max(e.port - 1, 0), min(e.port + size, 65535)}
            for peer in [e.identity] if e.identity else any_peers:
                for proto in (1, 6, 17, 132):
                    flows += [(ep_id, e.direction, peer, proto, port) for port in ports]
    return flows


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario())
def test_compiled_entries_decide_like_the_reference(case: tuple) -> None:
    universe, policies, flows = case
    rules = RuleTable()
    compiled = compile_policies(policies, universe, rules)
    assert set(compiled) == set(universe.endpoints)
    checks = flows + grid_flows(universe) + boundary_flows(universe, compiled)
    for ep_id, direction, peer, proto, port in checks:
        endpoint = universe.endpoints[ep_id]
        decision = evaluate(
            policies,
            universe,
            endpoint=endpoint,
            direction=("ingress", "egress")[direction],
            peer_identity=peer,
            proto=proto,
            port=port,
        )
        allowed, rule_id = lookup(compiled[ep_id], direction, peer, proto, port)
        where = (endpoint.namespace, ep_id, direction, peer, proto, port, decision)
        assert allowed == decision.allowed, where
        assert compiled[ep_id].enforces(direction) == decision.enforced, where
        if decision.denied_by:
            assert rules.get(rule_id) in decision.denied_by, where
        elif decision.allowed_by:
            assert rules.get(rule_id) in decision.allowed_by, where
        else:
            assert rule_id == 0, where
