"""What users type for `membrane lb`: a VIP as ADDR:PORT/PROTO and backend addresses,
validated before any map is touched (a bad value changes nothing)."""

from __future__ import annotations

from dataclasses import dataclass

from membrane.errors import UserError
from membrane.filter.rules import (
    PORT_PROTOCOLS,
    IPAddress,
    parse_ip,
    parse_port,
    parse_protocol,
    protocol_name,
)
from membrane.lb.maglev import DEFAULT_SIZE, MAX_SIZE, MAX_WEIGHT, is_prime


@dataclass(frozen=True)
class Vip:
    """A load-balanced frontend: address, port and protocol (TCP, UDP or SCTP)."""

    addr: IPAddress
    port: int
    protocol: int

    @classmethod
    def parse(cls, text: str, field: str = "VIP") -> Vip:
        """`198.19.0.10:80/tcp` or `[2001:db8::10]:80/tcp` (protocol defaults to tcp)."""
        body, _, proto_text = text.strip().partition("/")
        addr_text, sep, port_text = body.rpartition(":")
        if not sep or not port_text:
            raise UserError(field, f"{text!r} is not ADDR:PORT/PROTO (e.g. 198.19.0.10:80/tcp)")
        if addr_text.startswith("[") and addr_text.endswith("]"):
            addr_text = addr_text[1:-1]
        elif ":" in addr_text:
            raise UserError(field, f"{text!r}: write an IPv6 VIP in brackets, [2001:db8::1]:80")
        addr = parse_ip(addr_text, field)
        protocol = parse_protocol(proto_text or "tcp", field)
        if protocol_name(protocol) not in PORT_PROTOCOLS:
            raise UserError(
                field, f"protocol {proto_text!r} has no ports; use {', '.join(PORT_PROTOCOLS)}"
            )
        if addr.is_multicast or addr.is_unspecified:
            raise UserError(field, f"{addr} cannot be a VIP (multicast or unspecified)")
        return cls(addr, parse_port(port_text, field), protocol)

    def __str__(self) -> str:
        host = f"[{self.addr}]" if self.addr.version == 6 else str(self.addr)
        return f"{host}:{self.port}/{protocol_name(self.protocol)}"


def parse_backend(text: str, vip: Vip, field: str = "ADDR") -> IPAddress:
    """A backend's address: the same family as its VIP (IPv4 in IPv4, IPv6 in IPv6)."""
    addr = parse_ip(text, field)
    if addr.version != vip.addr.version:
        raise UserError(
            field,
            f"{addr} is IPv{addr.version} but VIP {vip} is IPv{vip.addr.version} "
            "(backends are reached by IPv4-in-IPv4 or IPv6-in-IPv6)",
        )
    if addr.is_multicast or addr.is_unspecified or addr.is_loopback:
        raise UserError(field, f"{addr} cannot be a backend (multicast, unspecified or loopback)")
    return addr


def check_weight(weight: int, field: str = "--weight") -> int:
    if not 1 <= weight <= MAX_WEIGHT:
        raise UserError(field, f"weight {weight} is out of range (1-{MAX_WEIGHT})")
    return weight


def check_table_size(size: int | None, field: str = "--maglev-size") -> int:
    if size is None:
        return DEFAULT_SIZE
    if not 3 <= size <= MAX_SIZE or not is_prime(size):
        raise UserError(
            field, f"{size} is not a prime between 3 and {MAX_SIZE} (default {DEFAULT_SIZE})"
        )
    return size


def parse_source(text: str, field: str = "--source") -> IPAddress:
    addr = parse_ip(text, field)
    if addr.is_multicast or addr.is_unspecified:
        raise UserError(field, f"{addr} cannot be the outer source address")
    return addr
