"""Policy verdicts of endpoint.bpf.o for new flows: entries keyed by (direction, peer
identity, protocol, port prefix), deny over allow, default deny per direction, and peer
identities from the ipcache's longest prefix. On random policies the datapath must decide
as membrane.datapath.policy_entries.lookup, the Python model of it, says."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from endpoint_harness import (
    EP_ID,
    EP_IP,
    EP_IP6,
    EndpointDatapath,
    allow,
    assert_dropped,
    assert_passed,
    deny,
    policy_entry,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packets import icmp_message, packet, tcp_segment

from membrane.abi import Direction, DropReason, FlowMatch, Identity, IpProto
from membrane.datapath.policy_entries import EndpointPolicy, PolicyEntry, lookup

pytestmark = pytest.mark.root

PEER = "198.18.0.20"
PEER_ID = 1001
OTHER = "198.18.0.21"
OTHER_ID = 1002
WORLD_IP = "198.19.200.1"  # in no ipcache prefix but 0.0.0.0/0
EGRESS, INGRESS = Direction.EGRESS, Direction.INGRESS
TCP, UDP, ICMP = IpProto.TCP, IpProto.UDP, IpProto.ICMP
GRE = 47  # a protocol without ports, unknown to the datapath's enum


@pytest.fixture
def dp() -> Iterator[EndpointDatapath]:
    with EndpointDatapath.temporary() as datapath:
        datapath.set_ipcache({f"{PEER}/32": PEER_ID, f"{OTHER}/32": OTHER_ID})
        yield datapath


_sports = itertools.count(20000)


def to_peer(dport: int, dst: str = PEER, proto: str = "tcp") -> object:
    """A new egress flow (a fresh source port each time, so never a tracked one)."""
    return packet(dst, proto, src=EP_IP, sport=next(_sports), dport=dport)


def from_peer(dport: int, src: str = PEER, proto: str = "tcp") -> object:
    return packet(EP_IP, proto, src=src, sport=next(_sports), dport=dport)


# ---- defaults ------------------------------------------------------------------------
def test_without_policy_new_flows_pass_and_are_reported(dp: EndpointDatapath) -> None:
    out = dp.egress(to_peer(80))
    assert_passed(out, new_flow=True)
    ev = out.event
    assert int(ev["match"]) == FlowMatch.NONE
    assert int(ev["peer_identity"]) == PEER_ID
    assert int(ev["rule_id"]) == 0
    assert_passed(dp.ingress(from_peer(80)), new_flow=True)


def test_default_deny_only_in_the_enforced_direction(dp: EndpointDatapath) -> None:
    dp.set_policy(egress=True)
    out = dp.egress(to_peer(80))
    assert_dropped(out, DropReason.POLICY_DENIED, EGRESS)
    assert int(out.event["match"]) == FlowMatch.DEFAULT
    assert_passed(dp.ingress(from_peer(80)), new_flow=True)

    dp.set_policy(ingress=True)
    assert_passed(dp.egress(to_peer(80)), new_flow=True)
    assert_dropped(dp.ingress(from_peer(80)), DropReason.POLICY_DENIED, INGRESS)


def test_no_endpoint_state_fails_closed(dp: EndpointDatapath) -> None:
    dp.writer.remove_endpoint(EP_ID)
    assert_dropped(dp.egress(to_peer(80)), DropReason.NO_ENDPOINT_STATE, EGRESS)
    assert_dropped(dp.ingress(from_peer(80)), DropReason.NO_ENDPOINT_STATE, INGRESS)


# ---- entries -------------------------------------------------------------------------
def test_allow_hit_and_miss(dp: EndpointDatapath) -> None:
    dp.set_policy([allow(EGRESS, PEER_ID, port=80, rule_id=11)], egress=True)
    out = dp.egress(to_peer(80))
    assert_passed(out, new_flow=True)
    assert (int(out.event["match"]), int(out.event["rule_id"])) == (FlowMatch.RULE, 11)
    assert_dropped(dp.egress(to_peer(81)), DropReason.POLICY_DENIED, EGRESS)
    assert_dropped(dp.egress(to_peer(80, proto="udp")), DropReason.POLICY_DENIED, EGRESS)
    assert_dropped(dp.egress(to_peer(80, dst=OTHER)), DropReason.POLICY_DENIED, EGRESS)
    # the entry is for egress: ingress to port 80 is not enforced, so it passes
    assert_passed(dp.ingress(from_peer(80)), new_flow=True)


def test_ingress_entries_match_the_source(dp: EndpointDatapath) -> None:
    dp.set_policy([allow(INGRESS, PEER_ID, port=8080, rule_id=3)], ingress=True)
    assert_passed(dp.ingress(from_peer(8080)), new_flow=True)
    assert_dropped(dp.ingress(from_peer(8080, src=OTHER)), DropReason.POLICY_DENIED, INGRESS)


def test_any_identity_entry_allows_every_peer(dp: EndpointDatapath) -> None:
    dp.set_policy([allow(EGRESS, Identity.ANY, port=53, proto=UDP)], egress=True)
    for dst in (PEER, OTHER, WORLD_IP):
        assert_passed(dp.egress(to_peer(53, dst=dst, proto="udp")), new_flow=True)


@pytest.mark.parametrize(
    ("allowed", "denied"),
    [
        pytest.param(PEER_ID, Identity.ANY, id="deny-any-over-allow-peer"),
        pytest.param(Identity.ANY, PEER_ID, id="deny-peer-over-allow-any"),
    ],
)
def test_deny_wins_over_allow(dp: EndpointDatapath, allowed: int, denied: int) -> None:
    dp.set_policy(
        [allow(EGRESS, allowed, port=80, rule_id=1), deny(EGRESS, denied, port=80, rule_id=2)]
    )
    out = dp.egress(to_peer(80))
    assert_dropped(out, DropReason.POLICY_DENY, EGRESS)
    assert (int(out.event["match"]), int(out.event["rule_id"])) == (FlowMatch.RULE, 2)


def test_broad_deny_for_any_beats_a_specific_allow(dp: EndpointDatapath) -> None:
    dp.set_policy(
        [
            allow(EGRESS, PEER_ID, port=443, rule_id=1),
            deny(EGRESS, Identity.ANY, proto=TCP, port=0, port_bits=0, rule_id=9),
        ]
    )
    assert_dropped(dp.egress(to_peer(443)), DropReason.POLICY_DENY, EGRESS)
    assert_passed(dp.egress(to_peer(443, proto="udp")), new_flow=True)


def test_port_range_as_prefixes(dp: EndpointDatapath) -> None:
    # 1000-1023 is 1000/13 (1000-1007) and 1008/12 (1008-1023)
    dp.set_policy(
        [
            allow(EGRESS, PEER_ID, port=1000, port_bits=13),
            allow(EGRESS, PEER_ID, port=1008, port_bits=12),
        ],
        egress=True,
    )
    for port in (1000, 1007, 1008, 1015, 1023):
        assert_passed(dp.egress(to_peer(port)), new_flow=True)
    for port in (999, 1024, 2024):
        assert_dropped(dp.egress(to_peer(port)), DropReason.POLICY_DENIED, EGRESS)


def test_protocol_wide_entries(dp: EndpointDatapath) -> None:
    dp.set_policy([allow(EGRESS, PEER_ID, proto=UDP, port_bits=0)], egress=True)
    for port in (1, 53, 65535):
        assert_passed(dp.egress(to_peer(port, proto="udp")), new_flow=True)
    assert_dropped(dp.egress(to_peer(53)), DropReason.POLICY_DENIED, EGRESS)

    dp.set_policy([allow(EGRESS, PEER_ID, proto=0, port_bits=0)], egress=True)
    for proto in ("tcp", "udp", "sctp", "icmp", "gre"):
        assert_passed(dp.egress(to_peer(7, proto=proto)), new_flow=True)


def test_icmp_type_is_the_port(dp: EndpointDatapath) -> None:
    dp.set_policy([allow(EGRESS, PEER_ID, proto=ICMP, port=8)], egress=True)
    out = dp.egress(icmp_message(EP_IP, PEER, type_=8, ident=5))
    assert_passed(out, new_flow=True)
    assert (int(out.event["sport"]), int(out.event["dport"])) == (8, 0)  # type, code
    out = dp.egress(icmp_message(EP_IP, PEER, type_=13, code=0))  # timestamp request
    assert_dropped(out, DropReason.POLICY_DENIED, EGRESS)
    assert (int(out.event["sport"]), int(out.event["proto"])) == (13, ICMP)


# ---- peer identities -----------------------------------------------------------------
def test_peer_identity_is_the_longest_prefix(dp: EndpointDatapath) -> None:
    dp.set_ipcache({"198.18.0.0/16": 300, "198.18.0.20/32": 400, "198.18.0.16/28": 500})
    dp.set_policy([allow(EGRESS, 400, port=80)], egress=True)
    assert int(dp.egress(to_peer(80, dst="198.18.0.20")).event["peer_identity"]) == 400
    cases = {"198.18.0.21": 500, "198.18.1.1": 300, WORLD_IP: int(Identity.WORLD)}
    for dst, identity in cases.items():
        out = dp.egress(to_peer(80, dst=dst))
        assert_dropped(out, DropReason.POLICY_DENIED, EGRESS)
        assert int(out.event["peer_identity"]) == identity, dst


def test_cidr_except_has_its_own_identity(dp: EndpointDatapath) -> None:
    cidr, except_ = Identity.FIRST_CIDR, Identity.FIRST_CIDR + 1
    dp.set_ipcache({"198.19.0.0/16": cidr, "198.19.7.0/24": except_})
    dp.set_policy([allow(EGRESS, cidr, port=443)], egress=True)
    assert_passed(dp.egress(to_peer(443, dst="198.19.8.1")), new_flow=True)
    out = dp.egress(to_peer(443, dst="198.19.7.1"))
    assert_dropped(out, DropReason.POLICY_DENIED, EGRESS)
    assert int(out.event["peer_identity"]) == except_


def test_world_identity_for_unknown_addresses(dp: EndpointDatapath) -> None:
    dp.set_policy([allow(INGRESS, Identity.WORLD, port=80)], ingress=True)
    assert_passed(dp.ingress(from_peer(80, src=WORLD_IP)), new_flow=True)
    assert_dropped(dp.ingress(from_peer(80)), DropReason.POLICY_DENIED, INGRESS)


# ---- against a reference model -------------------------------------------------------
IDENTITIES = [PEER_ID, PEER_ID, OTHER_ID, int(Identity.ANY), int(Identity.ANY)]
# Both families: the same policy must decide the same for a peer's IPv4 and IPv6 address.
PEER6, OTHER6, WORLD_IP6 = "2001:db8:1::20", "2001:db8:1::21", "2001:db8:200::1"
PEERS = {
    PEER: PEER_ID,
    OTHER: OTHER_ID,
    WORLD_IP: int(Identity.WORLD),
    PEER6: PEER_ID,
    OTHER6: OTHER_ID,
    WORLD_IP6: int(Identity.WORLD_IPV6),
}


def model(entries: list[PolicyEntry], enforce: bool, peer: int, proto: int, port: int) -> tuple:
    """(reason, rule_id) the datapath should report, from the lookup's (allowed, rule_id):
    a denying rule is POLICY_DENY, no rule and default deny POLICY_DENIED."""
    allowed, rule_id = lookup(EndpointPolicy(False, enforce, entries), EGRESS, peer, proto, port)
    if allowed:
        return DropReason.NONE, rule_id
    return (DropReason.POLICY_DENY if rule_id else DropReason.POLICY_DENIED), rule_id


@st.composite
def entries_strategy(draw: st.DrawFn) -> list[PolicyEntry]:
    out: dict[tuple, PolicyEntry] = {}
    for rule_id in range(1, draw(st.integers(0, 8)) + 1):
        proto = draw(st.sampled_from([0, TCP, UDP]))
        bits = 0 if proto == 0 else draw(st.sampled_from([0, 4, 12, 14, 16]))
        port = draw(st.sampled_from([0, 80, 443, 1024, 8080])) >> (16 - bits) << (16 - bits)
        entry = policy_entry(
            EGRESS,
            draw(st.sampled_from(IDENTITIES)),
            proto=proto,
            port=port if bits else 0,
            port_bits=bits,
            deny=draw(st.booleans()),
            rule_id=rule_id,
        )
        out.setdefault((entry.identity, entry.proto, entry.port, entry.port_bits), entry)
    return list(out.values())


@pytest.fixture(scope="module")
def shared_dp() -> Iterator[EndpointDatapath]:
    with EndpointDatapath.temporary() as datapath:
        datapath.set_ipcache(
            {
                f"{PEER}/32": PEER_ID,
                f"{OTHER}/32": OTHER_ID,
                f"{PEER6}/128": PEER_ID,
                f"{OTHER6}/128": OTHER_ID,
            }
        )
        yield datapath


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    entries=entries_strategy(),
    enforce=st.booleans(),
    dst=st.sampled_from(sorted(PEERS)),
    proto=st.sampled_from([TCP, UDP]),
    port=st.sampled_from([80, 81, 443, 1024, 1030, 8080, 8081, 40000]),
)
def test_verdicts_match_the_reference_model(
    shared_dp: EndpointDatapath,
    entries: list[PolicyEntry],
    enforce: bool,
    dst: str,
    proto: int,
    port: int,
) -> None:
    shared_dp.set_policy(entries, egress=enforce)
    src = EP_IP6 if ":" in dst else EP_IP
    frame = tcp_segment(src, dst, next(_sports), port, "S") if proto == TCP else None
    frame = frame or packet(dst, "udp", src=src, sport=next(_sports), dport=port)
    out = shared_dp.egress(frame)
    reason, rule_id = model(entries, enforce, PEERS[dst], proto, port)
    assert out.verdict == ("pass" if reason == DropReason.NONE else "drop")
    assert (DropReason(int(out.event["drop_reason"])), int(out.event["rule_id"])) == (
        reason,
        rule_id,
    )
