"""endpoint.bpf.o on both families: the same policy table, conntrack, ICMP and fragment
behaviour over IPv4 and IPv6 (each case runs once per family), and what only IPv6 has:
neighbour discovery and multicast listener messages pass without policy, but a pod may
only speak for addresses of its own; an IPv4-only endpoint drops IPv6."""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from endpoint_harness import (
    EP_IP,
    EP_IP6,
    EndpointDatapath,
    allow,
    assert_dropped,
    assert_passed,
    deny,
)
from packets import (
    ether,
    first_fragment,
    icmp_error,
    icmp_message,
    icmpv6_echo,
    icmpv6_error,
    icmpv6_message,
    ipv6_headers,
    later_fragment,
    neighbour_advertisement,
    neighbour_solicitation,
    packet,
    router_solicitation,
    tcp_segment,
)
from scapy.layers.inet import TCP

from membrane.abi import Direction, DropReason, FlowEventType, FlowMatch, Identity, IpProto

pytestmark = pytest.mark.root

EGRESS, INGRESS = Direction.EGRESS, Direction.INGRESS
PEER_ID = 1001
CIDR_ID = int(Identity.FIRST_CIDR)
LINK_LOCAL = "fe80::a"


@dataclass(frozen=True)
class Family:
    """A family's addresses and numbers, so one test reads the same for both."""

    version: int
    ep: str
    peer: str
    router: str  # a world address on the path
    cidr: str  # a prefix holding `in_cidr`
    in_cidr: str
    world: int  # the ipcache's identity for unlisted addresses
    icmp: int  # protocol number
    echo_request: int
    echo_reply: int

    def echo(self, src: str, dst: str, *, reply: bool = False, ident: int = 1) -> object:
        if self.version == 6:
            return icmpv6_echo(src, dst, reply=reply, ident=ident)
        return icmp_message(src, dst, type_=0 if reply else 8, ident=ident)

    def too_big(self, src: str, dst: str, quoted: object) -> object:
        if self.version == 6:
            return icmpv6_error(src, dst, quoted)
        return icmp_error(src, dst, quoted)


V4 = Family(
    4, EP_IP, "198.18.0.20", "198.19.44.1", "198.19.8.0/24", "198.19.8.1",
    int(Identity.WORLD), int(IpProto.ICMP), 8, 0,
)  # fmt: skip
V6 = Family(
    6, EP_IP6, "2001:db8:1::20", "2001:db8:44::1", "2001:db8:9::/48", "2001:db8:9::8",
    int(Identity.WORLD_IPV6), int(IpProto.ICMPV6), 128, 129,
)  # fmt: skip
_sports = itertools.count(30000)


@pytest.fixture(params=[V4, V6], ids=["ipv4", "ipv6"])
def fam(request: pytest.FixtureRequest) -> Family:
    return request.param


@pytest.fixture
def dp() -> Iterator[EndpointDatapath]:
    with EndpointDatapath.temporary() as datapath:
        datapath.set_ipcache(
            {
                f"{V4.peer}/32": PEER_ID,
                f"{V6.peer}/128": PEER_ID,
                V4.cidr: CIDR_ID,
                V6.cidr: CIDR_ID,
            }
        )
        yield datapath


def out_to(fam: Family, dport: int, dst: str | None = None, proto: str = "tcp") -> object:
    return packet(dst or fam.peer, proto, src=fam.ep, sport=next(_sports), dport=dport)


def in_from(fam: Family, dport: int, src: str | None = None) -> object:
    return packet(fam.ep, "tcp", src=src or fam.peer, sport=next(_sports), dport=dport)


def address(raw: object, fam: Family) -> bytes:
    return raw.tobytes()[: 4 if fam.version == 4 else 16]  # type: ignore[attr-defined]


# ---- the policy table, over both families ------------------------------------------------
def test_without_policy_a_new_flow_passes_and_is_reported(dp, fam: Family) -> None:
    out = dp.egress(out_to(fam, 80))
    assert_passed(out, new_flow=True)
    ev = out.event
    assert int(ev["family"]) == fam.version
    assert int(ev["peer_identity"]) == PEER_ID
    assert int(ev["match"]) == FlowMatch.NONE


def test_allow_deny_and_default_deny(dp, fam: Family) -> None:
    dp.set_policy(
        [
            allow(EGRESS, PEER_ID, port=80, rule_id=21),
            allow(EGRESS, int(Identity.ANY), port=23, rule_id=22),
            deny(EGRESS, PEER_ID, port=23, rule_id=23),
        ],
        egress=True,
    )
    out = dp.egress(out_to(fam, 80))
    assert_passed(out, new_flow=True)
    assert int(out.event["rule_id"]) == 21
    out = dp.egress(out_to(fam, 23))
    assert_dropped(out, DropReason.POLICY_DENY, EGRESS)
    assert int(out.event["rule_id"]) == 23
    out = dp.egress(out_to(fam, 81))
    assert_dropped(out, DropReason.POLICY_DENIED, EGRESS)
    assert int(out.event["match"]) == FlowMatch.DEFAULT
    assert_passed(dp.egress(out_to(fam, 23, dst=fam.router)), new_flow=True)  # any peer


def test_ingress_is_judged_by_the_source(dp, fam: Family) -> None:
    dp.set_policy([allow(INGRESS, PEER_ID, port=8080)], ingress=True)
    assert_passed(dp.ingress(in_from(fam, 8080)), new_flow=True)
    out = dp.ingress(in_from(fam, 8080, src=fam.router))
    assert_dropped(out, DropReason.POLICY_DENIED, INGRESS)
    assert int(out.event["peer_identity"]) == fam.world


def test_peer_identity_is_the_longest_prefix(dp, fam: Family) -> None:
    dp.set_policy([allow(EGRESS, CIDR_ID, port=443)], egress=True)
    out = dp.egress(out_to(fam, 443, dst=fam.in_cidr))
    assert_passed(out, new_flow=True)
    assert int(out.event["peer_identity"]) == CIDR_ID
    assert address(out.event["daddr"], fam) == ipaddress.ip_address(fam.in_cidr).packed


def test_the_entries_of_an_address_identity_apply_beside_the_peers(dp, fam: Family) -> None:
    """A pod address with an identity of its own (an ipBlock holds it): an allow for either
    identity allows, a deny for either wins; a peer without one is judged by its own."""
    twin = "198.18.0.21" if fam.version == 4 else "2001:db8:1::21"
    host = 32 if fam.version == 4 else 128
    address_id = PEER_ID + 500
    dp.set_ipcache({f"{fam.peer}/{host}": (PEER_ID, address_id), f"{twin}/{host}": PEER_ID})
    dp.set_policy([allow(EGRESS, address_id, port=80, rule_id=31)], egress=True)
    out = dp.egress(out_to(fam, 80))
    assert_passed(out, new_flow=True)
    assert (int(out.event["peer_identity"]), int(out.event["rule_id"])) == (PEER_ID, 31)
    assert_dropped(dp.egress(out_to(fam, 80, dst=twin)), DropReason.POLICY_DENIED, EGRESS)
    dp.set_policy(
        [allow(EGRESS, PEER_ID, port=80), deny(EGRESS, address_id, port=80, rule_id=32)],
        egress=True,
    )
    out = dp.egress(out_to(fam, 80))
    assert_dropped(out, DropReason.POLICY_DENY, EGRESS)
    assert int(out.event["rule_id"]) == 32
    assert_passed(dp.egress(out_to(fam, 80, dst=twin)), new_flow=True)


def test_replies_pass_through_conntrack(dp, fam: Family) -> None:
    dp.set_policy([allow(EGRESS, PEER_ID, port=80)], ingress=True, egress=True)
    sport = next(_sports)
    assert_passed(dp.egress(tcp_segment(fam.ep, fam.peer, sport, 80, "S")), new_flow=True)
    assert_passed(dp.ingress(tcp_segment(fam.peer, fam.ep, 80, sport, "SA")), new_flow=False)
    assert_passed(dp.egress(tcp_segment(fam.ep, fam.peer, sport, 80, "A")), new_flow=False)
    # the reply direction opens nothing by itself
    out = dp.ingress(tcp_segment(fam.peer, fam.ep, 80, sport + 1, "SA"))
    assert_dropped(out, DropReason.POLICY_DENIED, INGRESS)
    (entry,) = [k for k, _ in dp.ct_raw(fam.version)]
    assert (int(entry.sport), int(entry.dport), int(entry.proto)) == (sport, 80, 6)
    assert dp.ct_raw(10 - fam.version) == []  # the other family's table is untouched


def test_a_spoofed_source_is_dropped(dp, fam: Family) -> None:
    spoofed = "198.18.0.99" if fam.version == 4 else "2001:db8:1::99"
    out = dp.egress(packet(fam.peer, "tcp", src=spoofed, dport=80))
    assert_dropped(out, DropReason.INVALID_SOURCE_IP, EGRESS)
    assert int(out.event["family"]) == fam.version


def test_echo_is_tracked_by_its_id(dp, fam: Family) -> None:
    dp.set_policy([allow(EGRESS, PEER_ID, proto=fam.icmp, port=fam.echo_request)], ingress=True)
    # an unsolicited reply is judged by policy (denied here) and opens nothing
    out = dp.ingress(fam.echo(fam.peer, fam.ep, reply=True, ident=7))
    assert_dropped(out, DropReason.POLICY_DENIED, INGRESS)
    out = dp.egress(fam.echo(fam.ep, fam.peer, ident=7))
    assert_passed(out, new_flow=True)
    assert (int(out.event["sport"]), int(out.event["proto"])) == (fam.echo_request, fam.icmp)
    assert_passed(dp.ingress(fam.echo(fam.peer, fam.ep, reply=True, ident=7)), new_flow=False)
    out = dp.ingress(fam.echo(fam.peer, fam.ep, reply=True, ident=8))
    assert_dropped(out, DropReason.POLICY_DENIED, INGRESS)


def test_an_error_about_a_tracked_connection_is_related(dp, fam: Family) -> None:
    dp.set_policy([allow(EGRESS, PEER_ID, port=80)], ingress=True, egress=True)
    syn = tcp_segment(fam.ep, fam.peer, next(_sports), 80, "S")
    error = fam.too_big(fam.router, fam.ep, syn)
    assert_dropped(dp.ingress(error), DropReason.POLICY_DENIED, INGRESS)  # nothing tracked
    assert_passed(dp.egress(syn), new_flow=True)
    out = dp.ingress(error)
    assert_passed(out, new_flow=True)
    assert int(out.event["h"]["type"]) == FlowEventType.POLICY_VERDICT
    assert int(out.event["match"]) == FlowMatch.RELATED
    assert int(out.event["peer_identity"]) == fam.world


def test_later_fragments_follow_their_first(dp, fam: Family) -> None:
    dp.set_policy([allow(INGRESS, PEER_ID, proto=17, port=53)], ingress=True)
    later = later_fragment(fam.ep, "udp", src=fam.peer)
    assert_dropped(dp.ingress(later), DropReason.FRAG_NOT_FOUND, INGRESS)
    first = first_fragment(fam.ep, "udp", src=fam.peer, dport=53)
    assert_passed(dp.ingress(first), new_flow=True)
    assert len(list(dp.frags(INGRESS, family=fam.version).keys())) == 1
    assert_passed(dp.ingress(later), new_flow=False)
    denied = first_fragment(fam.ep, "udp", src=fam.peer, dport=54)
    assert_dropped(dp.ingress(denied), DropReason.POLICY_DENIED, INGRESS)


# ---- IPv6 only ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(neighbour_solicitation(LINK_LOCAL, "2001:db8:1::1"), id="ns-link-local"),
        pytest.param(neighbour_solicitation("::", EP_IP6), id="ns-dad"),
        pytest.param(neighbour_solicitation(EP_IP6, "2001:db8:1::1"), id="ns-own-address"),
        pytest.param(neighbour_advertisement(EP_IP6, "fe80::1", EP_IP6), id="na-own-target"),
        pytest.param(neighbour_advertisement(LINK_LOCAL, "fe80::1", LINK_LOCAL), id="na-ll"),
        pytest.param(router_solicitation(LINK_LOCAL), id="rs"),
        pytest.param(icmpv6_message(LINK_LOCAL, "ff02::16", type_=143), id="mld2-report"),
    ],
)
def test_neighbour_discovery_from_the_pod_passes_under_default_deny(dp, frame) -> None:
    dp.set_policy(ingress=True, egress=True)
    assert_passed(dp.egress(frame), new_flow=False)


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(neighbour_solicitation("2001:db8:1::99", V6.peer), id="ns-foreign-source"),
        pytest.param(
            neighbour_advertisement(EP_IP6, "fe80::1", "2001:db8:1::20"), id="na-foreign-target"
        ),
        pytest.param(
            neighbour_advertisement(LINK_LOCAL, "fe80::1", "2001:db8:1::20"),
            id="na-ll-foreign-target",
        ),
    ],
)
def test_the_pod_cannot_speak_for_another_address(dp, frame) -> None:
    assert_dropped(dp.egress(frame), DropReason.INVALID_SOURCE_IP, EGRESS)


def test_neighbour_discovery_to_the_pod_passes_under_default_deny(dp) -> None:
    dp.set_policy(ingress=True, egress=True)
    assert_passed(dp.ingress(neighbour_solicitation(LINK_LOCAL, EP_IP6)), new_flow=False)
    na = neighbour_advertisement("2001:db8::1", EP_IP6, "2001:db8::1")
    assert_passed(dp.ingress(na), new_flow=False)


def test_other_link_local_traffic_needs_policy(dp) -> None:
    """Only neighbour discovery and MLD are the link's plumbing: an echo from the pod's
    link-local address is an ordinary packet from an address that is not the pod's."""
    out = dp.egress(icmpv6_echo(LINK_LOCAL, "fe80::1"))
    assert_dropped(out, DropReason.INVALID_SOURCE_IP, EGRESS)


def test_an_ipv4_only_endpoint_drops_ipv6(dp) -> None:
    dp.add_endpoint(9, "198.18.0.9")
    frame = ether() / ipv6_headers("2001:db8:1::9", 6) / TCP(dport=80)
    for run in (dp.ingress, dp.egress):
        out = run(frame, ep_id=9)
        assert out.verdict == "drop"
        assert out.reason == DropReason.UNSUPPORTED_L3_PROTOCOL
    out = dp.egress(neighbour_solicitation("::", "2001:db8:1::9"), ep_id=9)
    assert out.reason == DropReason.UNSUPPORTED_L3_PROTOCOL


def test_a_header_chain_too_long_to_walk_is_dropped(dp) -> None:
    """Four extension headers are walked (as Cilium walks them), a fifth is too many."""
    four = ether() / ipv6_headers(V6.peer, 6, src=EP_IP6, ext=["hop", "dest", "routing", "dest"])
    assert_passed(dp.egress(four / TCP(dport=80)), new_flow=True)
    five = ether() / ipv6_headers(V6.peer, 6, src=EP_IP6, ext=["hop"] + ["dest"] * 4)
    assert_dropped(dp.egress(five / TCP(dport=81)), DropReason.INVALID_PACKET, EGRESS)
