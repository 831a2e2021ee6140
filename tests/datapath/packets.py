"""Scapy frames for datapath tests: VLAN tags, IPv4 options, IPv6 extension headers,
fragments and cut-short headers, always addressed inside the documentation ranges
(198.18.0.0/15, 2001:db8::/32).

Builders return scapy packets; `bytes(frame)` is what BPF_PROG_TEST_RUN receives. Every
header that names the one after it is given that name explicitly, so a chain that scapy
has no binding for (AH before a fragment header, a later fragment's raw payload) is still
encoded as the test means it.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RS,
    ICMPv6NDOptSrcLLAddr,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    PadN,
)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.layers.sctp import SCTP
from scapy.packet import Packet, Raw

MAC_SRC = "02:00:00:00:00:01"
MAC_DST = "02:00:00:00:00:02"

SRC4 = "198.18.0.1"
SRC6 = "2001:db8::1"

TCP_, UDP_, SCTP_, ICMP_, ICMPV6_, GRE_ = 6, 17, 132, 1, 58, 47
PROTO_NUMBERS = {
    "tcp": TCP_,
    "udp": UDP_,
    "sctp": SCTP_,
    "icmp": ICMP_,
    "icmpv6": ICMPV6_,
    "gre": GRE_,
}

ETH_HLEN = 14
VLAN_HLEN = 4

# Tag stacks by name: (TPID, VLAN id) from the outside in.
VLANS: dict[str, tuple[tuple[int, int], ...]] = {
    "untagged": (),
    "802.1q": ((0x8100, 10),),
    "qinq": ((0x88A8, 100), (0x8100, 10)),  # 802.1ad service tag, then 802.1Q
    "802.1q-802.1q": ((0x8100, 100), (0x8100, 10)),  # old-style double tagging
}
TOO_MANY_VLANS = ((0x88A8, 100), (0x8100, 10), (0x8100, 20))

# IPv6 extension headers by name (what `ext=` accepts).
EXT_NUMBERS = {"hop": 0, "routing": 43, "frag": 44, "ah": 51, "dest": 60}


def family_of(addr: str) -> int:
    return ipaddress.ip_address(addr).version


def ip_of(frame: Packet) -> Packet:
    return frame[IP] if IP in frame else frame[IPv6]


def l4_of(ip: Packet) -> Packet:
    return ip[TCP] if TCP in ip else ip[UDP]


def checksums_valid(ip: Packet) -> bool:
    """The IP (IPv4) and TCP/UDP checksums as written equal what scapy computes afresh."""
    fresh = type(ip)(bytes(ip))
    l4 = l4_of(fresh)
    if isinstance(fresh, IP):
        del fresh.chksum
    del l4.chksum
    rebuilt = type(ip)(bytes(fresh))
    same_ip = not isinstance(ip, IP) or rebuilt.chksum == ip.chksum
    return same_ip and l4_of(rebuilt).chksum == l4_of(ip).chksum


def ether(vlans: Sequence[tuple[int, int]] = ()) -> Packet:
    """Ethernet with `vlans` tags; the innermost EtherType is set by what follows."""
    frame: Packet = Ether(src=MAC_SRC, dst=MAC_DST)
    for tpid, vid in vlans:
        frame = frame / (Dot1AD(vlan=vid) if tpid == 0x88A8 else Dot1Q(vlan=vid))
    return frame


def l2_len(vlans: Sequence[tuple[int, int]] = ()) -> int:
    return ETH_HLEN + VLAN_HLEN * len(vlans)


def transport(proto: str, sport: int = 40000, dport: int = 443) -> Packet:
    """A full L4 header (with a little payload) for `proto`."""
    if proto == "tcp":
        return TCP(sport=sport, dport=dport) / Raw(b"x" * 8)
    if proto == "udp":
        return UDP(sport=sport, dport=dport) / Raw(b"x" * 8)
    if proto == "sctp":
        return SCTP(sport=sport, dport=dport)
    if proto == "icmp":
        return ICMP() / Raw(b"x" * 8)
    if proto == "icmpv6":
        return ICMPv6EchoRequest(data=b"x" * 8)
    if proto == "gre":
        return Raw(b"\x00\x00\x08\x00" + b"x" * 8)
    raise ValueError(f"no builder for protocol {proto!r}")


def ipv4_header(
    dst: str, proto: int, *, src: str = SRC4, options: bool = False, flags: int = 0, frag: int = 0
) -> Packet:
    """IPv4 header; `options` adds a record-route option (ihl 8); flags 1 = MF."""
    opts = [IPOption_RR(routers=["198.18.0.254", "198.18.0.253"])] if options else []
    return IP(src=src, dst=dst, proto=proto, options=opts, flags=flags, frag=frag, id=4242)


def ext_header(name: str, nh: int, *, offset: int = 0, more: bool = False) -> Packet:
    """One IPv6 extension header with Next Header `nh`, in sizes that exercise the
    length arithmetic (8, 16 and 24 bytes; AH in 4-byte units)."""
    if name == "hop":
        return IPv6ExtHdrHopByHop(nh=nh)  # 8 bytes
    if name == "dest":
        return IPv6ExtHdrDestOpt(nh=nh, options=[PadN(optdata=b"\x00" * 12)])  # 16 bytes
    if name == "routing":
        return IPv6ExtHdrRouting(nh=nh, addresses=["2001:db8::fe"])  # 24 bytes
    if name == "frag":
        return IPv6ExtHdrFragment(nh=nh, offset=offset, m=int(more), id=4242)  # 8 bytes
    if name == "ah":
        return AH(nh=nh, payloadlen=4, spi=1, seq=1, icv=b"\x00" * 12)  # 24 bytes
    raise ValueError(f"no builder for extension header {name!r}")


def ipv6_headers(
    dst: str,
    proto: int,
    *,
    src: str = SRC6,
    ext: Sequence[str] = (),
    frag: tuple[int, bool] | None = None,
) -> Packet:
    """IPv6 header and extension headers `ext`, then a fragment header (offset in 8-byte
    units, more-fragments) if `frag` is given, all chained to `proto`."""
    numbers = [EXT_NUMBERS[n] for n in [*ext, *(["frag"] if frag else [])]] + [proto]
    hdrs: Packet = IPv6(src=src, dst=dst, nh=numbers[0])
    for name, nh in zip(ext, numbers[1:], strict=False):
        hdrs = hdrs / ext_header(name, nh)
    if frag:
        offset, more = frag
        hdrs = hdrs / ext_header("frag", proto, offset=offset, more=more)
    return hdrs


def packet(
    dst: str,
    proto: str = "tcp",
    *,
    src: str | None = None,
    sport: int = 40000,
    dport: int = 443,
    vlans: Sequence[tuple[int, int]] = (),
    options: bool = False,
    ext: Sequence[str] = (),
) -> Packet:
    """A whole frame to `dst`; the family follows from the address."""
    number = PROTO_NUMBERS[proto]
    if family_of(dst) == 4:
        ip = ipv4_header(dst, number, src=src or SRC4, options=options)
    else:
        ip = ipv6_headers(dst, number, src=src or SRC6, ext=ext)
    return ether(vlans) / ip / transport(proto, sport, dport)


def first_fragment(
    dst: str,
    proto: str = "tcp",
    *,
    src: str | None = None,
    sport: int = 40000,
    dport: int = 443,
    vlans: Sequence[tuple[int, int]] = (),
    ext: Sequence[str] = (),
) -> Packet:
    """Offset 0 with more-fragments set: carries the L4 header."""
    number = PROTO_NUMBERS[proto]
    if family_of(dst) == 4:
        ip = ipv4_header(dst, number, src=src or SRC4, flags=1)
    else:
        ip = ipv6_headers(dst, number, src=src or SRC6, ext=ext, frag=(0, True))
    return ether(vlans) / ip / transport(proto, sport, dport)


def later_fragment(
    dst: str,
    proto: str = "tcp",
    *,
    src: str | None = None,
    more: bool = False,
    vlans: Sequence[tuple[int, int]] = (),
    ext: Sequence[str] = (),
) -> Packet:
    """Offset 185 (1480 bytes): payload only, starting with bytes that would read as
    ports 53 -> 443 if the parser mistook them for an L4 header."""
    data = struct.pack("!HH", 53, 443) + b"y" * 36
    number = PROTO_NUMBERS[proto]
    if family_of(dst) == 4:
        ip = ipv4_header(dst, number, src=src or SRC4, flags=int(more), frag=185)
    else:
        ip = ipv6_headers(dst, number, src=src or SRC6, ext=ext, frag=(185, more))
    return ether(vlans) / ip / Raw(data)


def arp(
    vlans: Sequence[tuple[int, int]] = (), *, psrc: str = SRC4, pdst: str = "198.18.0.2"
) -> Packet:
    return ether(vlans) / ARP(op=1, psrc=psrc, pdst=pdst, hwsrc=MAC_SRC)


def ip_header(dst: str, proto: int, *, src: str) -> Packet:
    """An IPv4 or IPv6 header (by the address family) carrying `proto`."""
    if family_of(dst) == 4:
        return ipv4_header(dst, proto, src=src)
    return ipv6_headers(dst, proto, src=src)


def tcp_segment(
    src: str, dst: str, sport: int = 40000, dport: int = 443, flags: str = "S"
) -> Packet:
    """A TCP segment with `flags` (scapy letters: S, SA, A, F, R, ...); IPv4 or IPv6 by
    the addresses."""
    return ether() / ip_header(dst, TCP_, src=src) / TCP(sport=sport, dport=dport, flags=flags)


def icmp_message(src: str, dst: str, *, type_: int = 8, code: int = 0, ident: int = 1) -> Packet:
    """An IPv4 ICMP message (default: echo request) with `ident` as the echo id."""
    icmp = ICMP(type=type_, code=code, id=ident, seq=1)
    return ether() / ipv4_header(dst, ICMP_, src=src) / icmp / Raw(b"x" * 8)


def icmpv6_echo(src: str, dst: str, *, reply: bool = False, ident: int = 1) -> Packet:
    """An ICMPv6 echo request (or reply) with `ident` as the echo id."""
    echo = ICMPv6EchoReply if reply else ICMPv6EchoRequest
    return ether() / ipv6_headers(dst, ICMPV6_, src=src) / echo(id=ident, seq=1, data=b"x" * 8)


def icmpv6_message(src: str, dst: str, *, type_: int, code: int = 0) -> Packet:
    """Any ICMPv6 message by number (8 bytes of header, a little payload)."""
    header = struct.pack("!BBHI", type_, code, 0, 0)
    return ether() / ipv6_headers(dst, ICMPV6_, src=src) / Raw(header + b"x" * 8)


def neighbour_solicitation(src: str, target: str) -> Packet:
    """NS for `target` to its solicited-node multicast address (or from :: for DAD)."""
    solicited_node = bytes.fromhex("ff0200000000000000000001ff")
    dst = str(ipaddress.IPv6Address(solicited_node + ipaddress.IPv6Address(target).packed[-3:]))
    ns = ICMPv6ND_NS(tgt=target)
    if src != "::":
        ns = ns / ICMPv6NDOptSrcLLAddr(lladdr=MAC_SRC)
    return ether() / IPv6(src=src, dst=dst, hlim=255) / ns


def neighbour_advertisement(src: str, dst: str, target: str) -> Packet:
    return ether() / IPv6(src=src, dst=dst, hlim=255) / ICMPv6ND_NA(tgt=target, R=0, S=1, O=1)


def router_solicitation(src: str) -> Packet:
    return ether() / IPv6(src=src, dst="ff02::2", hlim=255) / ICMPv6ND_RS()


def offset_of(frame: Packet, layer: type[Packet]) -> int:
    """Where `layer` starts in the encoded frame."""
    return len(bytes(frame)) - len(bytes(frame[layer]))


def icmp_error(src: str, dst: str, quoted: Packet, *, type_: int = 3, code: int = 4) -> Packet:
    """An IPv4 ICMP error from `src` to `dst` quoting `quoted` (a frame as the other
    builders make them) as routers do: its IP header and the first 8 bytes after it.
    Default: destination unreachable, fragmentation needed (next-hop MTU 1280)."""
    ip = IP(bytes(quoted[IP]))  # encoded, so ihl is known
    quote = bytes(ip)[: ip.ihl * 4 + 8]
    icmp = ICMP(type=type_, code=code, nexthopmtu=1280 if (type_, code) == (3, 4) else 0)
    return ether() / ipv4_header(dst, ICMP_, src=src) / icmp / Raw(quote)


def icmpv6_error(src: str, dst: str, quoted: Packet, *, too_big: bool = True) -> Packet:
    """An ICMPv6 error from `src` to `dst` quoting `quoted` (IPv6 header and what follows,
    as much as fits): packet too big (MTU 1280), or destination unreachable."""
    quote = bytes(quoted[IPv6])[:1232]
    error = ICMPv6PacketTooBig(mtu=1280) if too_big else ICMPv6DestUnreach(code=1)
    return ether() / ipv6_headers(dst, ICMPV6_, src=src) / error / Raw(quote)
