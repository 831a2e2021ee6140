"""Conntrack of endpoint.bpf.o: new connections are tracked after an allow verdict,
replies pass whatever the reverse policy says, established traffic skips the policy until
the endpoint's policy_rev moves, and TCP state sets the timeouts. Also the Python side's
listing, expiry and flush."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from endpoint_harness import (
    EP_ID,
    EP_IP,
    EndpointDatapath,
    allow,
    assert_dropped,
    assert_passed,
)
from packets import icmp_message, packet, tcp_segment

from membrane.datapath import (
    CtFlag,
    Direction,
    DropReason,
    entries,
    flush_endpoint,
    gc_expired,
)
from membrane.datapath.conntrack import ktime_now_ns

pytestmark = pytest.mark.root

PEER = "198.18.0.20"
PEER_ID = 1001
EGRESS, INGRESS = Direction.EGRESS, Direction.INGRESS
SEC = 1_000_000_000
TICK = 20_000_000  # conntrack's coarse clock may lag the monotonic one by a tick


@pytest.fixture
def dp() -> Iterator[EndpointDatapath]:
    with EndpointDatapath.temporary() as datapath:
        datapath.set_ipcache({f"{PEER}/32": PEER_ID})
        # egress to the peer's port 80 only; ingress denied by default
        datapath.set_policy([allow(EGRESS, PEER_ID, port=80, rule_id=4)], ingress=True, egress=True)
        yield datapath


def out_(flags: str, sport: int = 40000) -> object:
    return tcp_segment(EP_IP, PEER, sport, 80, flags)


def back(flags: str, sport: int = 40000) -> object:
    return tcp_segment(PEER, EP_IP, 80, sport, flags)


def test_new_connection_creates_an_entry(dp: EndpointDatapath) -> None:
    before = ktime_now_ns()
    assert_passed(dp.egress(out_("S")), new_flow=True)
    (e,) = dp.ct()
    assert (str(e.src), str(e.dst), e.sport, e.dport, e.proto) == (EP_IP, PEER, 40000, 80, 6)
    assert (e.ep_id, e.direction) == (EP_ID, Direction.EGRESS)
    assert (e.rule_id, e.peer_identity, e.policy_rev) == (4, PEER_ID, dp.state().policy_rev)
    assert (e.tcp_flags_orig, e.tcp_flags_reply, e.flags) == (0x02, 0, CtFlag(0))
    assert (e.packets_orig, e.packets_reply) == (1, 0)
    assert before - TICK <= e.created_ns <= ktime_now_ns()
    assert e.expires_ns - e.created_ns == 60 * SEC  # SYN timeout until a reply is seen


def test_reply_passes_although_the_reverse_is_denied(dp: EndpointDatapath) -> None:
    assert_dropped(dp.ingress(back("SA", sport=40001)), DropReason.POLICY_DENIED, INGRESS)
    dp.egress(out_("S"))
    assert_passed(dp.ingress(back("SA")), new_flow=False)
    (e,) = dp.ct()
    assert e.flags == CtFlag.SEEN_REPLY
    assert (e.tcp_flags_reply, e.packets_reply) == (0x12, 1)
    assert e.expires_ns - ktime_now_ns() > 21000 * SEC  # established timeout


def test_established_traffic_skips_the_policy(dp: EndpointDatapath) -> None:
    dp.egress(out_("S"))
    dp.ingress(back("SA"))
    dp.maps.policy.clear()  # behind the writer's back: policy_rev stays
    assert_passed(dp.egress(out_("A")), new_flow=False)
    assert_passed(dp.ingress(back("A")), new_flow=False)
    assert_dropped(dp.egress(out_("S", sport=40001)), DropReason.POLICY_DENIED, EGRESS)
    (e,) = dp.ct()
    assert (e.packets_orig, e.packets_reply, e.tcp_flags_orig) == (2, 2, 0x12)


def test_policy_change_rechecks_established_connections(dp: EndpointDatapath) -> None:
    dp.egress(out_("S"))
    dp.ingress(back("SA"))
    dp.set_policy(ingress=True, egress=True)  # nothing allowed any more
    out = dp.egress(out_("A"))
    assert_dropped(out, DropReason.POLICY_DENIED, EGRESS)
    assert int(out.event["policy_rev"]) == dp.state().policy_rev
    assert_dropped(dp.egress(out_("A")), DropReason.POLICY_DENIED, EGRESS)  # every packet
    assert_passed(dp.ingress(back("A")), new_flow=False)  # replies still pass

    dp.set_policy([allow(EGRESS, PEER_ID, port=80, rule_id=8)], ingress=True, egress=True)
    assert_passed(dp.egress(out_("A")), new_flow=False)
    (e,) = dp.ct()
    assert (e.policy_rev, e.rule_id) == (dp.state().policy_rev, 8)


def test_expired_entries_are_misses(dp: EndpointDatapath) -> None:
    dp.egress(out_("S"))
    dp.set_expiry(ktime_now_ns() - SEC)
    assert_dropped(dp.ingress(back("SA")), DropReason.POLICY_DENIED, INGRESS)
    assert_passed(dp.egress(out_("S")), new_flow=True)  # a new verdict, a new entry
    (e,) = dp.ct()
    assert e.expires_ns > ktime_now_ns() and e.packets_orig == 1


def test_fin_and_rst_close_with_a_short_timeout(dp: EndpointDatapath) -> None:
    dp.egress(out_("S"))
    dp.ingress(back("SA"))
    dp.ingress(back("FA"))
    (e,) = dp.ct()
    assert e.flags == CtFlag.SEEN_REPLY | CtFlag.CLOSING
    assert abs(e.expires_ns - ktime_now_ns() - 10 * SEC) < SEC
    dp.egress(out_("R", sport=40002))  # a RST opening nothing still closes its entry
    closed = [c for c in dp.ct() if c.sport == 40002]
    assert closed[0].flags == CtFlag.CLOSING


def test_syn_on_a_closing_entry_is_a_new_connection(dp: EndpointDatapath) -> None:
    dp.egress(out_("S"))
    dp.egress(out_("F"))
    dp.maps.policy.clear()
    assert_passed(dp.egress(out_("A")), new_flow=False)
    assert_dropped(dp.egress(out_("S")), DropReason.POLICY_DENIED, EGRESS)


def test_a_syn_is_never_a_reply(dp: EndpointDatapath) -> None:
    dp.egress(out_("S"))
    assert_dropped(dp.ingress(back("S")), DropReason.POLICY_DENIED, INGRESS)
    assert_passed(dp.ingress(back("SA")), new_flow=False)


def test_expiry_is_refreshed_at_most_once_a_second(dp: EndpointDatapath) -> None:
    dp.set_policy([allow(EGRESS, PEER_ID, port=53, proto=17)], egress=True)
    udp = packet(PEER, "udp", src=EP_IP, sport=5353, dport=53)
    dp.egress(udp)
    (first,) = dp.ct()
    assert first.expires_ns - first.created_ns == 60 * SEC
    dp.egress(udp)
    (second,) = dp.ct()
    assert second.expires_ns == first.expires_ns and second.packets_orig == 2
    dp.set_expiry(ktime_now_ns() + 30 * SEC)  # as if it had aged half a minute
    dp.egress(udp)
    (third,) = dp.ct()
    assert abs(third.expires_ns - ktime_now_ns() - 60 * SEC) < SEC


def test_icmp_echo_replies_match_their_request(dp: EndpointDatapath) -> None:
    dp.set_policy([allow(EGRESS, PEER_ID, proto=1, port=8)], ingress=True, egress=True)
    assert_passed(dp.egress(icmp_message(EP_IP, PEER, type_=8, ident=77)), new_flow=True)
    (e,) = dp.ct()
    assert (e.proto, e.sport, e.dport) == (1, 0, 77)
    assert_passed(dp.ingress(icmp_message(PEER, EP_IP, type_=0, ident=77)), new_flow=False)
    reply_other_id = icmp_message(PEER, EP_IP, type_=0, ident=78)
    assert_dropped(dp.ingress(reply_other_id), DropReason.POLICY_DENIED, INGRESS)
    # the peer pinging back with the same id opens its own flow: ingress denies it
    request_back = icmp_message(PEER, EP_IP, type_=8, ident=77)
    assert_dropped(dp.ingress(request_back), DropReason.POLICY_DENIED, INGRESS)


def test_an_unsolicited_echo_reply_opens_nothing(dp: EndpointDatapath) -> None:
    """An echo reply that answers no request of ours is checked by policy like any ICMP
    message, but is not tracked: else its reversed tuple, an echo request of ours with the
    same id, would pass as a reply and skip the egress policy."""
    dp.set_policy([allow(INGRESS, PEER_ID, proto=1, port=0)], ingress=True, egress=True)
    assert_passed(dp.ingress(icmp_message(PEER, EP_IP, type_=0, ident=91)), new_flow=True)
    assert dp.ct() == []
    request = icmp_message(EP_IP, PEER, type_=8, ident=91)
    assert_dropped(dp.egress(request), DropReason.POLICY_DENIED, EGRESS)


def test_other_icmp_is_checked_every_time(dp: EndpointDatapath) -> None:
    dp.set_policy([allow(EGRESS, PEER_ID, proto=1, port=13)], egress=True)
    for _ in range(2):
        assert_passed(dp.egress(icmp_message(EP_IP, PEER, type_=13)), new_flow=True)
    assert dp.ct() == []


# ---- the Python side -------------------------------------------------------------------
def test_gc_deletes_only_expired_entries(dp: EndpointDatapath) -> None:
    for sport in (1, 2, 3):
        dp.egress(out_("S", sport=sport))
    key, value = next((k, v) for k, v in dp.ct_raw() if k.sport == 2)
    value.expires_ns = ktime_now_ns() - 1
    dp.maps.ct.update(key, value)
    assert gc_expired(dp.maps) == 1
    assert sorted(e.sport for e in dp.ct()) == [1, 3]
    assert gc_expired(dp.maps, now_ns=ktime_now_ns() + 61 * SEC) == 2
    assert dp.ct() == []


def test_listing_and_flushing_per_endpoint(dp: EndpointDatapath) -> None:
    dp.add_endpoint(9, "198.18.0.11")
    dp.set_policy(ep_id=9)
    dp.egress(out_("S"))
    dp.egress(tcp_segment("198.18.0.11", PEER, 40000, 80, "S"), ep_id=9)
    assert {e.ep_id for e in entries(dp.maps)} == {EP_ID, 9}
    assert [str(e.src) for e in entries(dp.maps, ep_id=9)] == ["198.18.0.11"]
    assert flush_endpoint(dp.maps, 9) == 1
    assert [e.ep_id for e in entries(dp.maps)] == [EP_ID]


def test_entries_of_a_moment_ago_are_live(dp: EndpointDatapath) -> None:
    dp.egress(out_("S"))
    (e,) = dp.ct()
    assert not e.expired(ktime_now_ns())
    assert e.expired(e.expires_ns + 1)
