"""filter_tc.bpf.o (allow-only) on scapy frames through BPF_PROG_TEST_RUN.

Among packets to a guarded (protocol, destination port), only listed flows (source,
destination, protocol, port) pass; the rest of that traffic is dropped; everything else
passes. The first fragment decides, later fragments pass. A frame whose ports cannot be
read passes (counted as unparsed when its ports should have been there).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from filter_harness import (
    FilterProgram,
    assert_drop_event,
    assert_dropped,
    assert_passed,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from packets import (
    PROTO_NUMBERS,
    SCTP_,
    TCP_,
    TOO_MANY_VLANS,
    UDP_,
    VLANS,
    arp,
    ether,
    first_fragment,
    ipv6_headers,
    l2_len,
    later_fragment,
    offset_of,
    packet,
)
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import IPv6ExtHdrRouting
from scapy.packet import Raw

from membrane.abi import FilterHook

pytestmark = pytest.mark.root

CLIENT = {4: "198.18.1.1", 6: "2001:db8:1::1"}
SERVER = {4: "198.19.0.10", 6: "2001:db8:2::10"}
OTHER = {4: "198.18.9.9", 6: "2001:db8:9::9"}  # in no allowed flow
GUARDS = {(TCP_, 443): 10, (UDP_, 53): 11, (SCTP_, 9): 12}
FLOWS = {  # (family, protocol, port) -> rule of the flow CLIENT -> SERVER
    (4, TCP_, 443): 20,
    (6, TCP_, 443): 21,
    (4, UDP_, 53): 22,
    (6, SCTP_, 9): 23,
}
FAMILIES = [pytest.param(4, id="ipv4"), pytest.param(6, id="ipv6")]
TAGS = [pytest.param(tags, id=name) for name, tags in VLANS.items()]
EXT_CHAINS = [
    ["hop"],
    ["routing"],
    ["dest"],
    ["ah"],
    ["frag"],
    ["hop", "routing", "dest", "ah", "frag", "dest"],
]


def load(**config: object) -> FilterProgram:
    f = FilterProgram("filter_tc", **config)
    for (protocol, port), rule in GUARDS.items():
        f.add_guard(protocol, port, rule)
    for (family, protocol, port), rule in FLOWS.items():
        f.add_flow(CLIENT[family], SERVER[family], protocol, port, rule)
    return f


@pytest.fixture(scope="module")
def tc() -> Iterator[FilterProgram]:
    f = load()
    yield f
    f.close()


# ---- decisions -----------------------------------------------------------------------------
@pytest.mark.parametrize("vlans", TAGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_allowed_flow_passes_and_counts(tc: FilterProgram, family: int, vlans: tuple) -> None:
    out = tc.run(packet(SERVER[family], "tcp", src=CLIENT[family], dport=443, vlans=vlans))
    assert_passed(out, rule=FLOWS[(family, TCP_, 443)])


@pytest.mark.parametrize("vlans", TAGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_unlisted_flow_to_guarded_port_dropped(
    tc: FilterProgram, family: int, vlans: tuple
) -> None:
    other_source = packet(SERVER[family], "tcp", src=OTHER[family], dport=443, vlans=vlans)
    assert_dropped(tc.run(other_source), 10)
    other_destination = packet(OTHER[family], "tcp", src=CLIENT[family], dport=443, vlans=vlans)
    assert_dropped(tc.run(other_destination), 10)
    reversed_flow = packet(CLIENT[family], "tcp", src=SERVER[family], dport=443, vlans=vlans)
    assert_dropped(tc.run(reversed_flow), 10)


@pytest.mark.parametrize(
    ("family", "proto", "dport", "verdict", "rule"),
    [
        (4, "udp", 53, "pass", 22),
        (4, "udp", 443, "pass", None),
        (4, "tcp", 53, "pass", None),
        (6, "udp", 53, "drop", 11),  # the UDP/53 flow is listed for IPv4 only
        (6, "sctp", 9, "pass", 23),
        (4, "sctp", 9, "drop", 12),
        (6, "sctp", 10, "pass", None),
        (4, "tcp", 444, "pass", None),
        (6, "tcp", 442, "pass", None),
    ],
)
def test_guard_and_flow_are_per_family_protocol_and_port(
    tc: FilterProgram, family: int, proto: str, dport: int, verdict: str, rule: int | None
) -> None:
    out = tc.run(packet(SERVER[family], proto, src=CLIENT[family], dport=dport))
    if verdict == "drop":
        assert rule is not None
        assert_dropped(out, rule)
    else:
        assert_passed(out, rule=rule)


@pytest.mark.parametrize("sport", [1, 443, 65535])
@pytest.mark.parametrize("family", FAMILIES)
def test_source_port_does_not_matter(tc: FilterProgram, family: int, sport: int) -> None:
    allowed = packet(SERVER[family], "tcp", src=CLIENT[family], sport=sport, dport=443)
    assert_passed(tc.run(allowed), rule=FLOWS[(family, TCP_, 443)])
    denied = packet(SERVER[family], "tcp", src=OTHER[family], sport=sport, dport=443)
    assert_dropped(tc.run(denied), 10)


@pytest.mark.parametrize(("family", "proto"), [(4, "icmp"), (6, "icmpv6"), (4, "gre")])
def test_protocols_without_ports_pass(tc: FilterProgram, family: int, proto: str) -> None:
    assert_passed(tc.run(packet(SERVER[family], proto, src=OTHER[family])))


@pytest.mark.parametrize("vlans", TAGS)
def test_ipv4_with_options(tc: FilterProgram, vlans: tuple) -> None:
    allowed = packet(SERVER[4], "tcp", src=CLIENT[4], vlans=vlans, options=True)
    assert bytes(allowed)[l2_len(vlans)] & 0x0F > 5  # ihl
    assert_passed(tc.run(allowed), rule=20)
    denied = packet(SERVER[4], "tcp", src=OTHER[4], vlans=vlans, options=True)
    assert_dropped(tc.run(denied), 10)


@pytest.mark.parametrize("ext", EXT_CHAINS, ids=lambda ext: "-".join(ext))
def test_ipv6_with_extension_headers(tc: FilterProgram, ext: list[str]) -> None:
    assert_passed(tc.run(packet(SERVER[6], "tcp", src=CLIENT[6], ext=ext)), rule=21)
    assert_dropped(tc.run(packet(SERVER[6], "tcp", src=OTHER[6], ext=ext)), 10)
    assert_passed(tc.run(packet(SERVER[6], "tcp", src=OTHER[6], dport=80, ext=ext)))


# ---- fragments -----------------------------------------------------------------------------
@pytest.mark.parametrize("vlans", TAGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_first_fragment_decides(tc: FilterProgram, family: int, vlans: tuple) -> None:
    allowed = first_fragment(SERVER[family], "tcp", src=CLIENT[family], vlans=vlans)
    assert_passed(tc.run(allowed), rule=FLOWS[(family, TCP_, 443)])
    denied = first_fragment(SERVER[family], "tcp", src=OTHER[family], vlans=vlans)
    assert_dropped(tc.run(denied), 10)


LATER = [pytest.param(False, id="last"), pytest.param(True, id="middle")]


@pytest.mark.parametrize("more", LATER)
@pytest.mark.parametrize("vlans", TAGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_later_fragments_pass(tc: FilterProgram, family: int, vlans: tuple, more: bool) -> None:
    """Their payload begins with bytes that would read as ports 53 -> 443: they carry no
    L4 header, are not judged and are not 'unparsed' either."""
    for proto in ("tcp", "udp"):
        frame = later_fragment(SERVER[family], proto, src=OTHER[family], more=more, vlans=vlans)
        assert_passed(tc.run(frame))


@pytest.mark.parametrize("more", LATER)
@pytest.mark.parametrize("vlans", TAGS)
def test_later_ipv6_fragments_behind_extension_headers_pass(
    tc: FilterProgram, vlans: tuple, more: bool
) -> None:
    behind_ext = later_fragment(
        SERVER[6], "tcp", src=OTHER[6], more=more, vlans=vlans, ext=["hop", "routing", "dest"]
    )
    assert_passed(tc.run(behind_ext))
    # a fragmentable part that begins with destination options: the protocol is unknown,
    # and still nothing to judge
    headers = ether(vlans) / ipv6_headers(SERVER[6], 60, src=OTHER[6], frag=(185, more))
    assert_passed(tc.run(headers / Raw(struct.pack("!BBHH", TCP_, 0, 53, 443))))


@pytest.mark.parametrize("family", FAMILIES)
def test_first_fragment_too_short_for_ports_passes_unparsed(tc: FilterProgram, family: int) -> None:
    """(Linux discards such fragments before reassembly; the filter only counts them.)"""
    frame = first_fragment(SERVER[family], "tcp", src=OTHER[family])
    assert_passed(tc.run(bytes(frame)[: offset_of(frame, TCP) + 2]), unparsed=True)


# ---- frames the parser cannot read to the end ------------------------------------------------
@pytest.mark.parametrize("cut", [14, 16, 17, 20])
def test_cut_in_vlan_tags_passes(tc: FilterProgram, cut: int) -> None:
    """(Frames shorter than an Ethernet header are refused by test-run itself.)"""
    frame = bytes(packet(SERVER[4], "tcp", src=OTHER[4], vlans=VLANS["qinq"]))[:cut]
    assert_passed(tc.run(frame), unparsed=True)


CUTS_IN_IP_HEADER = [  # (family, IPv4 options, bytes of the IP header kept)
    (4, False, 1),
    (4, False, 10),
    (4, False, 19),
    (4, True, 20),
    (4, True, 31),
    (6, False, 1),
    (6, False, 30),
    (6, False, 39),
]


@pytest.mark.parametrize(
    ("family", "options", "cut", "vlans"),
    [
        pytest.param(family, options, cut, tags.values[0], id=f"{family}-{options}-{cut}-{tags.id}")
        for family, options, cut in CUTS_IN_IP_HEADER
        for tags in TAGS
        # Test-run refuses (EINVAL) an untagged skb shorter than the fixed IP header its
        # EtherType announces: those frames go through a device instead, in
        # test_filter_tc_device.py. Tagged ones reach the program here.
        if tags.values[0] or cut >= (20 if family == 4 else 40)
    ],
)
def test_cut_in_ip_header_passes(
    tc: FilterProgram, family: int, options: bool, cut: int, vlans: tuple
) -> None:
    frame = bytes(packet(SERVER[family], "tcp", src=OTHER[family], vlans=vlans, options=options))[
        : l2_len(vlans) + cut
    ]
    assert_passed(tc.run(frame), unparsed=True)


@pytest.mark.parametrize("vlans", TAGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cut_in_l4_header(tc: FilterProgram, family: int, vlans: tuple) -> None:
    """Without both ports the frame passes (unparsed); with them, it is judged."""
    denied = packet(SERVER[family], "tcp", src=OTHER[family], vlans=vlans)
    l4 = offset_of(denied, TCP)
    for cut in (0, 1, 2, 3):
        assert_passed(tc.run(bytes(denied)[: l4 + cut]), unparsed=True)
    assert_dropped(tc.run(bytes(denied)[: l4 + 4]), 10)
    allowed = packet(SERVER[family], "tcp", src=CLIENT[family], vlans=vlans)
    assert_passed(tc.run(bytes(allowed)[: l4 + 4]), rule=FLOWS[(family, TCP_, 443)])
    udp = packet(SERVER[family], "udp", src=OTHER[family], dport=53, vlans=vlans)
    assert_dropped(tc.run(bytes(udp)[: offset_of(udp, UDP) + 4]), 11)


def test_cut_in_ipv6_extension_headers_passes(tc: FilterProgram) -> None:
    frame = packet(SERVER[6], "tcp", src=OTHER[6], ext=["hop", "routing", "dest"])
    assert_passed(tc.run(bytes(frame)[: offset_of(frame, IPv6ExtHdrRouting) + 1]), unparsed=True)


def test_longer_extension_header_chains_pass_unparsed(tc: FilterProgram) -> None:
    eight = ["hop", "dest", "routing", "dest", "routing", "ah", "dest", "frag"]
    assert_dropped(tc.run(packet(SERVER[6], "tcp", src=OTHER[6], ext=eight)), 10)
    nine = [*eight, "dest"]
    assert_passed(tc.run(packet(SERVER[6], "tcp", src=OTHER[6], ext=nine)), unparsed=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_more_vlan_tags_than_parsed_pass(tc: FilterProgram, family: int) -> None:
    frame = packet(SERVER[family], "tcp", src=OTHER[family], vlans=TOO_MANY_VLANS)
    assert_passed(tc.run(frame), unparsed=True)


@pytest.mark.parametrize("vlans", TAGS)
def test_non_ip_frames_pass(tc: FilterProgram, vlans: tuple) -> None:
    assert_passed(tc.run(arp(vlans)))


# ---- configuration, counters, events ---------------------------------------------------------
def test_disabled_allow_only_passes_everything() -> None:
    f = load(enable_allow_only=False)
    try:
        for family in (4, 6):
            assert_passed(f.run(packet(SERVER[family], "tcp", src=OTHER[family])))
    finally:
        f.close()


def test_counters_add_exactly_what_ran(tc: FilterProgram) -> None:
    assert_dropped(tc.run(packet(SERVER[4], "tcp", src=OTHER[4]), repeat=13), 10)
    assert_passed(tc.run(packet(SERVER[6], "tcp", src=CLIENT[6]), repeat=7), rule=21)
    assert_passed(tc.run(packet(SERVER[4], "tcp", src=OTHER[4], dport=80), repeat=3))


@pytest.mark.parametrize("vlans", TAGS)
@pytest.mark.parametrize(
    ("family", "proto", "dport", "rule"),
    [
        (4, "tcp", 443, 10),
        (6, "tcp", 443, 10),
        (6, "udp", 53, 11),
        (4, "sctp", 9, 12),
    ],
)
def test_drop_emits_event(
    tc: FilterProgram, family: int, proto: str, dport: int, rule: int, vlans: tuple
) -> None:
    out = tc.run(
        packet(SERVER[family], proto, src=OTHER[family], sport=5555, dport=dport, vlans=vlans)
    )
    assert_dropped(out, rule)
    assert_drop_event(
        out,
        rule=rule,
        hook=FilterHook.TC_INGRESS,
        src=OTHER[family],
        dst=SERVER[family],
        protocol=PROTO_NUMBERS[proto],
        sport=5555,
        dport=dport,
    )


def test_egress_program_names_its_hook_and_can_be_quiet() -> None:
    f = load(hook=FilterHook.TC_EGRESS)
    quiet = load(emit_events=False)
    try:
        out = f.run(packet(SERVER[4], "tcp", src=OTHER[4], sport=5555))
        assert_dropped(out, 10)
        assert_drop_event(
            out,
            rule=10,
            hook=FilterHook.TC_EGRESS,
            src=OTHER[4],
            dst=SERVER[4],
            protocol=TCP_,
            sport=5555,
            dport=443,
        )
        out = quiet.run(packet(SERVER[4], "tcp", src=OTHER[4]))
        assert (out.verdict, out.rules, out.events) == ("drop", {10: (1, out.length)}, [])
    finally:
        f.close()
        quiet.close()


# ---- property: allow-only against a reference model --------------------------------------------
PORTS = [53, 443, 8443]
PROTOS = ["tcp", "udp", "sctp"]
HOSTS = {
    4: ["198.18.0.1", "198.18.0.2", "198.19.0.1"],
    6: ["2001:db8::1", "2001:db8::2", "2001:db8:1::1"],
}


def allow_only(
    guards: dict[tuple[int, int], int], flows: dict[tuple, int], flow: tuple[str, str, int, int]
) -> tuple[str, int | None]:
    """Reference model: (verdict, rule counted) for a packet `flow` = (src, dst, proto,
    dport)."""
    guard = guards.get(flow[2:])
    if guard is None:
        return "pass", None
    if flow in flows:
        return "pass", flows[flow]
    return "drop", guard


def flows_of(family: int) -> st.SearchStrategy[tuple[str, str, int, int]]:
    host = st.sampled_from(HOSTS[family])
    proto = st.sampled_from(PROTOS).map(PROTO_NUMBERS.__getitem__)
    return st.tuples(host, host, proto, st.sampled_from(PORTS))


FLOWS_ANY_FAMILY = st.one_of(flows_of(4), flows_of(6))


@st.composite
def allow_only_cases(draw: st.DrawFn) -> tuple[dict, dict, tuple, int]:
    """Flows (of both families) over a few hosts, protocols and ports, guards often on
    their (protocol, port), and a packet that often is one of the flows."""
    flow_keys = draw(st.lists(FLOWS_ANY_FAMILY, unique=True, max_size=6))
    flows = {key: 200 + i for i, key in enumerate(flow_keys)}
    proto = st.sampled_from(PROTOS).map(PROTO_NUMBERS.__getitem__)
    guard = st.tuples(proto, st.sampled_from(PORTS))
    if flow_keys:
        guard = st.one_of(guard, st.sampled_from([key[2:] for key in flow_keys]))
    guard_keys = draw(st.lists(guard, unique=True, min_size=1, max_size=5))
    guards = {key: 100 + i for i, key in enumerate(guard_keys)}
    packet_flow = draw(
        st.sampled_from(flow_keys) if flow_keys and draw(st.booleans()) else FLOWS_ANY_FAMILY
    )
    return guards, flows, packet_flow, draw(st.integers(1, 65535))


@pytest.fixture(scope="module")
def tc_model() -> Iterator[FilterProgram]:
    f = FilterProgram("filter_tc", emit_events=False)
    f.watch(*range(100, 105), *range(200, 206))
    yield f
    f.close()


@settings(max_examples=300, deadline=None)
@given(case=allow_only_cases())
def test_allow_only_matches_reference_model(tc_model: FilterProgram, case: tuple) -> None:
    guards, flows, (src, dst, proto, port), sport = case
    name = {v: k for k, v in PROTO_NUMBERS.items()}[proto]
    for (g_proto, g_port), rule in guards.items():
        tc_model.add_guard(g_proto, g_port, rule)
    for (f_src, f_dst, f_proto, f_port), rule in flows.items():
        tc_model.add_flow(f_src, f_dst, f_proto, f_port, rule)
    try:
        out = tc_model.run(packet(dst, name, src=src, sport=sport, dport=port))
    finally:
        tc_model.map("allow_guard").clear()
        tc_model.map("allow_flows").clear()
    verdict, rule = allow_only(guards, flows, (src, dst, proto, port))
    assert out.verdict == verdict
    assert out.rules == ({} if rule is None else {rule: (1, out.length)})
