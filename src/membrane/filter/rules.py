"""What users type for `membrane filter`, validated and turned into typed rules.

Everything here is pure: a bad value raises UserError naming the field before any map is
touched, so a rejected command changes nothing.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from membrane.errors import UserError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PROTOCOLS = {
    "icmp": socket.IPPROTO_ICMP,
    "igmp": socket.IPPROTO_IGMP,
    "tcp": socket.IPPROTO_TCP,
    "udp": socket.IPPROTO_UDP,
    "gre": socket.IPPROTO_GRE,
    "esp": socket.IPPROTO_ESP,
    "ah": socket.IPPROTO_AH,
    "icmpv6": socket.IPPROTO_ICMPV6,
    "icmp6": socket.IPPROTO_ICMPV6,
    "sctp": socket.IPPROTO_SCTP,
}
PROTOCOL_NAMES = {
    number: name for name, number in reversed(PROTOCOLS.items())
}  # reversed: icmpv6 wins over its alias icmp6
PORT_PROTOCOLS = ("tcp", "udp", "sctp")


def parse_cidr(text: str, field: str) -> IPNetwork:
    """An IPv4 or IPv6 prefix; a bare address means a host route (/32 or /128)."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise UserError(
            field, f"{text!r} is not an IPv4 or IPv6 prefix (e.g. 198.18.0.0/16 or 2001:db8::/32)"
        ) from None
    if "/" in text and net.network_address != ipaddress.ip_interface(text.strip()).ip:
        raise UserError(field, f"{text!r} has host bits set; did you mean {net}?")
    return net


def parse_cidrs(texts: list[str], field: str) -> list[IPNetwork]:
    nets = []
    for i, text in enumerate(texts):
        nets.append(parse_cidr(text, f"{field}[{i}]" if len(texts) > 1 else field))
    return list(dict.fromkeys(nets))  # keep order, drop repeats


def read_cidr_file(path: str, field: str) -> list[str]:
    """Prefixes from a file, one per line; blank lines and # comments are ignored."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise UserError(field, f"cannot read {path}: {err.strerror}") from None
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def parse_protocol(text: str, field: str) -> int:
    """A protocol name (tcp, udp, icmp, icmpv6, sctp, ...) or number 0-255."""
    name = text.strip().lower()
    if name in PROTOCOLS:
        return PROTOCOLS[name]
    if name.isdigit() and 0 <= int(name) <= 255:
        return int(name)
    raise UserError(
        field,
        f"unknown protocol {text!r} (use one of "
        f"{', '.join(sorted(set(PROTOCOLS) - {'icmp6'}))} or a number 0-255)",
    )


def protocol_name(number: int) -> str:
    return PROTOCOL_NAMES.get(number, str(number))


def parse_port(value: int | str, field: str) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise UserError(field, f"{value!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise UserError(field, f"port {port} is out of range (1-65535)")
    return port


def parse_ip(text: str, field: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise UserError(field, f"{text!r} is not an IPv4 or IPv6 address") from None


@dataclass(frozen=True)
class AllowedFlow:
    """One `allow-only` rule: the flow src -> dst:port/protocol is let through."""

    src: IPAddress
    dst: IPAddress
    port: int
    protocol: int

    @classmethod
    def parse(cls, src: str, dst: str, port: int | str, protocol: str) -> AllowedFlow:
        s, d = parse_ip(src, "--src"), parse_ip(dst, "--dst")
        if s.version != d.version:
            raise UserError("--dst", f"{d} is IPv{d.version} but --src {s} is IPv{s.version}")
        proto = parse_protocol(protocol, "--proto")
        if protocol_name(proto) not in PORT_PROTOCOLS:
            raise UserError(
                "--proto",
                f"{protocol!r} has no ports; allow-only needs {', '.join(PORT_PROTOCOLS)}",
            )
        return cls(s, d, parse_port(port, "--dport"), proto)

    def __str__(self) -> str:
        return f"allow {self.src} -> {self.dst} {protocol_name(self.protocol)}/{self.port}"


def address_bytes(addr: IPAddress) -> bytes:
    """The 16-byte address field of the ABI structs (IPv4 in the first 4 bytes)."""
    return addr.packed.ljust(16, b"\0")
