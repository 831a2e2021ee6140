"""filter_xdp.bpf.o (drop-dst, drop-proto) on scapy frames through BPF_PROG_TEST_RUN:
verdicts, rule and program counters, and drop events, for every header layout the parser
walks, for fragments and for frames cut short.

The rule: a filter drops a frame when a rule names something the parser could read
(its destination, or its protocol); it never drops what it could not read far enough.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest
from filter_harness import (
    FilterProgram,
    Network,
    assert_drop_event,
    assert_dropped,
    assert_passed,
    longest_match,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from packets import (
    GRE_,
    ICMPV6_,
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
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrRouting
from scapy.packet import Raw

from membrane.abi import FilterHook

pytestmark = pytest.mark.root

# drop-dst rules: a /16 with a /24 inside it, and the same shape for IPv6
DST_RULES = {
    "198.19.0.0/16": 1,
    "198.19.7.0/24": 2,
    "2001:db8:dead::/48": 3,
    "2001:db8:dead:beef::/64": 4,
}
PROTO_RULES = {UDP_: 5, ICMPV6_: 6, SCTP_: 7, GRE_: 8}

DST_IN_16, DST_IN_24 = "198.19.1.1", "198.19.7.9"
DST_IN_48, DST_IN_64 = "2001:db8:dead:1::1", "2001:db8:dead:beef::9"
DROPPED = {4: (DST_IN_24, 2), 6: (DST_IN_64, 4)}  # destination, rule id
FREE = {4: "198.18.5.5", 6: "2001:db8:1::5"}  # no rule names these
FAMILIES = [pytest.param(4, id="ipv4"), pytest.param(6, id="ipv6")]
TAGS = [pytest.param(tags, id=name) for name, tags in VLANS.items()]
LATER = [pytest.param(False, id="last"), pytest.param(True, id="middle")]


def load(**config: bool) -> FilterProgram:
    f = FilterProgram("filter_xdp", **config)
    for network, rule in DST_RULES.items():
        f.add_dst(network, rule)
    for protocol, rule in PROTO_RULES.items():
        f.add_proto(protocol, rule)
    return f


@pytest.fixture(scope="module")
def xdp() -> Iterator[FilterProgram]:
    """Both filters on, every rule installed."""
    f = load(enable_drop_dst=True, enable_drop_proto=True)
    yield f
    f.close()


@pytest.fixture(scope="module")
def xdp_dst() -> Iterator[FilterProgram]:
    """Only drop-dst compiled in (drop-proto rules sit in the map, unused)."""
    f = load(enable_drop_dst=True, enable_drop_proto=False)
    yield f
    f.close()


@pytest.fixture(scope="module")
def xdp_proto() -> Iterator[FilterProgram]:
    """Only drop-proto compiled in."""
    f = load(enable_drop_dst=False, enable_drop_proto=True)
    yield f
    f.close()


# ---- drop-dst ------------------------------------------------------------------------------
@pytest.mark.parametrize("vlans", TAGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_drop_dst_drops_named_destination(xdp: FilterProgram, family: int, vlans: tuple) -> None:
    dst, rule = DROPPED[family]
    assert_dropped(xdp.run(packet(dst, "tcp", vlans=vlans)), rule)


@pytest.mark.parametrize("vlans", TAGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_drop_dst_passes_other_destinations(xdp: FilterProgram, family: int, vlans: tuple) -> None:
    assert_passed(xdp.run(packet(FREE[family], "tcp", vlans=vlans)))


@pytest.mark.parametrize("family", FAMILIES)
def test_drop_dst_ignores_the_source(xdp: FilterProgram, family: int) -> None:
    dropped, _ = DROPPED[family]
    assert_passed(xdp.run(packet(FREE[family], "tcp", src=dropped)))


@pytest.mark.parametrize(
    ("dst", "rule"),
    [
        ("198.19.7.0", 2),
        ("198.19.7.9", 2),
        ("198.19.7.255", 2),
        ("198.19.0.0", 1),
        ("198.19.6.255", 1),
        ("198.19.8.0", 1),
        ("198.19.255.255", 1),
        ("198.18.255.255", None),
        ("198.18.7.9", None),
        ("2001:db8:dead:beef::", 4),
        ("2001:db8:dead:beef:ffff:ffff:ffff:ffff", 4),
        ("2001:db8:dead::", 3),
        ("2001:db8:dead:beee:ffff:ffff:ffff:ffff", 3),
        ("2001:db8:dead:bef0::", 3),
        ("2001:db8:dead:ffff::1", 3),
        ("2001:db8:deae::", None),
        ("2001:db8:beef::", None),
    ],
)
def test_drop_dst_longest_prefix_names_the_rule(
    xdp: FilterProgram, dst: str, rule: int | None
) -> None:
    out = xdp.run(packet(dst, "tcp"))
    if rule is None:
        assert_passed(out)
    else:
        assert_dropped(out, rule)


def test_drop_dst_inner_prefix_is_no_hole(xdp: FilterProgram) -> None:
    """Removing the /24 leaves its addresses to the /16; it never lets them through."""
    xdp.remove_dst("198.19.7.0/24")
    try:
        assert_dropped(xdp.run(packet(DST_IN_24, "tcp")), 1)
    finally:
        xdp.add_dst("198.19.7.0/24", 2)
    assert_dropped(xdp.run(packet(DST_IN_24, "tcp")), 2)


def test_group_keeps_a_neighbour_in_the_same_24(xdp: FilterProgram) -> None:
    """Two /32s share a /24 and its tbl8 group: removing one must not switch the other off."""
    xdp.add_dst("198.18.77.5/32", 40)
    xdp.add_dst("198.18.77.9/32", 41)
    try:
        xdp.remove_dst("198.18.77.5/32")
        assert_passed(xdp.run(packet("198.18.77.5", "tcp")))
        assert_dropped(xdp.run(packet("198.18.77.9", "tcp")), 41)
    finally:
        xdp.remove_dst("198.18.77.9/32")
    assert_passed(xdp.run(packet("198.18.77.9", "tcp")))


@pytest.mark.parametrize("vlans", TAGS)
def test_drop_dst_ipv4_with_options(xdp: FilterProgram, vlans: tuple) -> None:
    dropped = packet(DST_IN_24, "tcp", vlans=vlans, options=True)
    assert bytes(dropped)[l2_len(vlans)] & 0x0F > 5  # ihl
    assert_dropped(xdp.run(dropped), 2)
    assert_passed(xdp.run(packet(FREE[4], "tcp", vlans=vlans, options=True)))


@pytest.mark.parametrize(
    "ext",
    [
        ["hop"],
        ["routing"],
        ["dest"],
        ["frag"],
        ["ah"],
        ["hop", "routing", "dest", "ah", "frag", "dest"],
    ],
)
def test_drop_dst_ipv6_with_extension_headers(xdp: FilterProgram, ext: list[str]) -> None:
    assert_dropped(xdp.run(packet(DST_IN_64, "tcp", ext=ext)), 4)
    assert_passed(xdp.run(packet(FREE[6], "tcp", ext=ext)))


@pytest.mark.parametrize("vlans", TAGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_drop_dst_drops_every_fragment(xdp: FilterProgram, family: int, vlans: tuple) -> None:
    dst, rule = DROPPED[family]
    assert_dropped(xdp.run(first_fragment(dst, "tcp", vlans=vlans)), rule)
    for more in (True, False):
        assert_dropped(xdp.run(later_fragment(dst, "tcp", more=more, vlans=vlans)), rule)
    assert_passed(xdp.run(first_fragment(FREE[family], "tcp", vlans=vlans)))
    assert_passed(xdp.run(later_fragment(FREE[family], "tcp", vlans=vlans)))


# ---- drop-proto ----------------------------------------------------------------------------
@pytest.mark.parametrize("vlans", TAGS)
@pytest.mark.parametrize(
    ("family", "proto", "rule"),
    [
        (4, "udp", 5),
        (6, "udp", 5),
        (4, "sctp", 7),
        (6, "sctp", 7),
        (6, "icmpv6", 6),
        (4, "gre", 8),
        (6, "gre", 8),
    ],
)
def test_drop_proto_drops_named_protocols(
    xdp: FilterProgram, family: int, proto: str, rule: int, vlans: tuple
) -> None:
    assert_dropped(xdp.run(packet(FREE[family], proto, vlans=vlans)), rule)


@pytest.mark.parametrize(("family", "proto"), [(4, "tcp"), (6, "tcp"), (4, "icmp")])
def test_drop_proto_passes_other_protocols(xdp: FilterProgram, family: int, proto: str) -> None:
    assert_passed(xdp.run(packet(FREE[family], proto)))


def test_drop_proto_ipv4_with_options(xdp: FilterProgram) -> None:
    assert_dropped(xdp.run(packet(FREE[4], "udp", options=True)), 5)
    assert_passed(xdp.run(packet(FREE[4], "tcp", options=True)))


EXT_CHAINS = [
    ["hop"],
    ["routing"],
    ["dest"],
    ["ah"],
    ["frag"],  # atomic fragment: offset 0, no more fragments
    ["hop", "dest", "routing", "frag"],
    ["hop", "routing", "dest", "ah", "dest"],
    ["hop", "dest", "routing", "dest", "routing", "ah", "dest", "frag"],  # 8, the most walked
]


@pytest.mark.parametrize("vlans", TAGS)
@pytest.mark.parametrize("ext", EXT_CHAINS, ids=lambda ext: "-".join(ext))
def test_drop_proto_sees_past_ipv6_extension_headers(
    xdp: FilterProgram, ext: list[str], vlans: tuple
) -> None:
    assert_dropped(xdp.run(packet(FREE[6], "udp", ext=ext, vlans=vlans)), 5)
    assert_dropped(xdp.run(packet(FREE[6], "icmpv6", ext=ext, vlans=vlans)), 6)
    assert_passed(xdp.run(packet(FREE[6], "tcp", ext=ext, vlans=vlans)))


def test_drop_proto_passes_longer_extension_header_chains(
    xdp: FilterProgram, xdp_dst: FilterProgram
) -> None:
    """Nine headers are more than the parser walks: the protocol is unknown, so the frame
    passes (unparsed) unless its destination is dropped."""
    ext = ["hop", "dest", "routing", "dest", "routing", "ah", "dest", "dest", "frag"]
    assert_passed(xdp.run(packet(FREE[6], "udp", ext=ext)), unparsed=True)
    assert_dropped(xdp.run(packet(DST_IN_64, "udp", ext=ext)), 4)
    # drop-dst alone needs no protocol: nothing was left unparsed for it
    assert_passed(xdp_dst.run(packet(FREE[6], "udp", ext=ext)))


@pytest.mark.parametrize("vlans", TAGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_drop_proto_drops_every_fragment(xdp: FilterProgram, family: int, vlans: tuple) -> None:
    assert_dropped(xdp.run(first_fragment(FREE[family], "udp", vlans=vlans)), 5)
    for more in (True, False):
        assert_dropped(xdp.run(later_fragment(FREE[family], "udp", more=more, vlans=vlans)), 5)
    assert_passed(xdp.run(first_fragment(FREE[family], "tcp", vlans=vlans)))
    assert_passed(xdp.run(later_fragment(FREE[family], "tcp", vlans=vlans)))


@pytest.mark.parametrize("more", LATER)
def test_drop_proto_ipv6_fragments_behind_extension_headers(xdp: FilterProgram, more: bool) -> None:
    ext = ["hop", "routing", "dest"]
    assert_dropped(xdp.run(first_fragment(FREE[6], "udp", ext=ext)), 5)
    assert_dropped(xdp.run(later_fragment(FREE[6], "udp", ext=ext, more=more)), 5)
    assert_passed(xdp.run(later_fragment(FREE[6], "tcp", ext=ext, more=more)))


@pytest.mark.parametrize("more", LATER)
def test_later_ipv6_fragment_payload_is_not_read_as_headers(xdp: FilterProgram, more: bool) -> None:
    """A later fragment whose fragmentable part starts with an extension header (its
    fragment header's Next Header is 60, destination options) carries payload bytes, not
    that header: the protocol is unknown. Here the payload reads as 'next header 47, GRE'
    if taken for a header; GRE is dropped, this frame must not be."""
    payload = bytes([GRE_, 0]) + bytes(30)
    frame = ether() / ipv6_headers(FREE[6], 60, frag=(185, more)) / Raw(payload)
    assert_passed(xdp.run(frame), unparsed=True)
    dst, rule = DROPPED[6]  # its destination is still known
    frame = ether() / ipv6_headers(dst, 60, frag=(185, more)) / Raw(payload)
    assert_dropped(xdp.run(frame), rule)


# ---- both filters, and each alone ----------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_one_rule_counts_a_frame_both_filters_name(xdp: FilterProgram, family: int) -> None:
    """drop-dst is consulted first; only its rule counts the frame."""
    dst, rule = DROPPED[family]
    assert_dropped(xdp.run(packet(dst, "udp")), rule)


@pytest.mark.parametrize("family", FAMILIES)
def test_drop_dst_alone_ignores_proto_rules(xdp_dst: FilterProgram, family: int) -> None:
    dst, rule = DROPPED[family]
    assert_passed(xdp_dst.run(packet(FREE[family], "udp")))
    assert_dropped(xdp_dst.run(packet(dst, "udp")), rule)


@pytest.mark.parametrize("family", FAMILIES)
def test_drop_proto_alone_ignores_dst_rules(xdp_proto: FilterProgram, family: int) -> None:
    dst, _ = DROPPED[family]
    assert_passed(xdp_proto.run(packet(dst, "tcp")))
    assert_dropped(xdp_proto.run(packet(dst, "udp")), 5)


def test_neither_filter_enabled_passes_everything() -> None:
    f = load(enable_drop_dst=False, enable_drop_proto=False)
    try:
        for family in (4, 6):
            assert_passed(f.run(packet(DROPPED[family][0], "udp")))
    finally:
        f.close()


# ---- frames the parser cannot read to the end ------------------------------------------------
@pytest.mark.parametrize("cut", [14, 16, 17, 20])
def test_cut_in_vlan_tags_passes(xdp: FilterProgram, cut: int) -> None:
    """Frames shorter than an Ethernet header never reach a program (test-run refuses
    them with EINVAL, as drivers do); the L2 header can still end inside its VLAN tags."""
    frame = bytes(packet(DST_IN_24, "udp", vlans=VLANS["qinq"]))[:cut]
    assert_passed(xdp.run(frame), unparsed=True)


@pytest.mark.parametrize(
    ("family", "options", "cut"),
    [
        (4, False, 1),
        (4, False, 10),
        (4, False, 19),
        (4, True, 20),
        (4, True, 31),  # the whole fixed header, options cut short
        (6, False, 1),
        (6, False, 30),
        (6, False, 39),
    ],
)
@pytest.mark.parametrize("vlans", TAGS)
def test_cut_in_ip_header_passes(
    xdp: FilterProgram, family: int, options: bool, cut: int, vlans: tuple
) -> None:
    dst, _ = DROPPED[family]
    frame = bytes(packet(dst, "udp", vlans=vlans, options=options))[: l2_len(vlans) + cut]
    assert_passed(xdp.run(frame), unparsed=True)


@pytest.mark.parametrize("vlans", TAGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cut_in_l4_header(xdp: FilterProgram, family: int, vlans: tuple) -> None:
    """Addresses and protocol are known: a rule naming either still drops; TCP to a free
    destination passes, and nothing was unparsed for rules that need no ports."""
    dst, rule = DROPPED[family]
    frame = packet(dst, "tcp", vlans=vlans)
    assert_dropped(xdp.run(bytes(frame)[: offset_of(frame, TCP) + 2]), rule)
    frame = packet(FREE[family], "udp", vlans=vlans)
    assert_dropped(xdp.run(bytes(frame)[: offset_of(frame, UDP) + 3]), 5)
    frame = packet(FREE[family], "tcp", vlans=vlans)
    assert_passed(xdp.run(bytes(frame)[: offset_of(frame, TCP) + 2]))
    assert_passed(xdp.run(bytes(frame)[: offset_of(frame, TCP)]))


@pytest.mark.parametrize("vlans", TAGS)
def test_cut_in_ipv6_extension_headers(
    xdp: FilterProgram, xdp_dst: FilterProgram, vlans: tuple
) -> None:
    frame = packet(FREE[6], "udp", vlans=vlans, ext=["hop", "routing", "dest"])
    cut = bytes(frame)[: offset_of(frame, IPv6ExtHdrRouting) + 1]
    assert_passed(xdp.run(cut), unparsed=True)
    assert_passed(xdp_dst.run(cut))
    frame = packet(DST_IN_64, "udp", vlans=vlans, ext=["hop", "routing", "dest"])
    assert_dropped(xdp.run(bytes(frame)[: offset_of(frame, IPv6ExtHdrRouting) + 1]), 4)


@pytest.mark.parametrize("family", FAMILIES)
def test_more_vlan_tags_than_parsed_pass(xdp: FilterProgram, family: int) -> None:
    dst, _ = DROPPED[family]
    assert_passed(xdp.run(packet(dst, "udp", vlans=TOO_MANY_VLANS)), unparsed=True)


@pytest.mark.parametrize("vlans", TAGS)
def test_non_ip_frames_pass(xdp: FilterProgram, vlans: tuple) -> None:
    assert_passed(xdp.run(arp(vlans)))


def test_ip_ethertype_with_wrong_version_passes(xdp: FilterProgram) -> None:
    as_v4 = ether() / IP(src=FREE[4], dst=DST_IN_24, version=6) / UDP()
    assert_passed(xdp.run(as_v4), unparsed=True)
    as_v6 = bytearray(bytes(ether() / IPv6(src=FREE[6], dst=DST_IN_64) / UDP()))
    as_v6[14] = (4 << 4) | (as_v6[14] & 0x0F)
    assert_passed(xdp.run(bytes(as_v6)), unparsed=True)


# ---- counters and events ---------------------------------------------------------------------
def test_counters_add_exactly_what_ran(xdp: FilterProgram) -> None:
    """Repeated runs count each packet and byte (rule_stats and filter_stats)."""
    assert_dropped(xdp.run(packet(DST_IN_16, "tcp"), repeat=17), 1)
    assert_passed(xdp.run(packet(FREE[4], "tcp"), repeat=9))
    assert_passed(xdp.run(packet(DST_IN_24, "tcp", vlans=TOO_MANY_VLANS), repeat=5), unparsed=True)


@pytest.mark.parametrize(
    ("dst", "proto", "rule", "number", "ports"),
    [
        (DST_IN_24, "tcp", 2, TCP_, True),
        (DST_IN_64, "tcp", 4, TCP_, True),
        (FREE[4], "udp", 5, UDP_, True),
        (FREE[6], "sctp", 7, SCTP_, True),
        (FREE[6], "icmpv6", 6, ICMPV6_, False),
        (FREE[4], "gre", 8, GRE_, False),
    ],
)
def test_drop_emits_event(
    xdp: FilterProgram, dst: str, proto: str, rule: int, number: int, ports: bool
) -> None:
    src = "198.18.3.4" if ":" not in dst else "2001:db8:3::4"
    out = xdp.run(packet(dst, proto, src=src, sport=1234, dport=4321, vlans=VLANS["qinq"]))
    assert_dropped(out, rule)
    assert_drop_event(
        out,
        rule=rule,
        hook=FilterHook.XDP,
        src=src,
        dst=dst,
        protocol=number,
        sport=1234 if ports else 0,
        dport=4321 if ports else 0,
    )


def test_drop_event_of_later_fragment_has_no_ports(xdp: FilterProgram) -> None:
    out = xdp.run(later_fragment(DST_IN_24, "udp"))
    assert_dropped(out, 2)
    assert_drop_event(
        out, rule=2, hook=FilterHook.XDP, src="198.18.0.1", dst=DST_IN_24, protocol=UDP_
    )


def test_no_events_when_disabled() -> None:
    f = load(enable_drop_dst=True, enable_drop_proto=True, emit_events=False)
    try:
        out = f.run(packet(DST_IN_24, "udp"))
        assert out.events == []
        assert out.verdict == "drop"
        assert out.rules == {2: (1, out.length)}
    finally:
        f.close()


# ---- property: the verdict is "dst in any prefix", the rule the longest one ---------------------
V4_RANGE = ipaddress.ip_network("198.18.0.0/15")
V6_RANGE = ipaddress.ip_network("2001:db8::/32")


@st.composite
def lpm_cases(
    draw: st.DrawFn,
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, dict[Network, int]]:
    """A destination in a documentation range and up to 8 prefixes of both families, many
    of them near the destination (holding it, or differing from it in one bit)."""

    def address(net: Network) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return net[draw(st.integers(0, net.num_addresses - 1))]

    home = draw(st.sampled_from([V4_RANGE, V6_RANGE]))
    dst = address(home)
    rules: dict[Network, int] = {}
    for rule in range(1, draw(st.integers(0, 8)) + 1):
        net = draw(st.sampled_from([home, home, home, V6_RANGE if home.version == 4 else V4_RANGE]))
        bits = net.max_prefixlen
        near = draw(st.sampled_from(["same", "flip", "any"])) if net is home else "any"
        if near == "same":
            base = dst
        elif near == "flip":
            base = ipaddress.ip_address(int(dst) ^ (1 << draw(st.integers(0, bits - 1))))
        else:
            base = address(net)
        rules[ipaddress.ip_network((base, draw(st.integers(0, bits))), strict=False)] = rule
    return dst, rules


@pytest.fixture(scope="module")
def xdp_lpm() -> Iterator[FilterProgram]:
    """drop-dst alone, empty maps, no events (the property drops hundreds of frames)."""
    f = FilterProgram(
        "filter_xdp", enable_drop_dst=True, enable_drop_proto=False, emit_events=False
    )
    f.watch(*range(1, 9))
    yield f
    f.close()


@settings(max_examples=200, deadline=None)
@given(case=lpm_cases())
def test_drop_dst_matches_reference_model(xdp_lpm: FilterProgram, case: tuple) -> None:
    dst, rules = case
    tables = xdp_lpm.dst_tables()
    tables.add(rules.items())
    xdp_lpm.watch(*rules.values())
    try:
        out = xdp_lpm.run(packet(str(dst), "udp"))
    finally:
        tables.remove(rules)
    expected = longest_match(dst, rules)
    counted = (1, out.length)
    if expected is None:
        assert (out.verdict, out.rules, out.stats["passed"]) == ("pass", {}, counted)
    else:
        assert (out.verdict, out.rules, out.stats["dropped"]) == (
            "drop",
            {expected: counted},
            counted,
        )
