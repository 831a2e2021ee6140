"""Which flows to show: Hubble's flow filters (flow.FlowFilter lists), compiled once into
predicates over flow.Flow messages, with the semantics of Hubble's filters package.

A flow passes when the whitelist is empty or ANY whitelist filter matches, and NO blacklist
filter matches. Within one FlowFilter every non-empty field must match (AND); the values of
one field are alternatives (OR). Filters about data our flows never carry (L7: HTTP, DNS
queries, trace ids) are accepted, checked like Hubble checks them, and match nothing.

Apart from the store (and its asyncio) because `membrane observe` checks its options with it
before it connects; protobuf is not imported here (the matcher reads messages it is given)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from membrane.errors import UserError
from membrane.identity.labels import SOURCE_ANY, Label
from membrane.identity.selector import DOES_NOT_EXIST, EXISTS, IN, NOT_IN, LabelSelector

if TYPE_CHECKING:
    from membrane.hubble.flow import flow_pb2

Predicate = Callable[["flow_pb2.Flow"], bool]

DEFAULT_NAMESPACE = "default"  # a pod or service filter without "namespace/", as in Hubble
DEFAULT_CLUSTER = "default"  # the cluster of a node name without "cluster/", as in Cilium

# Hubble's --protocol names: L4 ones name the flow's l4 oneof; "icmp" is either family.
L4_PROTOCOLS: dict[str, frozenset[str]] = {
    "tcp": frozenset({"TCP"}),
    "udp": frozenset({"UDP"}),
    "sctp": frozenset({"SCTP"}),
    "icmp": frozenset({"ICMPv4", "ICMPv6"}),
    "icmpv4": frozenset({"ICMPv4"}),
    "icmpv6": frozenset({"ICMPv6"}),
    "vrrp": frozenset({"VRRP"}),  # Hubble knows them; our flows never carry them
    "igmp": frozenset({"IGMP"}),
}
L7_PROTOCOLS = frozenset({"dns", "http"})  # our flows have no l7 record: they never match
TCP_FLAG_NAMES = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS")


class FlowMatcher:
    """A compiled whitelist and blacklist. `matches` runs per flow per follower: every
    value is parsed once here (networks, sets, regular expressions, label selectors)."""

    __slots__ = ("_blacklist", "_whitelist")

    def __init__(
        self,
        whitelist: tuple[tuple[Predicate, ...], ...],
        blacklist: tuple[tuple[Predicate, ...], ...],
    ) -> None:
        self._whitelist = whitelist
        self._blacklist = blacklist

    @classmethod
    def build(
        cls,
        whitelist: Sequence[flow_pb2.FlowFilter] = (),
        blacklist: Sequence[flow_pb2.FlowFilter] = (),
        names: tuple[str, str] | None = None,
    ) -> FlowMatcher:
        """Raises UserError naming the FlowFilter field (e.g. `source_ip`) of a bad value;
        with `names`, where it is too (`whitelist[0].source_ip`)."""
        return cls(*(_compile_list(filters, name) for filters, name in zip(
            (whitelist, blacklist), names or (None, None), strict=True
        )))  # fmt: skip

    @property
    def matches_all(self) -> bool:
        """No filter at all: callers may skip calling `matches`."""
        return not self._whitelist and not self._blacklist

    def matches(self, flow: flow_pb2.Flow) -> bool:
        if self._whitelist and not _any_filter(self._whitelist, flow):
            return False
        return not (self._blacklist and _any_filter(self._blacklist, flow))


def _compile_list(
    filters: Sequence[flow_pb2.FlowFilter], name: str | None
) -> tuple[tuple[Predicate, ...], ...]:
    compiled = []
    for i, flow_filter in enumerate(filters):
        try:
            compiled.append(compile_filter(flow_filter))
        except UserError as err:
            if name is None:
                raise
            raise UserError(f"{name}[{i}].{err.field}", err.problem) from None
    return tuple(compiled)


def _any_filter(filters: tuple[tuple[Predicate, ...], ...], flow: flow_pb2.Flow) -> bool:
    for predicates in filters:
        for predicate in predicates:
            if not predicate(flow):
                break
        else:  # every field of this filter matched (an empty filter matches every flow)
            return True
    return False


def compile_filter(ff: flow_pb2.FlowFilter) -> tuple[Predicate, ...]:
    """One FlowFilter as the predicates of its non-empty fields, cheapest first."""
    predicates: list[Predicate] = []
    add = predicates.append
    if ff.uuid:
        add(_in_set(frozenset(ff.uuid), lambda f: f.uuid))
    if ff.event_type:
        add(_event_type(ff.event_type))
    if ff.verdict:
        add(_in_set(frozenset(ff.verdict), lambda f: f.verdict))
    if ff.drop_reason_desc:
        add(_in_set(frozenset(ff.drop_reason_desc), lambda f: f.drop_reason_desc))
    if ff.traffic_direction:
        add(_in_set(frozenset(ff.traffic_direction), lambda f: f.traffic_direction))
    if ff.reply:
        add(_reply(frozenset(ff.reply)))
    if ff.ip_version:
        versions = frozenset(ff.ip_version)
        add(lambda f: f.HasField("IP") and f.IP.ipVersion in versions)
    if ff.protocol:
        add(_protocol(ff.protocol))
    if ff.source_port:
        add(_port(ff.source_port, "source_port", "source_port"))
    if ff.destination_port:
        add(_port(ff.destination_port, "destination_port", "destination_port"))
    if ff.tcp_flags:
        add(_tcp_flags(ff.tcp_flags))
    if ff.source_identity:
        add(_in_set(frozenset(ff.source_identity), lambda f: f.source.identity))
    if ff.destination_identity:
        add(_in_set(frozenset(ff.destination_identity), lambda f: f.destination.identity))
    if ff.source_ip:
        add(_ips(ff.source_ip, "source_ip", lambda f: f.IP.source))
    if ff.destination_ip:
        add(_ips(ff.destination_ip, "destination_ip", lambda f: f.IP.destination))
    if ff.source_pod:
        add(_names(ff.source_pod, "source_pod", _source_pod))
    if ff.destination_pod:
        add(_names(ff.destination_pod, "destination_pod", _destination_pod))
    if ff.source_service:
        add(_names(ff.source_service, "source_service", _source_service))
    if ff.destination_service:
        add(_names(ff.destination_service, "destination_service", _destination_service))
    if ff.source_label:
        add(_labels(ff.source_label, "source_label", lambda f: f.source.labels))
    if ff.destination_label:
        add(_labels(ff.destination_label, "destination_label", lambda f: f.destination.labels))
    if ff.source_fqdn:
        add(_fqdns(ff.source_fqdn, "source_fqdn", lambda f: f.source_names))
    if ff.destination_fqdn:
        add(_fqdns(ff.destination_fqdn, "destination_fqdn", lambda f: f.destination_names))
    if ff.source_workload:
        add(_workloads(ff.source_workload, lambda f: f.source.workloads))
    if ff.destination_workload:
        add(_workloads(ff.destination_workload, lambda f: f.destination.workloads))
    if ff.node_name:
        add(_node_names(ff.node_name))
    # L7 and tracing: checked as Hubble checks them; our flows carry none of it.
    if ff.http_status_code:
        _check_http_status_codes(ff.http_status_code)
        add(_never)
    if ff.http_method:
        add(_never)
    if ff.http_path:
        _check_regexps(ff.http_path, "http_path")
        add(_never)
    if ff.dns_query:
        _check_regexps(ff.dns_query, "dns_query")
        add(_never)
    if ff.trace_id:
        add(_never)
    return tuple(predicates)


def _never(flow: flow_pb2.Flow) -> bool:
    return False


def _in_set(values: frozenset, get: Callable[[flow_pb2.Flow], object]) -> Predicate:
    return lambda flow: get(flow) in values


def _event_type(filters: Iterable[flow_pb2.EventTypeFilter]) -> Predicate:
    # (type, sub_type or None): type 0 is any type, as in Hubble
    wanted = tuple((f.type, f.sub_type if f.match_sub_type else None) for f in filters)

    def predicate(flow: flow_pb2.Flow) -> bool:
        if not flow.HasField("event_type"):
            return False
        kind, sub = flow.event_type.type, flow.event_type.sub_type
        return any((t == 0 or t == kind) and (s is None or s == sub) for t, s in wanted)

    return predicate


def _reply(values: frozenset[bool]) -> Predicate:
    # a flow that does not know whether it is a reply matches neither value, as in Hubble
    return lambda flow: flow.HasField("is_reply") and flow.is_reply.value in values


def _protocol(names: Iterable[str]) -> Predicate:
    l4: set[str] = set()
    for name in names:
        key = name.lower()
        if key in L4_PROTOCOLS:
            l4 |= L4_PROTOCOLS[key]
        elif key not in L7_PROTOCOLS:
            known = ", ".join((*L4_PROTOCOLS, *sorted(L7_PROTOCOLS)))
            raise UserError("protocol", f"unknown protocol {name!r} (known: {known})")
    oneofs = frozenset(l4)
    return lambda flow: flow.l4.WhichOneof("protocol") in oneofs


def _port(values: Iterable[str], field: str, attr: str) -> Predicate:
    ports = frozenset(_parse_port(v, field) for v in values)

    def predicate(flow: flow_pb2.Flow) -> bool:
        which = flow.l4.WhichOneof("protocol")
        if which not in ("TCP", "UDP", "SCTP"):  # ICMP has no ports
            return False
        return getattr(getattr(flow.l4, which), attr) in ports

    return predicate


def _parse_port(text: str, field: str) -> int:
    """0-65535, as Hubble parses a port filter (a 16-bit unsigned number)."""
    if not text.isdigit() or int(text) > 65535:
        raise UserError(field, f"{text!r} is not a port number (0-65535)")
    return int(text)


def _tcp_flags(filters: Iterable[flow_pb2.TCPFlags]) -> Predicate:
    # each filter value: the flags it sets, all of which the flow's TCP flags must have
    wanted = tuple(frozenset(name for name in TCP_FLAG_NAMES if getattr(f, name)) for f in filters)

    def predicate(flow: flow_pb2.Flow) -> bool:
        tcp = flow.l4.TCP  # an empty message when the flow is not TCP
        if not tcp.HasField("flags"):
            return False
        flags = tcp.flags
        return any(all(getattr(flags, name) for name in names) for names in wanted)

    return predicate


def _ips(values: Iterable[str], field: str, get: Callable[[flow_pb2.Flow], str]) -> Predicate:
    addresses: set[str] = set()
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for text in values:
        if "/" in text:
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise UserError(field, f"{text!r} is not an address or CIDR") from None
        else:
            try:
                # compared as text, the way flows carry addresses (normalized: "::1")
                addresses.add(str(ipaddress.ip_address(text)))
            except ValueError:
                raise UserError(field, f"{text!r} is not an address or CIDR") from None
    exact = frozenset(addresses)
    nets = tuple(networks)

    def in_networks(address: str) -> bool:
        parsed = _parse_address(address)
        return parsed is not None and any(parsed in net for net in nets)

    matched = _Memo(in_networks)  # a flow's peers are few addresses, seen again and again

    def predicate(flow: flow_pb2.Flow) -> bool:
        address = get(flow)
        if not address:
            return False
        if address in exact:
            return True
        return bool(nets) and matched(address)

    return predicate


class _Memo:
    """A function's answers by argument, up to `limit` of them (then forgotten at once):
    the values a filter meets (addresses, label sets) repeat with every flow of an
    endpoint, and protobuf-side work per flow costs microseconds."""

    __slots__ = ("_answers", "_function", "_limit")

    def __init__(self, function: Callable[[Any], bool], limit: int = 8192) -> None:
        self._function, self._limit = function, limit
        self._answers: dict[Any, bool] = {}

    def __call__(self, key: Any) -> bool:
        answer = self._answers.get(key)
        if answer is None:
            if len(self._answers) >= self._limit:
                self._answers.clear()
            answer = self._answers[key] = self._function(key)
        return answer


@lru_cache(maxsize=4096)
def _parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _source_pod(flow: flow_pb2.Flow) -> tuple[str, str]:
    return flow.source.namespace, flow.source.pod_name


def _destination_pod(flow: flow_pb2.Flow) -> tuple[str, str]:
    return flow.destination.namespace, flow.destination.pod_name


def _source_service(flow: flow_pb2.Flow) -> tuple[str, str]:
    return flow.source_service.namespace, flow.source_service.name


def _destination_service(flow: flow_pb2.Flow) -> tuple[str, str]:
    return flow.destination_service.namespace, flow.destination_service.name


def parse_namespaced_name(text: str) -> tuple[str, str]:
    """Hubble's `[namespace/][<name-prefix>]`: no slash means namespace default;
    ("", "") for a value that names nothing."""
    parts = text.split("/")
    if len(parts) > 1:
        return parts[0], parts[1]
    if not parts[0]:
        return "", ""
    return DEFAULT_NAMESPACE, parts[0]


def _names(
    values: Iterable[str], field: str, get: Callable[[flow_pb2.Flow], tuple[str, str]]
) -> Predicate:
    wanted: list[tuple[str, str]] = []
    for text in values:
        namespace, prefix = parse_namespaced_name(text)
        if not namespace and not prefix:
            raise UserError(field, f"{text!r}: give [namespace/][<name prefix>]")
        wanted.append((namespace, prefix))
    whole = frozenset(ns for ns, prefix in wanted if not prefix)  # "namespace/"
    prefixes = tuple((ns, prefix) for ns, prefix in wanted if prefix)

    def predicate(flow: flow_pb2.Flow) -> bool:
        namespace, name = get(flow)
        if not namespace and not name:
            return False
        if namespace in whole:
            return True
        return any(namespace == ns and name.startswith(p) for ns, p in prefixes)

    return predicate


def _labels(
    values: Iterable[str], field: str, get: Callable[[flow_pb2.Flow], Sequence[str]]
) -> Predicate:
    selectors = tuple(parse_label_selector(text, field) for text in values)

    def selected(labels: tuple[str, ...]) -> bool:
        label_set = _label_set(labels)
        return any(selector.matches(label_set) for selector in selectors)

    matched = _Memo(selected)
    return lambda flow: matched(tuple(get(flow)))


@lru_cache(maxsize=8192)
def _label_set(labels: tuple[str, ...]) -> frozenset[Label]:
    """A flow's endpoint labels (`k8s:app=web`, `reserved:world`) as Labels; cached, since
    the same few label sets come with every flow of an endpoint."""
    parsed = set()
    for text in labels:
        # Cilium's reading: the source is what comes before the first colon, whatever it
        # is (`container:foo=bar` is key foo); without one, a selector needs `any:`/no source
        source, colon, rest = text.partition(":")
        if not colon or "=" in source:
            source, rest = SOURCE_ANY, text
        key, _, value = rest.partition("=")
        if key:  # a label without a key cannot be selected
            parsed.add(Label(source, key, value))
    return frozenset(parsed)


# A Kubernetes label selector, as `kubectl -l` takes it. Keys may carry Cilium's source
# prefix (`k8s:app`); without one they match labels of any source.
_NAME = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_KEY = rf"{_NAME}(?::{_NAME})?"  # one source prefix at most
_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?"


@lru_cache(maxsize=1)
def _requirement_re() -> re.Pattern[str]:
    """One requirement of a selector and its comma (compiled on first use: the CLI
    imports this module to check options, most commands never parse a selector)."""
    return re.compile(
        rf"""\s*(?:
            (?P<not>!)\s*(?P<absent>{_KEY})
          | (?P<key>{_KEY})\s*(?:
                (?P<op>==|=|!=)\s*(?P<value>{_VALUE})
              | \s(?P<setop>in|notin)\s*\(\s*(?P<values>[^()]*)\)
              | (?P<cmp>[<>])
            )?
        )\s*(?:,|$)""",
        re.VERBOSE,
    )


_VALUE_RE = re.compile(_VALUE)


@lru_cache(maxsize=1024)
def parse_label_selector(text: str, field: str) -> LabelSelector:
    """`app=web`, `k8s:app in (web, api)`, `!canary`, `env!=prod,tier`, `reserved:world`.
    An empty selector matches every endpoint, as in Kubernetes."""
    requirements = []
    pos, end = 0, len(text)
    if not text.strip():
        return LabelSelector()
    while pos < end:
        m = _requirement_re().match(text, pos)
        if m is None or m.end() == pos:
            raise UserError(field, f"{text!r} is not a label selector (at {text[pos:]!r})")
        if m["cmp"]:
            raise UserError(field, f"{text!r}: the operators < and > are not supported")
        if m["absent"]:
            requirements.append((m["absent"], DOES_NOT_EXIST, ()))
        elif m["setop"]:
            # `notin ()` is valid (and holds for any label set), as Hubble parses it
            listed = m["values"].strip()
            values = tuple(v.strip() for v in listed.split(",")) if listed else ()
            for value in values:
                if not value or not _VALUE_RE.fullmatch(value) or len(value) > 63:
                    raise UserError(field, f"{text!r}: {value!r} is not a label value")
            requirements.append((m["key"], IN if m["setop"] == "in" else NOT_IN, values))
        elif m["op"]:
            if len(m["value"]) > 63:
                raise UserError(field, f"{text!r}: a label value has at most 63 characters")
            op = NOT_IN if m["op"] == "!=" else IN
            requirements.append((m["key"], op, (m["value"],)))
        else:
            requirements.append((m["key"], EXISTS, ()))
        pos = m.end()
        if text[pos - 1 : pos] != "," and pos < end:
            raise UserError(field, f"{text!r} is not a label selector (at {text[pos:]!r})")
    return LabelSelector(match_expressions=requirements)


def _fqdn_regex(pattern: str, field: str) -> str:
    """Hubble's FQDN pattern: lower case letters, digits, `-`, `_`, `.`; `*` any run of
    them; one trailing dot ignored."""
    canonical = pattern.strip().removesuffix(".").lower()
    if not canonical:
        raise UserError(field, f"{pattern!r}: empty pattern")
    if canonical.endswith("."):
        raise UserError(field, f"{pattern!r}: multiple trailing dots in pattern")
    out = []
    for char in canonical:
        if char == ".":
            out.append(r"\.")
        elif char == "*":
            out.append(r"[-.0-9a-z]*")
        elif char in "-_" or (char.isascii() and char.isalnum()):
            out.append(char)
        else:
            raise UserError(field, f"{pattern!r}: {char!r} is not allowed in a pattern")
    return "".join(out)


_FQDN = r"(?:[-0-9_a-z]+(?:\.[-0-9_a-z]+)*)"


def _fqdns(
    values: Iterable[str], field: str, get: Callable[[flow_pb2.Flow], Sequence[str]]
) -> Predicate:
    regex = re.compile("(?:" + "|".join(_fqdn_regex(v, field) for v in values) + r")\Z")
    return lambda flow: any(regex.match(name) for name in get(flow))


def _node_names(patterns: Iterable[str]) -> Predicate:
    """`node`, `cluster/node`, with FQDN patterns (`*`) in each part; an empty part
    matches any name. A flow's node name without a cluster is in cluster default."""
    alternatives = []
    for pattern in patterns:
        if not pattern:
            raise UserError("node_name", "empty pattern")
        parts = pattern.split("/")
        if len(parts) > 2:
            raise UserError("node_name", f"{pattern!r}: too many slashes in pattern")
        cluster, node = parts if len(parts) == 2 else ("", parts[0])
        cluster_re = _fqdn_regex(cluster, "node_name") if cluster else _FQDN
        node_re = _fqdn_regex(node, "node_name") if node else _FQDN
        alternatives.append(f"{cluster_re}/{node_re}")
    regex = re.compile("(?:" + "|".join(alternatives) + r")\Z")

    def predicate(flow: flow_pb2.Flow) -> bool:
        name = flow.node_name
        if not name:
            return False
        if "/" not in name:
            name = f"{DEFAULT_CLUSTER}/{name}"
        return regex.match(name) is not None

    return predicate


def _workloads(
    filters: Iterable[flow_pb2.Workload], get: Callable[[flow_pb2.Flow], Sequence]
) -> Predicate:
    # an empty kind or name in the filter matches any
    wanted = tuple((w.kind, w.name) for w in filters)

    def predicate(flow: flow_pb2.Flow) -> bool:
        return any(
            (not kind or kind == w.kind) and (not name or name == w.name)
            for w in get(flow)
            for kind, name in wanted
        )

    return predicate


_HTTP_STATUS = re.compile(r"[1-5][0-9][0-9]|[1-5][0-9]?\+")


def _check_http_status_codes(values: Iterable[str]) -> None:
    for value in values:
        if not _HTTP_STATUS.fullmatch(value):
            raise UserError("http_status_code", f"{value!r}: give a code (404) or prefix (5+)")


def _check_regexps(values: Iterable[str], field: str) -> None:
    for value in values:
        try:
            re.compile(value)
        except re.error as err:
            raise UserError(field, f"{value!r} is not a regular expression: {err}") from None
