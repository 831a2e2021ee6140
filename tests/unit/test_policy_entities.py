"""Entities, CIDR peers and pod addresses over the identities an IPv4-only and a dual-stack
node have (policy_support.py). Every verdict is asked of the compiled entries, as the
datapath decides with both of a pod peer's identities, and of the reference evaluator,
given the pod's address: they must agree."""

from __future__ import annotations

import pytest
from policy_support import Node, Pod, build_node, datapath_verdict

from membrane.abi import Direction, IpProto
from membrane.policy import (
    AllowLocalhost,
    RuleTable,
    compile_policies,
    evaluate,
    explain,
    parse_documents,
    policy_cidrs,
)
from membrane.policy.model import ENTITIES
from membrane.policy.rules import (
    ENTITY_SELECTORS,
    address_prefixes,
)

TCP, ICMP, ICMPV6 = IpProto.TCP, IpProto.ICMP, IpProto.ICMPV6
NAMESPACES = {"prod": {"env": "prod"}, "dev": {}}
PODS = [
    Pod("prod", "web", {"app": "web"}, ("198.18.0.10", "2001:db8:1::10")),
    Pod("prod", "fe", {"app": "fe"}, ("198.18.0.11", "2001:db8:1::11")),
    Pod("dev", "api", {"app": "api"}, ("198.18.1.5", "2001:db8:1::1:5")),
]
RESERVED = ["host", "remote-node", "kube-apiserver", "ingress", "health", "init", "unmanaged"]
PREFIXES_V4 = ("203.0.113.0/24",)
PREFIXES_V6 = ("2001:db8:ffff::/48",)


def node_for(
    text: str, dual_stack: bool, cidr_match_mode: str = "world", **kw: object
) -> tuple[Node, list, dict]:
    policies = parse_documents(text)
    extra = PREFIXES_V4 + (PREFIXES_V6 if dual_stack else ())
    node = build_node(
        PODS,
        NAMESPACES,
        policies,
        dual_stack=dual_stack,
        cidr_match_mode=cidr_match_mode,
        extra_cidrs=extra,
        **kw,  # type: ignore[arg-type]
    )
    return node, policies, compile_policies(policies, node.universe, RuleTable())


def allowed_peers(
    text: str,
    dual_stack: bool,
    subject: str = "prod/web",
    direction: Direction = Direction.EGRESS,
    cidr_match_mode: str = "world",
    proto: int = TCP,
    port: int = 80,
    own_prefixes: bool = False,
) -> set[str]:
    """The peers (node.peers names) the subject may talk to, after checking that the
    datapath and the reference agree on every peer. The CIDR identities of the policies'
    own prefixes are left out of the answer unless `own_prefixes`."""
    node, policies, compiled = node_for(text, dual_stack, cidr_match_mode)
    endpoint = node.pods[subject]
    own = {str(p) for p in policy_cidrs(policies)} - {*PREFIXES_V4, *PREFIXES_V6}
    found = set()
    for name, peer in node.peers.items():
        allowed, _ = datapath_verdict(compiled[endpoint.ep_id], direction, peer, proto, port)
        decision = evaluate(
            policies,
            node.universe,
            endpoint=endpoint,
            direction=("ingress", "egress")[direction],
            peer_identity=peer.identity,
            proto=proto,
            port=port,
            peer_address=peer.address,
            cidr_match_mode=cidr_match_mode,
        )
        assert allowed == decision.allowed, (name, peer, explain(decision))
        if allowed and (own_prefixes or name not in own):
            found.add(name)
    return found


def cnp(spec: str, name: str = "c", namespace: str = "prod") -> str:
    return (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec:\n  endpointSelector: {{matchLabels: {{app: web}}}}\n{spec}\n---\n"
    )


def k8s(spec: str, name: str = "k", namespace: str = "prod") -> str:
    return (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  policyTypes: [Egress]\n{spec}\n"
        "---\n"
    )


def pods(*names: str, dual_stack: bool) -> set[str]:
    """Each pod as a peer, without and with its addresses (of the node's families)."""
    found = set()
    for pod in PODS:
        key = f"{pod.namespace}/{pod.name}"
        if key in names:
            found.add(key)
            found |= {f"{key}@{a}" for a in pod.addresses if dual_stack or ":" not in a}
    return found


def host(dual_stack: bool) -> set[str]:
    """The node as a peer, without and with its addresses."""
    return {"host", "host@198.19.0.1"} | ({"host@2001:db8::1"} if dual_stack else set())


def reserved(dual_stack: bool) -> set[str]:
    return set(RESERVED) | host(dual_stack)


def world(dual_stack: bool, family: int | None = None) -> set[str]:
    v4 = {"world4", *PREFIXES_V4}
    v6 = {"world6", *PREFIXES_V6} if dual_stack else set()
    return {4: v4, 6: v6, None: v4 | v6}[family]


ALL_PODS = ("prod/web", "prod/fe", "dev/api")

# ---- entities ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dual_stack", [False, True], ids=["ipv4-only", "dual-stack"])
@pytest.mark.parametrize(
    ("entity", "expected"),
    [
        ("world", lambda ds: world(ds)),
        ("world-ipv4", lambda ds: world(ds, 4)),
        ("world-ipv6", lambda ds: world(ds, 6)),
        ("host", host),
        *((name, lambda ds, name=name: {name}) for name in RESERVED if name != "host"),
        ("cluster", lambda ds: reserved(ds) | pods(*ALL_PODS, dual_stack=ds)),
        ("all", lambda ds: reserved(ds) | pods(*ALL_PODS, dual_stack=ds) | world(ds)),
    ],
)
def test_every_entity_selects_its_identities(entity: str, expected, dual_stack: bool) -> None:
    for direction, field in ((Direction.EGRESS, "egress"), (Direction.INGRESS, "ingress")):
        peers = "toEntities" if field == "egress" else "fromEntities"
        text = cnp(f"  {field}: [{{{peers}: [{entity}]}}]")
        assert allowed_peers(text, dual_stack, direction=direction) == expected(dual_stack)


def test_every_cilium_entity_is_known() -> None:
    assert set(ENTITIES) == {*ENTITY_SELECTORS, "all"}


def test_entities_in_deny_rules() -> None:
    text = cnp(
        "  egress: [{toEntities: [all]}]\n"
        "  egressDeny: [{toEntities: [world-ipv6, kube-apiserver]}]"
    )
    for dual_stack in (False, True):
        everything = (
            reserved(dual_stack) | pods(*ALL_PODS, dual_stack=dual_stack) | world(dual_stack)
        )
        expected = everything - world(dual_stack, 6) - {"kube-apiserver"}
        assert allowed_peers(text, dual_stack) == expected


# ---- CIDR peers -------------------------------------------------------------------------------


@pytest.mark.parametrize("dual_stack", [False, True], ids=["ipv4-only", "dual-stack"])
def test_cilium_cidrs_select_world_only(dual_stack: bool) -> None:
    # The pods' own prefixes too: in Cilium's reading they select world addresses in them
    # (their CIDR identities), no pod.
    prefixes = ["198.18.0.0/16", "2001:db8:1::/64", "203.0.113.0/24", "2001:db8:ffff::/48"]
    text = cnp(f"  egress: [{{toCIDR: {prefixes}}}]")
    assert allowed_peers(text, dual_stack, own_prefixes=True) == set(prefixes)


@pytest.mark.parametrize("dual_stack", [False, True], ids=["ipv4-only", "dual-stack"])
def test_cilium_zero_prefixes_are_their_familys_world(dual_stack: bool) -> None:
    assert allowed_peers(cnp("  egress: [{toCIDR: [0.0.0.0/0]}]"), dual_stack) == world(
        dual_stack, 4
    )
    assert allowed_peers(cnp("  egress: [{toCIDR: ['::/0']}]"), dual_stack) == world(dual_stack, 6)
    both = cnp("  egress: [{toCIDR: [0.0.0.0/0, '::/0']}]")  # Cilium's manifests' "the world"
    assert allowed_peers(both, dual_stack) == world(dual_stack)
    text = cnp("  egress: [{toCIDRSet: [{cidr: 0.0.0.0/0, except: [203.0.113.0/24]}]}]")
    assert allowed_peers(text, dual_stack) == {"world4"}


@pytest.mark.parametrize("dual_stack", [False, True], ids=["ipv4-only", "dual-stack"])
def test_cilium_cidrs_match_pod_addresses_in_mode_all(dual_stack: bool) -> None:
    text = cnp(
        "  egress: [{toCIDRSet: [{cidr: 198.18.0.0/16, except: [198.18.0.11/32]}, "
        "{cidr: '2001:db8:1::/64', except: ['2001:db8:1::11/128']}]}]"
    )
    expected = {"prod/web@198.18.0.10", "dev/api@198.18.1.5"}
    if dual_stack:
        expected |= {"prod/web@2001:db8:1::10", "dev/api@2001:db8:1::1:5"}
    assert allowed_peers(text, dual_stack, cidr_match_mode="all") == expected
    text = cnp("  egress: [{toCIDR: [0.0.0.0/0]}]")
    expected = world(dual_stack, 4) | {f"{p}@{a}" for p, a in _v4_addresses()}
    expected.add("host@198.19.0.1")  # the node's address too
    assert allowed_peers(text, dual_stack, cidr_match_mode="all") == expected


def _v4_addresses() -> list[tuple[str, str]]:
    return [(f"{p.namespace}/{p.name}", p.addresses[0]) for p in PODS]


def test_a_deny_of_the_pod_address_wins_in_mode_all() -> None:
    text = cnp("  egress: [{toEndpoints: [{}]}]\n  egressDeny: [{toCIDR: [198.18.0.11/32]}]")
    found = allowed_peers(text, True, cidr_match_mode="all")
    assert "prod/fe@198.18.0.11" not in found  # denied by its address
    assert {"prod/fe", "prod/fe@2001:db8:1::11", "prod/web@198.18.0.10"} <= found
    assert "prod/fe@198.18.0.11" in allowed_peers(text, True)  # mode world: not a pod's


# ---- Kubernetes ipBlock ---------------------------------------------------------------------

# The three cases of the Kubernetes e2e suite, each over IPv4 and IPv6: a pod's own /32
# (or /128); a block with an except covering the pod; a pod both in an except and in another
# block of the same rule.
IP_BLOCK_CASES = {
    "pod-address": (
        "  egress: [{to: [{ipBlock: {cidr: 198.18.0.11/32}}, "
        "{ipBlock: {cidr: '2001:db8:1::11/128'}}]}]",
        {"prod/fe@198.18.0.11"},
        {"prod/fe@2001:db8:1::11"},
    ),
    "except": (
        "  egress: [{to: [{ipBlock: {cidr: 198.18.0.0/16, except: [198.18.0.11/32]}}, "
        "{ipBlock: {cidr: '2001:db8:1::/64', except: ['2001:db8:1::11/128']}}]}]",
        {"prod/web@198.18.0.10", "dev/api@198.18.1.5"},
        {"prod/web@2001:db8:1::10", "dev/api@2001:db8:1::1:5"},
    ),
    "overlap": (
        "  egress: [{to: [{ipBlock: {cidr: 198.18.0.0/24, except: [198.18.0.11/32]}}, "
        "{ipBlock: {cidr: 198.18.0.11/32}}, "
        "{ipBlock: {cidr: '2001:db8:1::/112', except: ['2001:db8:1::11/128']}}, "
        "{ipBlock: {cidr: '2001:db8:1::11/128'}}]}]",
        {"prod/web@198.18.0.10", "prod/fe@198.18.0.11"},
        {"prod/web@2001:db8:1::10", "prod/fe@2001:db8:1::11"},
    ),
}


@pytest.mark.parametrize("case", sorted(IP_BLOCK_CASES))
@pytest.mark.parametrize("dual_stack", [False, True], ids=["ipv4-only", "dual-stack"])
def test_ip_blocks_match_pods_by_address(case: str, dual_stack: bool) -> None:
    spec, v4, v6 = IP_BLOCK_CASES[case]
    expected = v4 | (v6 if dual_stack else set())
    assert allowed_peers(k8s(spec), dual_stack) == expected


@pytest.mark.parametrize("dual_stack", [False, True], ids=["ipv4-only", "dual-stack"])
def test_ip_block_zero_matches_world_and_pods_of_its_family(dual_stack: bool) -> None:
    text = k8s("  egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0, except: [198.18.1.0/24]}}]}]")
    expected = world(dual_stack, 4) | {"prod/web@198.18.0.10", "prod/fe@198.18.0.11"}
    expected.add("host@198.19.0.1")  # the node's address is in the block too
    assert allowed_peers(text, dual_stack) == expected
    text = k8s("  egress: [{to: [{ipBlock: {cidr: '::/0'}}]}]")
    expected = world(dual_stack, 6)
    if dual_stack:
        expected |= {f"{p.namespace}/{p.name}@{p.addresses[1]}" for p in PODS}
        expected.add("host@2001:db8::1")
    assert allowed_peers(text, dual_stack) == expected


def test_ip_block_still_matches_world_addresses() -> None:
    text = k8s("  egress: [{to: [{ipBlock: {cidr: 203.0.0.0/8, except: [203.0.113.128/25]}}]}]")
    assert allowed_peers(text, False) == {"203.0.113.0/24"}  # the part outside the except
    text = k8s("  egress: [{to: [{ipBlock: {cidr: 203.0.0.0/8, except: [203.0.113.0/24]}}]}]")
    assert allowed_peers(text, False) == set()


def test_endpoint_selectors_never_select_pod_addresses() -> None:
    # A selector for "whatever has no namespace" selects reserved and world identities in
    # Cilium; pod-address identities have no namespace either, but are pods.
    text = cnp(
        "  egress: [{toEndpoints: [{matchExpressions: "
        "[{key: io.kubernetes.pod.namespace, operator: DoesNotExist}]}]}]"
    ) + k8s("  egress: [{to: [{ipBlock: {cidr: 198.18.0.0/16}}]}]", name="blocks")
    found = allowed_peers(text, True)
    assert "prod/fe@198.18.0.11" in found  # by the ipBlock
    only_cnp = allowed_peers(
        cnp(
            "  egress: [{toEndpoints: [{matchExpressions: "
            "[{key: io.kubernetes.pod.namespace, operator: DoesNotExist}]}]}]\n"
            "  egressDeny: [{toEndpoints: [{matchExpressions: "
            "[{key: io.kubernetes.pod.namespace, operator: DoesNotExist}, "
            "{key: reserved:host, operator: DoesNotExist}]}]}]"
        )
        + k8s("  egress: [{to: [{ipBlock: {cidr: 198.18.0.0/16}}]}]", name="blocks"),
        True,
    )
    assert "prod/fe@198.18.0.11" in only_cnp  # the deny's selector does not reach it
    assert "host" in only_cnp and "world4" not in only_cnp


def test_address_prefixes() -> None:
    policies = parse_documents(
        k8s("  egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0, except: ['10.0.0.0/8']}}]}]")
        + cnp("  egress: [{toCIDRSet: [{cidr: '2001:db8::/32', except: ['2001:db8:1::/48']}]}]")
    )
    assert {str(p) for p in address_prefixes(policies)} == {"0.0.0.0/0", "10.0.0.0/8"}
    assert {str(p) for p in address_prefixes(policies, "all")} == {
        "0.0.0.0/0",
        "10.0.0.0/8",
        "2001:db8::/32",
        "2001:db8:1::/48",
    }
    assert {str(p) for p in policies[1].prefixes()} == {"2001:db8::/32", "2001:db8:1::/48"}
    with pytest.raises(ValueError, match="cidr_match_mode"):
        address_prefixes(policies, "pods")


# ---- ICMPv6 -----------------------------------------------------------------------------------


def test_icmp_families() -> None:
    text = cnp(
        "  egress: [{toEntities: [world], icmps: [{fields: [{type: EchoRequest}, "
        "{type: EchoRequest, family: IPv6}, {type: 135, family: IPv6}]}]}]"
    )
    assert allowed_peers(text, True, proto=ICMP, port=8) == world(True)
    assert allowed_peers(text, True, proto=ICMPV6, port=128) == world(True)
    assert allowed_peers(text, True, proto=ICMPV6, port=135) == world(True)
    assert allowed_peers(text, True, proto=ICMP, port=128) == set()
    assert allowed_peers(text, True, proto=ICMPV6, port=8) == set()


def test_allow_localhost_applies_to_every_family() -> None:
    text = cnp("  ingress: [{fromEntities: [world-ipv6]}]")
    node, _, compiled = node_for(text, True, allow_localhost=AllowLocalhost.ALWAYS)
    web = node.pods["prod/web"]
    verdict = datapath_verdict(compiled[web.ep_id], Direction.INGRESS, node.peers["host"], TCP, 1)
    assert verdict[0]


# ---- ignored peer fields ----------------------------------------------------------------------


@pytest.mark.parametrize("dual_stack", [False, True], ids=["ipv4-only", "dual-stack"])
def test_ignored_peer_fields_select_nothing_and_keep_ports_closed(dual_stack: bool) -> None:
    # toFQDNs with ports: not "every peer on 443", as ports alone would be.
    text = cnp(
        "  egress: [{toFQDNs: [{matchName: example.com}], "
        "toPorts: [{ports: [{port: '443', protocol: TCP}]}]}]"
    )
    assert allowed_peers(text, dual_stack, port=443) == set()
    # Beside a peer Membrane resolves, that peer still works.
    text = cnp(
        "  egress: [{toServices: [{k8sService: {serviceName: a}}], toEntities: [host]}, "
        "{toCIDRSet: [{cidrGroupRef: partners}, {cidr: 203.0.113.0/24}]}]"
    )
    assert allowed_peers(text, dual_stack) == host(dual_stack) | {"203.0.113.0/24"}


@pytest.mark.parametrize("dual_stack", [False, True], ids=["ipv4-only", "dual-stack"])
def test_ip_blocks_match_the_node_by_address(dual_stack: bool) -> None:
    text = k8s("  egress: [{to: [{ipBlock: {cidr: 198.19.0.0/16}}, {ipBlock: {cidr: '::/0'}}]}]")
    expected = {"host@198.19.0.1"}
    if dual_stack:
        expected |= {"host@2001:db8::1"} | {
            f"{p.namespace}/{p.name}@{p.addresses[1]}" for p in PODS
        }
        expected |= world(True, 6)
    assert allowed_peers(text, dual_stack) == expected
