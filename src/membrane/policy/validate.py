"""Syntax checks for the values inside policy documents.

Each check raises ValueError with one short sentence; pydantic attaches the field path and
the parser turns it into a UserError. Checks follow what the Kubernetes API server and
Cilium's CRD validation accept, so a document that works there works here.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Network, IPv6Network, ip_network

from membrane.abi import IpProto
from membrane.identity.labels import SOURCE_ANY, SOURCE_CIDR, SOURCE_RESERVED, SOURCES

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_CILIUM_KEY = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?")
_PORT_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")

# The protocols a policy's port may name, by the name it uses.
PROTOCOL_NUMBERS = {p.name: p for p in (IpProto.TCP, IpProto.UDP, IpProto.SCTP)}
ANY_PROTOCOL = "ANY"  # Cilium: TCP, UDP and SCTP
# Protocols without ports that Cilium's toPorts also names (IANA numbers); a rule for one
# matches all of that protocol's packets.
PORTLESS_PROTOCOLS = {"VRRP": 112, "IGMP": 2, "GRE": 47, "IPIP": 4, "IPV6": 41, "ESP": 50, "AH": 51}
CILIUM_PROTOCOL_NUMBERS: dict[str, int] = {**PROTOCOL_NUMBERS, **PORTLESS_PROTOCOLS}


def check_namespace(value: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid namespace name (lowercase letters, digits and '-', "
            "at most 63 characters)"
        )
    return value


def check_name(value: str, what: str = "name") -> str:
    if len(value) > 253 or not _DNS_SUBDOMAIN.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid {what} (lowercase letters, digits, '-' and '.', "
            "at most 253 characters)"
        )
    return value


def check_k8s_label_key(key: str) -> None:
    """A Kubernetes qualified name: [prefix/]name."""
    prefix, slash, name = key.rpartition("/")
    if slash and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        raise ValueError(f"label key {key!r} has an invalid prefix (must be a DNS subdomain)")
    if len(name) > 63 or not _QUALIFIED_NAME.fullmatch(name):
        raise ValueError(
            f"label key {key!r} is invalid (letters, digits, '-', '_' and '.', starting and "
            "ending with a letter or digit, at most 63 characters, optional DNS prefix and '/')"
        )


def check_cilium_label_key(key: str) -> None:
    """Cilium keys may carry a source (`k8s:app`); the rest is checked loosely, since
    Cilium's own keys (`io.cilium.k8s.namespace.labels.<key>`) outgrow qualified names."""
    source, sep, rest = key.partition(":")
    if sep:
        if source not in SOURCES:
            raise ValueError(
                f"label key {key!r} has unknown source {source!r} (use k8s, reserved, cidr or "
                f"{SOURCE_ANY})"
            )
        if source == SOURCE_CIDR:  # `cidr:2001:db8::/64` holds colons no other key may
            try:
                parse_cidr(rest)
            except ValueError:
                raise ValueError(
                    f"label key {key!r} is invalid: a cidr: key is a prefix such as 10.0.0.0/8"
                ) from None
            return
        key = rest
    if len(key) > 317 or not _CILIUM_KEY.fullmatch(key):
        raise ValueError(f"label key {key!r} is invalid")
    if source == SOURCE_RESERVED and "/" in key:
        raise ValueError(f"reserved label {key!r} is invalid")


def check_label_value(value: str) -> None:
    if value and (len(value) > 63 or not _QUALIFIED_NAME.fullmatch(value)):
        raise ValueError(
            f"label value {value!r} is invalid (letters, digits, '-', '_' and '.', starting and "
            "ending with a letter or digit, at most 63 characters)"
        )


Network = IPv4Network | IPv6Network


def parse_cidr(value: object) -> Network:
    """An IPv4 or IPv6 prefix, or a bare address (a /32 or /128); host bits are cleared
    (as Kubernetes and Cilium accept them)."""
    if not isinstance(value, str):
        raise ValueError("must be a CIDR string such as 10.0.0.0/8 or 2001:db8::/64")
    try:
        if "%" in value:  # a scoped address (fe80::1%eth0) names no prefix
            raise ValueError
        return ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a valid CIDR (such as 10.0.0.0/8 or 2001:db8::/64)"
        ) from None


def check_except(prefix: Network, cidr: Network) -> None:
    """An except must be a strict part of its block, of the same family."""
    if prefix.version != cidr.version:
        raise ValueError(f"{prefix} is not of the same family as cidr {cidr}")
    if not (prefix.subnet_of(cidr) and prefix != cidr):  # type: ignore[arg-type]
        raise ValueError(f"{prefix} is not inside cidr {cidr} (except must be a strict part)")


def parse_port(value: object, *, allow_zero: bool) -> int | str:
    """A port number (int or digits) or a port name (IANA service name syntax)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("must be a port number or a port name")
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int):
        low = 0 if allow_zero else 1
        if not low <= value <= 65535:
            raise ValueError(f"port {value} is out of range ({low}..65535)")
        return value
    return check_port_name(value, "is neither a port number nor a valid port name")


def check_port_name(value: str, problem: str = "is not a valid port name") -> str:
    """IANA service name syntax, as container port names use it."""
    if (
        len(value) > 15
        or not _PORT_NAME.fullmatch(value)
        or "--" in value
        or not re.search("[a-z]", value)
    ):
        raise ValueError(
            f"{value!r} {problem} (at most 15 lowercase letters, digits and '-', with at "
            "least one letter)"
        )
    return value


def check_end_port(end_port: int, port: int | str | None) -> int:
    if not 1 <= end_port <= 65535:
        raise ValueError(f"endPort {end_port} is out of range (1..65535)")
    if isinstance(port, str):
        raise ValueError("cannot be used with a named port")
    if not port:
        raise ValueError("needs a port (the first port of the range)")
    if end_port < port:
        raise ValueError(f"endPort {end_port} is below port {port}")
    return end_port


def check_protocol(value: str, *, cilium: bool) -> str:
    allowed = [*CILIUM_PROTOCOL_NUMBERS, ANY_PROTOCOL] if cilium else list(PROTOCOL_NUMBERS)
    if value not in allowed:
        raise ValueError(
            f"unknown protocol {value!r} (use {', '.join(allowed[:-1])} or {allowed[-1]})"
        )
    return value


# ICMP type names Cilium accepts besides numbers (IANA names), by family.
ICMP_TYPE_NAMES = {
    "EchoReply": 0,
    "DestinationUnreachable": 3,
    "Redirect": 5,
    "Echo": 8,
    "EchoRequest": 8,
    "RouterAdvertisement": 9,
    "RouterSelection": 10,
    "TimeExceeded": 11,
    "ParameterProblem": 12,
    "Timestamp": 13,
    "TimestampReply": 14,
    "Photuris": 40,
    "ExtendedEchoRequest": 42,
    "ExtendedEchoReply": 43,
}
ICMPV6_TYPE_NAMES = {
    "DestinationUnreachable": 1,
    "PacketTooBig": 2,
    "TimeExceeded": 3,
    "ParameterProblem": 4,
    "EchoRequest": 128,
    "EchoReply": 129,
    "MulticastListenerQuery": 130,
    "MulticastListenerReport": 131,
    "MulticastListenerDone": 132,
    "RouterSolicitation": 133,
    "RouterAdvertisement": 134,
    "NeighborSolicitation": 135,
    "NeighborAdvertisement": 136,
    "RedirectMessage": 137,
    "RouterRenumbering": 138,
    "ICMPNodeInformationQuery": 139,
    "ICMPNodeInformationResponse": 140,
    "InverseNeighborDiscoverySolicitation": 141,
    "InverseNeighborDiscoveryAdvertisement": 142,
    "HomeAgentAddressDiscoveryRequest": 144,
    "HomeAgentAddressDiscoveryReply": 145,
    "MobilePrefixSolicitation": 146,
    "MobilePrefixAdvertisement": 147,
    "DuplicateAddressRequestCodeSuffix": 157,
    "DuplicateAddressConfirmationCodeSuffix": 158,
    "ExtendedEchoRequest": 160,
    "ExtendedEchoReply": 161,
}
ICMP_FAMILIES = {
    "IPv4": (IpProto.ICMP, ICMP_TYPE_NAMES),
    "IPv6": (IpProto.ICMPV6, ICMPV6_TYPE_NAMES),
}


def parse_icmp_type(value: object, family: str) -> int:
    """A type number, or a name of the family's types (EchoRequest is 8 in ICMP, 128 in
    ICMPv6)."""
    names = ICMP_FAMILIES[family][1]
    if isinstance(value, str) and value in names:
        return names[value]
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"{value!r} is not an {family} ICMP type (0..255 or a name such as EchoRequest)"
        )
    if not 0 <= value <= 255:
        raise ValueError(f"ICMP type {value} is out of range (0..255)")
    return value


def check_icmp_family(value: str) -> str:
    if value not in ICMP_FAMILIES:
        raise ValueError(f"unknown family {value!r} (use IPv4 or IPv6)")
    return value
