"""The compiler: policy semantics as datapath entries. Every verdict below is asked of both
the compiled entries (`lookup`, as the datapath decides) and the reference evaluator."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network

import pytest

from membrane.abi import Direction, Identity, IpProto
from membrane.identity.labels import (
    RESERVED_LABELS,
    cidr_identity_labels,
    endpoint_labels,
)
from membrane.policy import (
    AllowLocalhost,
    CompileCache,
    EndpointInfo,
    EndpointPolicy,
    PolicyEntry,
    RuleRef,
    RuleTable,
    Universe,
    compile_policies,
    evaluate,
    explain,
    lookup,
    parse_documents,
    policy_cidrs,
)
from membrane.policy.ports import port_blocks
from membrane.policy.ruletable import allow_localhost_rule

TCP, UDP, SCTP, ICMP = IpProto.TCP, IpProto.UDP, IpProto.SCTP, IpProto.ICMP
INGRESS, EGRESS = Direction.INGRESS, Direction.EGRESS
NAMESPACES = {"prod": {"team": "a", "env": "prod"}, "dev": {"team": "b"}, "ops": {}}
PODS = {  # ns/name -> (labels, named ports)
    "prod/web": ({"app": "web"}, {"http": (8080, TCP), "dns": (5353, UDP)}),
    "prod/web-2": ({"app": "web"}, {"http": (8080, TCP), "dns": (5353, UDP)}),  # a replica
    "prod/fe": ({"app": "fe"}, {}),
    "prod/db": ({"app": "db", "tier": "data"}, {"http": (9090, TCP)}),
    "dev/fe": ({"app": "fe"}, {}),
    "dev/api": ({"app": "api"}, {}),
    "ops/mon": ({"app": "mon"}, {}),
}


@dataclass
class Scene:
    """A node with the pods above, some CIDR identities, and the policies compiled."""

    universe: Universe
    policies: list
    compiled: dict[int, EndpointPolicy]
    rules: RuleTable
    ids: dict[str, int]  # "prod/web" or a CIDR -> identity
    eps: dict[str, EndpointInfo]

    def verdict(self, ep: str, direction: int, peer: str | int, proto: int, port: int) -> bool:
        """The datapath's verdict, after checking that the reference agrees with it."""
        identity = peer if isinstance(peer, int) else self.ids[peer]
        endpoint = self.eps[ep]
        allowed, rule_id = lookup(self.compiled[endpoint.ep_id], direction, identity, proto, port)
        decision = evaluate(
            self.policies,
            self.universe,
            endpoint=endpoint,
            direction=("ingress", "egress")[direction],
            peer_identity=identity,
            proto=proto,
            port=port,
        )
        assert allowed == decision.allowed, explain(decision)
        if decision.denied_by:
            assert self.rules.get(rule_id) in decision.denied_by
        elif decision.allowed_by:
            assert self.rules.get(rule_id) in decision.allowed_by
        else:
            assert rule_id == 0
        return allowed


def scene(
    text: str,
    extra_cidrs: tuple[str, ...] = (),
    allow_localhost: AllowLocalhost = AllowLocalhost.POLICY,
) -> Scene:
    """By default here the host is a peer like any other (`--allow-localhost=policy`): most
    cases are about the entries policies make; the agent's allow for the node is tested at
    the end."""
    policies = parse_documents(text)
    prefixes = policy_cidrs(policies)
    identities = dict(RESERVED_LABELS)
    ids: dict[str, int] = {}
    eps: dict[str, EndpointInfo] = {}
    by_labels: dict[frozenset, int] = {}
    for ep_id, (key, (pod_labels, ports)) in enumerate(PODS.items(), start=1):
        ns = key.split("/")[0]
        labels = endpoint_labels(ns, pod_labels, NAMESPACES[ns])
        ident = by_labels.setdefault(labels, Identity.FIRST_ENDPOINT + len(by_labels))
        identities[ident] = labels
        ids[key] = ident
        eps[key] = EndpointInfo(ep_id, ns, key.split("/")[1], ident, labels, ports)
    cidr_ids = {}
    all_prefixes = sorted(prefixes | {IPv4Network(c) for c in extra_cidrs})
    for n, prefix in enumerate(all_prefixes):
        ident = Identity.FIRST_CIDR + n
        cidr_ids[ident] = prefix
        identities[ident] = cidr_identity_labels(prefix, prefixes)
        ids[str(prefix)] = ident
    ids.update(world=Identity.WORLD, host=Identity.HOST)
    universe = Universe(identities, {e.ep_id: e for e in eps.values()}, cidr_ids, allow_localhost)
    rules = RuleTable()
    return Scene(universe, policies, compile_policies(policies, universe, rules), rules, ids, eps)


def k8s(spec: str, namespace: str = "prod", name: str = "p") -> str:
    return (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}\n---\n"
    )


def cnp(spec: str, namespace: str = "prod", name: str = "c") -> str:
    return (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}\n---\n"
    )


def ccnp(spec: str, name: str = "cc") -> str:
    return (
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\n"
        f"metadata: {{name: {name}}}\nspec:\n{spec}\n---\n"
    )


WEB_SELECTOR = "  podSelector: {matchLabels: {app: web}}\n"
CNP_WEB = "  endpointSelector: {matchLabels: {app: web}}\n"


# ---- port ranges ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "last", "blocks"),
    [
        (80, 80, [(80, 16)]),
        (80, 83, [(80, 14)]),
        (0, 65535, [(0, 0)]),
        (1, 3, [(1, 16), (2, 15)]),
        (8000, 8100, [(8000, 10), (8064, 11), (8096, 14), (8100, 16)]),
        (65535, 65535, [(65535, 16)]),
        (32768, 65535, [(32768, 1)]),
    ],
)
def test_port_blocks(first: int, last: int, blocks: list[tuple[int, int]]) -> None:
    assert list(port_blocks(first, last)) == blocks


@pytest.mark.parametrize(("first", "last"), [(0, 0), (1, 65535), (1000, 1999), (443, 8443)])
def test_port_blocks_cover_exactly_the_range(first: int, last: int) -> None:
    covered = [
        port
        for start, bits in port_blocks(first, last)
        for port in range(start, start + (1 << (16 - bits)))
    ]
    assert covered == list(range(first, last + 1))
    assert len(port_blocks(first, last)) <= 30  # at most 2 blocks per bit


# ---- lookup on hand-made entries --------------------------------------------------------------


def policy_of(*entries: tuple, ingress: bool = True) -> EndpointPolicy:
    return EndpointPolicy(ingress, False, frozenset(PolicyEntry(*e) for e in entries))


def test_lookup_longest_prefix_within_an_identity() -> None:
    pol = policy_of((INGRESS, 300, 0, 0, 0, False, 1), (INGRESS, 300, TCP, 80, 16, True, 2))
    assert lookup(pol, INGRESS, 300, TCP, 80) == (False, 2)
    assert lookup(pol, INGRESS, 300, TCP, 81) == (True, 1)
    assert lookup(pol, INGRESS, 300, UDP, 80) == (True, 1)
    assert lookup(pol, INGRESS, 301, TCP, 80) == (False, 0)  # enforced, nothing matches


def test_lookup_deny_from_any_peer_beats_allow_of_the_identity() -> None:
    pol = policy_of(
        (INGRESS, 300, TCP, 80, 16, False, 1), (INGRESS, Identity.ANY, TCP, 0, 0, True, 2)
    )
    assert lookup(pol, INGRESS, 300, TCP, 80) == (False, 2)


def test_lookup_prefers_the_identity_allow_and_falls_back_to_default() -> None:
    pol = policy_of(
        (INGRESS, 300, TCP, 80, 16, False, 1), (INGRESS, Identity.ANY, 0, 0, 0, False, 2)
    )
    assert lookup(pol, INGRESS, 300, TCP, 80) == (True, 1)
    assert lookup(pol, INGRESS, 999, UDP, 1) == (True, 2)
    assert lookup(pol, EGRESS, 300, TCP, 80) == (True, 0)  # egress not enforced


def test_lookup_port_prefix() -> None:
    pol = policy_of((INGRESS, 300, TCP, 8000, 12, False, 1))
    assert [lookup(pol, INGRESS, 300, TCP, p)[0] for p in (7999, 8000, 8015, 8016)] == [
        False,
        True,
        True,
        False,
    ]


# ---- NetworkPolicy semantics ------------------------------------------------------------------


def test_unselected_endpoints_are_open_and_get_an_empty_policy() -> None:
    s = scene(k8s(WEB_SELECTOR + "  ingress: [{from: [{podSelector: {matchLabels: {app: fe}}}]}]"))
    assert set(s.compiled) == {e.ep_id for e in s.eps.values()}
    fe = s.compiled[s.eps["prod/fe"].ep_id]
    assert not fe.enforce_ingress and not fe.enforce_egress and not fe.entries
    assert s.verdict("prod/fe", INGRESS, "world", TCP, 1)


def test_k8s_pod_selector_peer_is_namespace_scoped() -> None:
    s = scene(k8s(WEB_SELECTOR + "  ingress: [{from: [{podSelector: {matchLabels: {app: fe}}}]}]"))
    assert s.verdict("prod/web", INGRESS, "prod/fe", TCP, 80)
    assert s.verdict("prod/web", INGRESS, "prod/fe", UDP, 53)  # no ports: every port
    assert not s.verdict("prod/web", INGRESS, "dev/fe", TCP, 80)
    assert not s.verdict("prod/web", INGRESS, "prod/db", TCP, 80)
    assert not s.verdict("prod/web", INGRESS, "world", TCP, 80)
    assert s.verdict("prod/web", EGRESS, "world", TCP, 80)  # egress not isolated
    web = s.compiled[s.eps["prod/web"].ep_id]
    assert web.enforce_ingress and not web.enforce_egress


def test_k8s_namespace_selector_alone_selects_every_pod_of_matching_namespaces() -> None:
    s = scene(
        k8s(WEB_SELECTOR + "  ingress: [{from: [{namespaceSelector: {matchLabels: {team: b}}}]}]")
    )
    assert s.verdict("prod/web", INGRESS, "dev/fe", TCP, 80)
    assert not s.verdict("prod/web", INGRESS, "prod/fe", TCP, 80)
    assert not s.verdict("prod/web", INGRESS, "host", TCP, 80)


def test_k8s_namespace_selector_by_metadata_name() -> None:
    peer = "{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ops}}}"
    s = scene(k8s(WEB_SELECTOR + f"  ingress: [{{from: [{peer}]}}]"))
    assert s.verdict("prod/web", INGRESS, "ops/mon", TCP, 80)
    assert not s.verdict("prod/web", INGRESS, "dev/fe", TCP, 80)


def test_k8s_both_selectors_in_one_peer_must_both_hold() -> None:
    peer = "{namespaceSelector: {matchLabels: {team: b}}, podSelector: {matchLabels: {app: fe}}}"
    s = scene(k8s(WEB_SELECTOR + f"  ingress: [{{from: [{peer}]}}]"))
    assert s.verdict("prod/web", INGRESS, "dev/fe", TCP, 80)
    assert not s.verdict("prod/web", INGRESS, "dev/api", TCP, 80)  # right namespace, wrong pod
    assert not s.verdict("prod/web", INGRESS, "prod/fe", TCP, 80)  # wrong namespace
    assert not s.verdict("prod/web", INGRESS, "ops/mon", TCP, 80)


def test_k8s_two_peers_are_alternatives() -> None:
    peers = (
        "[{namespaceSelector: {matchLabels: {team: b}}}, {podSelector: {matchLabels: {app: db}}}]"
    )
    s = scene(k8s(WEB_SELECTOR + f"  ingress: [{{from: {peers}}}]"))
    assert s.verdict("prod/web", INGRESS, "dev/fe", TCP, 80)
    assert s.verdict("prod/web", INGRESS, "prod/db", TCP, 80)
    assert not s.verdict("prod/web", INGRESS, "prod/fe", TCP, 80)


def test_k8s_empty_selectors() -> None:
    s = scene(k8s(WEB_SELECTOR + "  ingress: [{from: [{podSelector: {}}]}]"))
    assert s.verdict("prod/web", INGRESS, "prod/fe", TCP, 80)
    assert not s.verdict("prod/web", INGRESS, "dev/fe", TCP, 80)
    assert not s.verdict("prod/web", INGRESS, "host", TCP, 80)
    s = scene(k8s(WEB_SELECTOR + "  ingress: [{from: [{namespaceSelector: {}}]}]"))
    assert s.verdict("prod/web", INGRESS, "dev/fe", TCP, 80)
    assert s.verdict("prod/web", INGRESS, "ops/mon", TCP, 80)
    assert not s.verdict("prod/web", INGRESS, "host", TCP, 80)
    assert not s.verdict("prod/web", INGRESS, "world", TCP, 80)


def test_k8s_allow_all_and_deny_all() -> None:
    s = scene(k8s("  podSelector: {}\n  ingress: [{}]"))
    assert s.verdict("prod/web", INGRESS, "world", UDP, 9)
    assert s.verdict("prod/web", INGRESS, "dev/fe", ICMP, 8)
    s = scene(k8s("  podSelector: {}\n  policyTypes: [Ingress, Egress]"))
    assert not s.verdict("prod/web", INGRESS, "prod/fe", TCP, 80)
    assert not s.verdict("prod/web", EGRESS, "prod/fe", TCP, 80)
    assert s.verdict("dev/fe", EGRESS, "prod/web", TCP, 80)  # other namespace untouched


def test_k8s_policy_types_default_and_explicit() -> None:
    s = scene(k8s("  podSelector: {}\n  egress: [{to: [{podSelector: {}}]}]"))
    pol = s.compiled[s.eps["prod/web"].ep_id]
    assert pol.enforce_ingress and pol.enforce_egress
    assert s.verdict("prod/web", EGRESS, "prod/db", TCP, 5432)
    assert not s.verdict("prod/web", EGRESS, "world", TCP, 443)
    s = scene(k8s("  podSelector: {}\n  policyTypes: [Egress]\n  ingress: [{}]"))
    pol = s.compiled[s.eps["prod/web"].ep_id]
    assert not pol.enforce_ingress and pol.enforce_egress
    assert not any(e.direction == INGRESS for e in pol.entries)  # inert ingress rules


def test_k8s_no_from_means_every_peer_on_the_ports() -> None:
    s = scene(k8s(WEB_SELECTOR + "  ingress: [{ports: [{port: 80}, {protocol: UDP}]}]"))
    assert s.verdict("prod/web", INGRESS, "world", TCP, 80)
    assert s.verdict("prod/web", INGRESS, "host", TCP, 80)
    assert s.verdict("prod/web", INGRESS, "dev/fe", UDP, 12345)  # port absent: every port
    assert not s.verdict("prod/web", INGRESS, "world", TCP, 81)
    assert not s.verdict("prod/web", INGRESS, "world", SCTP, 80)


def test_k8s_port_range() -> None:
    s = scene(k8s(WEB_SELECTOR + "  ingress: [{ports: [{port: 8000, endPort: 8100}]}]"))
    assert [s.verdict("prod/web", INGRESS, "world", TCP, p) for p in (7999, 8000, 8100, 8101)] == [
        False,
        True,
        True,
        False,
    ]
    entries = s.compiled[s.eps["prod/web"].ep_id].entries
    assert len(entries) == len(port_blocks(8000, 8100))


def test_ip_block_selects_cidr_identities_not_pods_or_host() -> None:
    block = "{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}"
    s = scene(k8s(WEB_SELECTOR + f"  ingress: [{{from: [{block}]}}]"), extra_cidrs=("10.2.0.0/16",))
    assert s.verdict("prod/web", INGRESS, "10.0.0.0/8", TCP, 80)
    assert s.verdict("prod/web", INGRESS, "10.2.0.0/16", TCP, 80)  # more specific prefix
    assert not s.verdict("prod/web", INGRESS, "10.1.0.0/16", TCP, 80)  # except
    assert not s.verdict("prod/web", INGRESS, "world", TCP, 80)
    assert not s.verdict("prod/web", INGRESS, "prod/fe", TCP, 80)
    assert not s.verdict("prod/web", INGRESS, "host", TCP, 80)


def test_ip_block_zero_matches_world_and_cidr_identities() -> None:
    block = "{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}"
    s = scene(k8s(WEB_SELECTOR + f"  egress: [{{to: [{block}]}}]"), extra_cidrs=("1.2.3.0/24",))
    assert s.verdict("prod/web", EGRESS, "world", TCP, 443)
    assert s.verdict("prod/web", EGRESS, "1.2.3.0/24", TCP, 443)
    assert not s.verdict("prod/web", EGRESS, "10.0.0.0/8", TCP, 443)
    assert not s.verdict("prod/web", EGRESS, "prod/db", TCP, 443)


def test_named_ports_ingress_use_the_subjects_ports() -> None:
    s = scene(k8s("  podSelector: {}\n  ingress: [{ports: [{port: http}]}]"))
    assert s.verdict("prod/web", INGRESS, "world", TCP, 8080)
    assert not s.verdict("prod/web", INGRESS, "world", TCP, 9090)
    assert s.verdict("prod/db", INGRESS, "world", TCP, 9090)
    assert not s.verdict("prod/fe", INGRESS, "world", TCP, 8080)  # fe has no such port
    s = scene(k8s("  podSelector: {}\n  ingress: [{ports: [{port: dns}]}]"))
    assert not s.verdict("prod/web", INGRESS, "world", UDP, 5353)  # dns is UDP, rule is TCP


def test_named_ports_egress_use_the_peers_ports() -> None:
    s = scene(
        k8s(
            "  podSelector: {matchLabels: {app: fe}}\n"
            "  egress: [{to: [{podSelector: {}}], ports: [{port: http}]}]"
        )
    )
    assert s.verdict("prod/fe", EGRESS, "prod/web", TCP, 8080)
    assert not s.verdict("prod/fe", EGRESS, "prod/web", TCP, 9090)
    assert s.verdict("prod/fe", EGRESS, "prod/db", TCP, 9090)
    s = scene(k8s("  podSelector: {matchLabels: {app: fe}}\n  egress: [{ports: [{port: http}]}]"))
    assert s.verdict("prod/fe", EGRESS, "world", TCP, 9090)  # any peer: every endpoint's


# ---- Cilium semantics -------------------------------------------------------------------------


def test_cnp_endpoint_selector_is_namespace_scoped() -> None:
    s = scene(cnp("  endpointSelector: {matchLabels: {app: fe}}\n  ingress: [{}]"))
    assert s.compiled[s.eps["prod/fe"].ep_id].enforce_ingress
    assert not s.compiled[s.eps["dev/fe"].ep_id].enforce_ingress


def test_cnp_from_endpoints_scoping() -> None:
    s = scene(cnp(CNP_WEB + "  ingress: [{fromEndpoints: [{matchLabels: {app: fe}}]}]"))
    assert s.verdict("prod/web", INGRESS, "prod/fe", TCP, 80)
    assert not s.verdict("prod/web", INGRESS, "dev/fe", TCP, 80)
    sel = "{matchLabels: {app: fe, k8s:io.kubernetes.pod.namespace: dev}}"
    s = scene(cnp(CNP_WEB + f"  ingress: [{{fromEndpoints: [{sel}]}}]"))
    assert s.verdict("prod/web", INGRESS, "dev/fe", TCP, 80)
    assert not s.verdict("prod/web", INGRESS, "prod/fe", TCP, 80)
    sel = "{matchExpressions: [{key: io.kubernetes.pod.namespace, operator: Exists}]}"
    s = scene(cnp(CNP_WEB + f"  ingress: [{{fromEndpoints: [{sel}]}}]"))
    assert s.verdict("prod/web", INGRESS, "dev/fe", TCP, 80)
    assert s.verdict("prod/web", INGRESS, "ops/mon", TCP, 80)
    assert not s.verdict("prod/web", INGRESS, "host", TCP, 80)


def test_cnp_empty_from_endpoints_is_every_endpoint_of_the_namespace() -> None:
    s = scene(cnp(CNP_WEB + "  ingress: [{fromEndpoints: [{}]}]"))
    assert s.verdict("prod/web", INGRESS, "prod/db", TCP, 80)
    assert not s.verdict("prod/web", INGRESS, "dev/fe", TCP, 80)
    assert not s.verdict("prod/web", INGRESS, "world", TCP, 80)


def test_ccnp_selectors_are_not_scoped() -> None:
    s = scene(
        ccnp(
            "  endpointSelector: {matchLabels: {app: fe}}\n"
            "  egress: [{toEndpoints: [{matchLabels: {app: web}}]}]"
        )
    )
    assert s.verdict("dev/fe", EGRESS, "prod/web", TCP, 80)
    assert s.verdict("prod/fe", EGRESS, "prod/web", TCP, 80)
    assert not s.verdict("dev/fe", EGRESS, "prod/db", TCP, 80)


def test_cilium_empty_rule_allows_nothing_but_enforces() -> None:
    s = scene(cnp("  endpointSelector: {}\n  ingress: [{}]"))
    pol = s.compiled[s.eps["prod/web"].ep_id]
    assert pol.enforce_ingress and not pol.enforce_egress and not pol.entries
    assert not s.verdict("prod/web", INGRESS, "prod/fe", TCP, 80)
    assert s.verdict("prod/web", EGRESS, "prod/fe", TCP, 80)


def test_cilium_ports_without_peers_apply_to_every_peer() -> None:
    s = scene(cnp(CNP_WEB + "  egress: [{toPorts: [{ports: [{port: '53', protocol: UDP}]}]}]"))
    assert s.verdict("prod/web", EGRESS, "world", UDP, 53)
    assert s.verdict("prod/web", EGRESS, "dev/fe", UDP, 53)
    assert not s.verdict("prod/web", EGRESS, "world", TCP, 53)


def test_cilium_protocol_any_is_tcp_udp_sctp_not_icmp() -> None:
    s = scene(cnp(CNP_WEB + "  ingress: [{toPorts: [{ports: [{port: '7'}]}]}]"))
    assert s.verdict("prod/web", INGRESS, "world", TCP, 7)
    assert s.verdict("prod/web", INGRESS, "world", UDP, 7)
    assert s.verdict("prod/web", INGRESS, "world", SCTP, 7)
    assert not s.verdict("prod/web", INGRESS, "world", ICMP, 7)


def test_cilium_icmp() -> None:
    s = scene(
        cnp(
            CNP_WEB
            + "  ingress: [{fromEntities: [cluster], icmps: [{fields: [{type: EchoRequest}]}]}]"
        )
    )
    assert s.verdict("prod/web", INGRESS, "dev/fe", ICMP, 8)
    assert not s.verdict("prod/web", INGRESS, "dev/fe", ICMP, 0)
    assert not s.verdict("prod/web", INGRESS, "dev/fe", TCP, 8)
    assert not s.verdict("prod/web", INGRESS, "world", ICMP, 8)


@pytest.mark.parametrize(
    ("entity", "allowed", "denied"),
    [
        ("world", ["world", "10.0.0.0/8"], ["host", "prod/fe", "dev/fe"]),
        ("host", ["host"], ["world", "prod/fe", Identity.REMOTE_NODE]),
        ("remote-node", [Identity.REMOTE_NODE], ["host", "world"]),
        (
            "cluster",
            ["host", "prod/fe", "dev/fe", Identity.REMOTE_NODE, 4, 5, 3],
            ["world", "10.0.0.0/8"],
        ),
        ("all", ["host", "prod/fe", "world", "10.0.0.0/8", 12345], []),
    ],
)
def test_entities(entity: str, allowed: list, denied: list) -> None:
    s = scene(
        cnp(CNP_WEB + f"  ingress: [{{fromEntities: [{entity}]}}]"), extra_cidrs=("10.0.0.0/8",)
    )
    for peer in allowed:
        assert s.verdict("prod/web", INGRESS, peer, TCP, 80), peer
    for peer in denied:
        assert not s.verdict("prod/web", INGRESS, peer, TCP, 80), peer


def test_cidr_set_except_and_more_specific_prefixes() -> None:
    s = scene(
        cnp(
            CNP_WEB
            + "  egress:\n  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}]\n"
            + "  - toCIDR: [10.96.1.0/24]"
        ),
        extra_cidrs=("10.1.0.0/16", "10.96.2.0/24"),
    )
    assert s.verdict("prod/web", EGRESS, "10.0.0.0/8", TCP, 1)
    assert s.verdict("prod/web", EGRESS, "10.1.0.0/16", TCP, 1)
    assert not s.verdict("prod/web", EGRESS, "10.96.0.0/12", TCP, 1)
    assert not s.verdict("prod/web", EGRESS, "10.96.2.0/24", TCP, 1)
    assert s.verdict("prod/web", EGRESS, "10.96.1.0/24", TCP, 1)  # its own rule
    assert not s.verdict("prod/web", EGRESS, "world", TCP, 1)


def test_deny_wins_over_allow() -> None:
    s = scene(
        cnp(
            "  endpointSelector: {}\n"
            "  ingress: [{fromEntities: [all]}]\n"
            "  ingressDeny: [{fromEntities: [world], "
            "toPorts: [{ports: [{port: '22', protocol: TCP}]}]}]"
        )
    )
    assert not s.verdict("prod/web", INGRESS, "world", TCP, 22)
    assert s.verdict("prod/web", INGRESS, "world", TCP, 23)
    assert s.verdict("prod/web", INGRESS, "prod/fe", TCP, 22)


def test_deny_from_one_policy_beats_allow_from_another() -> None:
    text = k8s(
        WEB_SELECTOR
        + "  ingress: [{from: [{podSelector: {matchLabels: {app: fe}}}], ports: [{port: 80}]}]"
    )
    text += cnp(
        "  endpointSelector: {}\n  ingressDeny: [{fromEndpoints: [{matchLabels: {app: fe}}]}]",
        name="d",
    )
    s = scene(text)
    assert not s.verdict("prod/web", INGRESS, "prod/fe", TCP, 80)
    web = s.compiled[s.eps["prod/web"].ep_id]
    # The allow lies inside the broader deny of the same identity: only the deny remains.
    fe = s.ids["prod/fe"]
    assert [e.deny for e in web.entries if e.identity == fe] == [True]


def test_broad_deny_for_any_peer_beats_specific_allow() -> None:
    text = cnp(
        CNP_WEB
        + "  ingress: [{fromEndpoints: [{}], toPorts: [{ports: [{port: '80', protocol: TCP}]}]}]"
    )
    text += cnp(
        CNP_WEB + "  ingressDeny: [{toPorts: [{ports: [{port: '0', protocol: TCP}]}]}]", name="d"
    )
    s = scene(text)
    assert not s.verdict("prod/web", INGRESS, "prod/fe", TCP, 80)
    assert not s.verdict("prod/web", INGRESS, "prod/fe", UDP, 80)  # not allowed either


def test_narrow_deny_inside_broad_allow() -> None:
    text = cnp(
        CNP_WEB
        + "  ingress: [{toPorts: [{ports: [{port: '8000', endPort: 8999, protocol: TCP}]}]}]\n"
        + "  ingressDeny: [{toPorts: [{ports: [{port: '8080', protocol: TCP}]}]}]"
    )
    s = scene(text)
    assert s.verdict("prod/web", INGRESS, "world", TCP, 8079)
    assert not s.verdict("prod/web", INGRESS, "world", TCP, 8080)
    assert s.verdict("prod/web", INGRESS, "world", TCP, 8081)


def test_allow_inside_a_deny_range_one_bit_wider() -> None:
    text = cnp(
        CNP_WEB
        + "  ingress: [{toPorts: [{ports: [{port: '80', protocol: TCP}]}]}]\n"
        + "  ingressDeny: [{toPorts: [{ports: [{port: '80', endPort: 81, protocol: TCP}]}]}]"
    )
    s = scene(text)
    assert not s.verdict("prod/web", INGRESS, "world", TCP, 80)
    assert not s.verdict("prod/web", INGRESS, "world", TCP, 81)
    (entry,) = s.compiled[s.eps["prod/web"].ep_id].entries
    assert (entry.port, entry.port_bits, entry.deny) == (80, 15, True)


def test_entries_inside_broader_allows_are_dropped() -> None:
    text = cnp(
        CNP_WEB
        + "  ingress:\n  - toPorts: [{ports: [{port: '80', protocol: TCP}]}]\n"
        + "  - toPorts: [{ports: [{port: '0', protocol: TCP}]}]\n"
        + "  - fromEntities: [world]\n"
    )
    s = scene(text)
    entries = s.compiled[s.eps["prod/web"].ep_id].entries
    assert {(e.identity, e.proto, e.port_bits) for e in entries} == {
        (Identity.ANY, TCP, 0),  # TCP/80 lies inside it
        (Identity.WORLD, 0, 0),  # world: 2 on an IPv4-only node, 9 and 10 on a dual-stack one
        (Identity.WORLD_IPV4, 0, 0),
        (Identity.WORLD_IPV6, 0, 0),
    }
    assert s.verdict("prod/web", INGRESS, "prod/fe", TCP, 80)
    assert s.verdict("prod/web", INGRESS, "world", UDP, 1)


def test_replicas_share_one_compiled_policy() -> None:
    s = scene(cnp(CNP_WEB + "  ingress: [{fromEndpoints: [{}]}]"))
    assert s.ids["prod/web"] == s.ids["prod/web-2"]
    assert s.compiled[s.eps["prod/web"].ep_id] is s.compiled[s.eps["prod/web-2"].ep_id]
    assert s.verdict("prod/web-2", INGRESS, "prod/db", TCP, 1)


def test_enable_default_deny_false() -> None:
    text = cnp(
        "  endpointSelector: {}\n  enableDefaultDeny: {ingress: false}\n"
        "  ingress: [{fromEndpoints: [{matchLabels: {app: fe}}]}]\n"
        "  ingressDeny: [{fromEntities: [world]}]"
    )
    s = scene(text)
    pol = s.compiled[s.eps["prod/web"].ep_id]
    assert not pol.enforce_ingress
    assert s.verdict("prod/web", INGRESS, "prod/fe", TCP, 80)
    assert s.verdict("prod/web", INGRESS, "prod/db", TCP, 80)  # not enforced
    assert not s.verdict("prod/web", INGRESS, "world", TCP, 80)  # deny still applies
    # Another policy that does ask for default deny makes it enforced.
    s = scene(text + cnp(CNP_WEB + "  ingress: [{}]", name="strict"))
    assert not s.verdict("prod/web", INGRESS, "prod/db", TCP, 80)
    assert s.verdict("prod/web", INGRESS, "prod/fe", TCP, 80)


def test_deny_only_policy_enforces_by_default() -> None:
    s = scene(cnp(CNP_WEB + "  egressDeny: [{toEntities: [world]}]"))
    assert s.compiled[s.eps["prod/web"].ep_id].enforce_egress
    assert not s.verdict("prod/web", EGRESS, "prod/fe", TCP, 80)


def test_specs_rules_have_their_own_refs() -> None:
    text = (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
        "metadata: {name: m, namespace: prod}\n"
        "specs:\n- endpointSelector: {}\n  ingress: [{fromEndpoints: [{matchLabels: {app: fe}}]}]\n"
        "- endpointSelector: {}\n  ingress: [{fromEndpoints: [{matchLabels: {app: db}}]}]\n"
    )
    s = scene(text)
    assert s.verdict("prod/web", INGRESS, "prod/fe", TCP, 1)
    assert s.verdict("prod/web", INGRESS, "prod/db", TCP, 1)
    described = sorted(ref.describe() for ref in map(s.rules.get, range(1, len(s.rules) + 1)))
    assert described == [
        "CiliumNetworkPolicy prod/m specs[0].ingress[0]",
        "CiliumNetworkPolicy prod/m specs[1].ingress[0]",
    ]


# ---- the rule table ---------------------------------------------------------------------------


def test_rule_ids_are_stable_and_persist() -> None:
    a = RuleRef("NetworkPolicy", "prod", "p", "ingress", False, 0)
    b = RuleRef("CiliumClusterwideNetworkPolicy", None, "x", "egress", True, 2, 1)
    table = RuleTable()
    assert table.id_for(a) == 1 and table.id_for(b) == 2 and table.id_for(a) == 1
    restored = RuleTable.from_json(table.to_json())
    assert restored.get(1) == a and restored.get(2) == b and restored.get(3) is None
    assert restored.id_for(RuleRef("NetworkPolicy", "prod", "q", "ingress", False, 0)) == 3
    assert b.describe() == "CiliumClusterwideNetworkPolicy x specs[1].egressDeny[2]"
    assert a.describe() == "NetworkPolicy prod/p ingress[0]"


def test_recompiling_keeps_rule_ids() -> None:
    text = k8s(WEB_SELECTOR + "  ingress: [{ports: [{port: 80}]}]")
    s = scene(text)
    before = {e.rule_id for e in s.compiled[s.eps["prod/web"].ep_id].entries}
    again = compile_policies(s.policies, s.universe, s.rules)
    assert {e.rule_id for e in again[s.eps["prod/web"].ep_id].entries} == before == {1}


# ---- explaining -------------------------------------------------------------------------------


def test_explain_names_the_deciding_rule() -> None:
    text = cnp(
        "  endpointSelector: {}\n  ingress: [{fromEntities: [all]}]\n"
        "  ingressDeny: [{fromEntities: [world]}]",
        name="lock",
    )
    s = scene(text)
    decision = evaluate(
        s.policies,
        s.universe,
        endpoint=s.eps["prod/web"],
        direction="ingress",
        peer_identity=Identity.WORLD,
        proto=TCP,
        port=80,
    )
    assert not decision.allowed and decision.enforced
    assert decision.deciding == RuleRef("CiliumNetworkPolicy", "prod", "lock", "ingress", True, 0)
    assert decision.selected_by == ["CiliumNetworkPolicy prod/lock"]
    lines = explain(decision)
    assert "denied by CiliumNetworkPolicy prod/lock ingressDeny[0]" in lines
    assert "allowed by CiliumNetworkPolicy prod/lock ingress[0]" in lines
    assert lines[-1].startswith("DENIED by CiliumNetworkPolicy prod/lock ingressDeny[0]")


def test_explain_default_deny_and_no_policy() -> None:
    s = scene(k8s(WEB_SELECTOR + "  ingress: []"))
    decision = evaluate(
        s.policies,
        s.universe,
        endpoint=s.eps["prod/web"],
        direction="ingress",
        peer_identity=s.ids["prod/fe"],
        proto=TCP,
        port=80,
    )
    assert explain(decision)[-1] == "DENIED: no rule allows it (default deny)"
    decision = evaluate(
        s.policies,
        s.universe,
        endpoint=s.eps["dev/fe"],
        direction="egress",
        peer_identity=Identity.WORLD,
        proto=UDP,
        port=53,
    )
    assert decision.allowed and decision.deciding is None and not decision.selected_by
    assert explain(decision)[0] == "no policy selects the endpoint"


# ---- the node: --allow-localhost ----------------------------------------------------------------

ALWAYS, POLICY = AllowLocalhost.ALWAYS, AllowLocalhost.POLICY
DENY_ALL_WEB = k8s(WEB_SELECTOR + "  policyTypes: [Ingress, Egress]")


def always(text: str) -> Scene:
    return scene(text, allow_localhost=ALWAYS)


def deciding_rule(s: Scene, ep: str, direction: int, peer: str, proto: int, port: int) -> RuleRef:
    _, rule_id = lookup(s.compiled[s.eps[ep].ep_id], direction, s.ids[peer], proto, port)
    ref = s.rules.get(rule_id)
    assert ref is not None
    return ref


def test_the_node_passes_policy_by_default() -> None:
    """Kubernetes: traffic to and from the node where a pod runs is always allowed."""
    assert Universe({}, {}, {}).allow_localhost == ALWAYS
    s = always(DENY_ALL_WEB)
    for proto, port in ((TCP, 80), (UDP, 53), (SCTP, 9), (ICMP, 8)):
        assert s.verdict("prod/web", INGRESS, "host", proto, port)
        assert s.verdict("prod/web", EGRESS, "host", proto, port)
    assert not s.verdict("prod/web", INGRESS, "prod/fe", TCP, 80)  # default deny for the rest
    assert not s.verdict("prod/web", EGRESS, "world", TCP, 80)
    assert deciding_rule(s, "prod/web", INGRESS, "host", TCP, 80) == allow_localhost_rule("ingress")
    assert deciding_rule(s, "prod/web", EGRESS, "host", UDP, 53) == allow_localhost_rule("egress")
    # One entry per direction in default deny: the host, every protocol and port.
    web = s.compiled[s.eps["prod/web"].ep_id].entries
    assert {(e.direction, e.identity, e.proto, e.port_bits, e.deny) for e in web} == {
        (INGRESS, Identity.HOST, 0, 0, False),
        (EGRESS, Identity.HOST, 0, 0, False),
    }


def test_the_node_is_subject_to_policy_when_asked() -> None:
    s = scene(DENY_ALL_WEB, allow_localhost=POLICY)
    assert not s.verdict("prod/web", INGRESS, "host", TCP, 80)
    assert not s.verdict("prod/web", EGRESS, "host", TCP, 80)
    assert not s.compiled[s.eps["prod/web"].ep_id].entries


def test_only_directions_in_default_deny_get_the_node_entry() -> None:
    s = always(k8s(WEB_SELECTOR + "  policyTypes: [Ingress]"))
    web = s.compiled[s.eps["prod/web"].ep_id]
    assert {e.direction for e in web.entries} == {INGRESS}
    assert not s.compiled[s.eps["prod/fe"].ep_id].entries  # selected by nothing
    assert s.verdict("prod/web", EGRESS, "host", TCP, 80)  # no policy in this direction
    assert s.verdict("prod/fe", INGRESS, "host", TCP, 80)


@pytest.mark.parametrize(
    ("deny", "denied", "allowed"),
    [
        ("[{fromEntities: [host]}]", [(TCP, 80), (UDP, 81), (ICMP, 8)], []),
        ("[{fromEntities: [all]}]", [(TCP, 80), (UDP, 81)], []),
        ("[{toPorts: [{ports: [{port: '80', protocol: TCP}]}]}]", [(TCP, 80)], [(TCP, 81)]),
        (
            "[{fromEntities: [host], toPorts: [{ports: [{port: '80'}]}]}]",
            [(TCP, 80), (UDP, 80)],
            [(TCP, 81), (ICMP, 8)],
        ),
        ("[{fromCIDR: [0.0.0.0/0]}]", [], [(TCP, 80)]),  # CIDRs never match the node
    ],
)
def test_deny_rules_still_apply_to_the_node(
    deny: str, denied: list[tuple[int, int]], allowed: list[tuple[int, int]]
) -> None:
    """As in Cilium: allow-localhost is an allow, and a deny wins over every allow."""
    s = always(cnp(CNP_WEB + "  ingress: [{}]\n  ingressDeny: " + deny))
    for proto, port in denied:
        assert not s.verdict("prod/web", INGRESS, "host", proto, port)
    for proto, port in allowed:
        assert s.verdict("prod/web", INGRESS, "host", proto, port)


def test_a_policy_allowing_the_node_adds_nothing_to_the_node_entry() -> None:
    s = always(
        cnp(CNP_WEB + "  ingress: [{fromEntities: [host], toPorts: [{ports: [{port: '80'}]}]}]")
    )
    assert s.verdict("prod/web", INGRESS, "host", TCP, 81)  # beyond what the policy allows
    host_entries = [e for e in s.compiled[s.eps["prod/web"].ep_id].entries if e.identity == 1]
    assert [(e.proto, e.port_bits, e.deny) for e in host_entries] == [(0, 0, False)]
    assert deciding_rule(s, "prod/web", INGRESS, "host", TCP, 80) == allow_localhost_rule("ingress")


def test_explain_names_allow_localhost() -> None:
    s = always(DENY_ALL_WEB)
    decision = evaluate(
        s.policies,
        s.universe,
        endpoint=s.eps["prod/web"],
        direction="ingress",
        peer_identity=Identity.HOST,
        proto=TCP,
        port=80,
    )
    assert decision.allowed and decision.enforced
    assert decision.deciding == allow_localhost_rule("ingress")
    assert explain(decision)[-1] == (
        "ALLOWED by allow-localhost ingress (agent option --allow-localhost=always)"
    )


def test_a_cache_compiling_for_the_other_mode_compiles_again() -> None:
    policy, always_ = scene(DENY_ALL_WEB, allow_localhost=POLICY), always(DENY_ALL_WEB)
    cache, web = CompileCache(), policy.eps["prod/web"].ep_id
    for universe, entries in ((always_.universe, 2), (policy.universe, 0), (always_.universe, 2)):
        compiled = compile_policies(policy.policies, universe, policy.rules, cache)
        assert len(compiled[web].entries) == entries
