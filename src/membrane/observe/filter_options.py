"""`membrane observe`'s options as an observer.GetFlowsRequest, by the rules of Hubble's CLI
(`hubble observe`), so that the same command line selects the same flows:

- the values of one flag are alternatives (OR), different flags must all hold (AND);
- a flag about either side (`--ip`, `--pod`, `--label`, `--namespace`, `--port`, ...) makes
  two filters, one with the value on the source side and one on the destination side, and
  a flow passes when either does (identical filters are sent once);
- `--from-*` / `--to-*` flags hold for one side, in every filter;
- `--namespace`, `--from-namespace` and `--to-namespace` put their namespace in front of
  pod and service names that have none (`--pod web -n shop` is `shop/web`), or, with no
  pod or service flag, select the whole namespace (`shop/`);
- `--not` sends the next filter flag to the blacklist: a flow that matches a blacklist
  filter is left out (`--not --verdict FORWARDED`);
- some flags cannot be combined (`--from-pod` with `--namespace`, `--label` with
  `--from-label`, `--verdict` given in two ways is fine but `--ip` with `--from-ip` is not).

Values are checked here, each against the flag that gave it, with the same checks the agent
applies (observe.flowfilter), so a bad value is reported by its flag before anything is sent.
Those checks (and the label model they use) are imported when a filter flag is given: a
plain `membrane observe --last 20` starts without them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import TYPE_CHECKING

from membrane.errors import UserError

if TYPE_CHECKING:  # protobuf is imported where it is used: `observe --help` stays quick
    from google.protobuf.timestamp_pb2 import Timestamp

    from membrane.hubble.flow import flow_pb2
    from membrane.hubble.observer import observer_pb2

DEFAULT_LAST = 20  # `hubble observe` without --last, --first, --all, --since or --follow
ALL_FLOWS = (1 << 64) - 1  # --all: the largest `number` (uint64), as Hubble sends it

# Cilium's monitor message types (pkg/monitor/api), the names `-t` takes.
MESSAGE_TYPES = {
    "drop": 1,
    "debug": 2,
    "capture": 3,
    "trace": 4,
    "policy-verdict": 5,
    "recorder": 6,
    "trace-sock": 7,
    "l7": 129,
    "agent": 130,
}
# Named sub-types: a trace's observation point, an agent notification; others are numbers
# (a drop's sub-type is its drop reason, e.g. `drop:133`).
TRACE_POINTS = {
    "to-endpoint": 0,
    "to-proxy": 1,
    "to-host": 2,
    "to-stack": 3,
    "to-overlay": 4,
    "from-endpoint": 5,
    "from-proxy": 6,
    "from-host": 7,
    "from-stack": 8,
    "from-overlay": 9,
    "from-network": 10,
    "to-network": 11,
    "from-crypto": 12,
    "to-crypto": 13,
}
AGENT_SUBTYPES = {
    "unspecified": 0,
    "message": 1,
    "agent-started": 2,
    "policy-updated": 3,
    "policy-deleted": 4,
    "endpoint-regenerate-success": 5,
    "endpoint-regenerate-failure": 6,
    "endpoint-created": 7,
    "endpoint-deleted": 8,
    "ipcache-upserted": 9,
    "ipcache-deleted": 10,
    "service-upserted": 11,
    "service-deleted": 12,
}
SUBTYPE_NAMES = {MESSAGE_TYPES["trace"]: TRACE_POINTS, MESSAGE_TYPES["agent"]: AGENT_SUBTYPES}
TCP_FLAGS = ("SYN", "FIN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS")
IP_VERSIONS = {
    **dict.fromkeys(("4", "v4", "ipv4", "ip4"), 1),  # flow.IPVersion IPv4
    **dict.fromkeys(("6", "v6", "ipv6", "ip6"), 2),  # IPv6
    "none": 0,  # IP_NOT_USED
}

# Flags that cannot be given together (in the whitelist, or together in the blacklist),
# as in Hubble: two ways of naming one side's peer, or a flag that takes only one value.
CONFLICTS: tuple[frozenset[str], ...] = tuple(
    frozenset(group)
    for group in (
        ("from-fqdn", "from-ip", "ip", "fqdn", "from-namespace", "namespace"),
        ("from-fqdn", "from-ip", "ip", "fqdn", "from-pod", "pod"),
        ("to-fqdn", "to-ip", "ip", "fqdn", "to-namespace", "namespace"),
        ("to-fqdn", "to-ip", "ip", "fqdn", "to-pod", "pod"),
        ("to-pod", "namespace"),
        ("from-pod", "namespace"),
        ("to-service", "namespace"),
        ("from-service", "namespace"),
        ("label", "from-label"),
        ("label", "to-label"),
        ("service", "from-service"),
        ("service", "to-service"),
        ("port", "to-port"),
        ("port", "from-port"),
        ("identity", "to-identity"),
        ("identity", "from-identity"),
        ("workload", "to-workload"),
        ("workload", "from-workload"),
        ("node-name", "cluster"),
    )
    if len(group) > 1
)


@dataclass(frozen=True)
class FilterFlag:
    """One of `hubble observe`'s filter flags: how it fills a FlowFilter."""

    name: str
    help: str
    short: str | None = None
    source: str | None = None  # FlowFilter field of the source side (or of both sides)
    destination: str | None = None  # the destination side's field
    either: bool = False  # two filters: value on the source side, or the destination side
    takes_value: bool = True  # False: a switch (--not, -4, -6)
    parse: Callable[[str, str], object] | None = None  # (value, flag) -> the field's item


def _flag(name: str) -> str:
    return f"--{name}"


# ---- value parsers (each raises UserError naming its flag) ------------------------------
def parse_verdict(value: str, flag: str) -> int:
    from membrane.hubble.flow import flow_pb2

    try:
        return flow_pb2.Verdict.Value(value.upper())
    except ValueError:
        names = ", ".join(n for n, _ in flow_pb2.Verdict.items() if n != "VERDICT_UNKNOWN")
        raise UserError(flag, f"{value!r} is not a verdict ({names})") from None


def parse_drop_reason(value: str, flag: str) -> int:
    from membrane.hubble.flow import flow_pb2

    if not value:
        raise UserError(flag, "is empty (give a drop reason such as POLICY_DENIED)")
    try:
        return flow_pb2.DropReason.Value(value.upper())
    except ValueError:
        raise UserError(
            flag, f"{value!r} is not a drop reason (e.g. POLICY_DENIED, POLICY_DENY)"
        ) from None


def parse_event_type(value: str, flag: str) -> flow_pb2.EventTypeFilter:
    """`TYPE[:SUBTYPE]`: a name or number each (`trace:to-endpoint`, `drop:133`, `5`)."""
    from membrane.hubble.flow import flow_pb2

    kind, sep, sub = value.partition(":")
    number = MESSAGE_TYPES.get(kind)
    if number is None:
        if not kind.isdigit() or int(kind) >= 1 << 31:
            raise UserError(
                flag, f"{kind!r} is not an event type ({', '.join(MESSAGE_TYPES)} or a number)"
            )
        number = int(kind)
    out = flow_pb2.EventTypeFilter(type=number)
    if sep:
        sub_number = SUBTYPE_NAMES.get(number, {}).get(sub)
        if sub_number is None:
            if not sub.isdigit() or int(sub) >= 1 << 31:
                names = ", ".join(SUBTYPE_NAMES.get(number, {})) or "a number"
                raise UserError(flag, f"{sub!r} is not a sub-type of {kind} ({names})")
            sub_number = int(sub)
        out.match_sub_type, out.sub_type = True, sub_number
    return out


def parse_tcp_flags(value: str, flag: str) -> flow_pb2.TCPFlags:
    """`SYN,ACK`: a flow must carry all of them (any case)."""
    from membrane.hubble.flow import flow_pb2

    flags = flow_pb2.TCPFlags()
    for name in value.split(","):
        if name.upper() not in TCP_FLAGS:
            raise UserError(flag, f"{name!r} is not a TCP flag ({', '.join(TCP_FLAGS)})")
        setattr(flags, name.upper(), True)
    return flags


def parse_traffic_direction(value: str, flag: str) -> int:
    from membrane.hubble.flow import flow_pb2

    direction = value.lower()
    if direction not in ("ingress", "egress"):
        raise UserError(flag, f"{value!r} is not a traffic direction (ingress or egress)")
    return flow_pb2.INGRESS if direction == "ingress" else flow_pb2.EGRESS


def parse_ip_version(value: str, flag: str) -> int:
    try:
        return IP_VERSIONS[value.lower()]
    except KeyError:
        raise UserError(flag, f"{value!r} is not an IP version (v4, v6 or none)") from None


@cache
def reserved_identities() -> dict[str, int]:
    """Reserved identities by name (`world`: 2)."""
    from membrane.identity.labels import RESERVED_NAMES

    return {name: number for number, name in RESERVED_NAMES.items()}


def parse_identity(value: str, flag: str) -> int:
    """A number or a reserved identity's name (`world`, `host`, `reserved:world`)."""
    name = value.removeprefix("reserved:")
    reserved = reserved_identities()
    if name in reserved:
        return reserved[name]
    if value.isdigit() and int(value) < 1 << 32:
        return int(value)
    names = ", ".join(reserved)
    raise UserError(flag, f"{value!r} is not an identity (a number, or one of {names})")


def parse_workload(value: str, flag: str) -> flow_pb2.Workload:
    """`name`, `Kind/name` or `Kind/` (any workload of that kind)."""
    from membrane.hubble.flow import flow_pb2

    kind, sep, name = value.partition("/")
    return flow_pb2.Workload(kind=kind, name=name) if sep else flow_pb2.Workload(name=value)


def parse_namespace(value: str, flag: str) -> str:
    if not value or "/" in value or any(c.isspace() for c in value):
        raise UserError(flag, f"{value!r} is not a namespace name")
    return value


def _sides(
    name: str,
    source: str,
    destination: str,
    help: str,
    short: str | None = None,
    parse: Callable[[str, str], object] | None = None,
) -> list[FilterFlag]:
    """The three flags of one criterion: `--from-X`, `--X` (either side), `--to-X`."""
    return [
        FilterFlag(f"from-{name}", help.format(side="the source"), source=source, parse=parse),
        FilterFlag(
            name,
            help.format(side="either side (two filters, ORed)"),
            short=short,
            source=source,
            destination=destination,
            either=True,
            parse=parse,
        ),
        FilterFlag(
            f"to-{name}", help.format(side="the destination"), source=destination, parse=parse
        ),
    ]


FILTER_FLAGS: tuple[FilterFlag, ...] = (
    FilterFlag("not", "Send the next filter flag to the blacklist.", takes_value=False),
    FilterFlag("uuid", "Only the flow with this unique id.", source="uuid"),
    *_sides(
        "ip",
        "source_ip",
        "destination_ip",
        "Address (198.18.0.5) or CIDR (198.18.0.0/16) of {side}.",
    ),
    FilterFlag("ipv4", "Only IPv4 flows.", short="-4", takes_value=False),
    FilterFlag("ipv6", "Only IPv6 flows.", short="-6", takes_value=False),
    FilterFlag("ip-version", "v4, v6 or none.", source="ip_version", parse=parse_ip_version),
    *_sides(
        "pod",
        "source_pod",
        "destination_pod",
        "Pod of {side}: [NAMESPACE/]NAME-PREFIX (namespace default when not given; "
        "NAMESPACE/ for all its pods).",
    ),
    *_sides(
        "namespace",
        "source_pod",
        "destination_pod",
        "Namespace of {side}; also the namespace of --pod/--service names without one.",
        short="-n",
        parse=parse_namespace,
    ),
    *_sides(
        "label",
        "source_label",
        "destination_label",
        "Label selector of {side}'s endpoint: app=web, 'k8s:app in (a,b)', !canary, "
        "reserved:world (the source prefix k8s: is optional).",
        short="-l",
    ),
    *_sides(
        "identity",
        "source_identity",
        "destination_identity",
        "Security identity of {side}: a number or a reserved name (world, host, ...).",
        parse=parse_identity,
    ),
    *_sides(
        "port",
        "source_port",
        "destination_port",
        "L4 port of {side} (TCP, UDP, SCTP).",
    ),
    *_sides(
        "service",
        "source_service",
        "destination_service",
        "Service of {side}: [NAMESPACE/]NAME-PREFIX.",
    ),
    *_sides(
        "fqdn",
        "source_fqdn",
        "destination_fqdn",
        "DNS name of {side}, with * wildcards (*.example.com).",
    ),
    *_sides(
        "workload",
        "source_workload",
        "destination_workload",
        "Workload of {side}: NAME, KIND/NAME or KIND/.",
        parse=parse_workload,
    ),
    FilterFlag(
        "verdict",
        "FORWARDED, DROPPED, AUDIT, REDIRECTED, ERROR, TRACED or TRANSLATED.",
        source="verdict",
        parse=parse_verdict,
    ),
    FilterFlag(
        "drop-reason-desc",
        "Drop reason: POLICY_DENIED, POLICY_DENY, INVALID_SOURCE_IP, ...",
        source="drop_reason_desc",
        parse=parse_drop_reason,
    ),
    FilterFlag(
        "type",
        "Event type TYPE[:SUBTYPE]: drop, trace (trace:to-endpoint, trace:from-endpoint, "
        "...), policy-verdict, l7, capture, trace-sock; or numbers (drop:133).",
        short="-t",
        source="event_type",
        parse=parse_event_type,
    ),
    FilterFlag(
        "protocol",
        "tcp, udp, sctp, icmp (v4 or v6), icmpv4, icmpv6; http, dns (never in our flows).",
        source="protocol",
    ),
    FilterFlag(
        "tcp-flags",
        "TCP flags the flow carries, all of them: SYN, SYN,ACK, FIN, RST, ...",
        source="tcp_flags",
        parse=parse_tcp_flags,
    ),
    FilterFlag(
        "traffic-direction",
        "ingress or egress (as seen by the endpoint).",
        source="traffic_direction",
        parse=parse_traffic_direction,
    ),
    FilterFlag(
        "node-name", "Node name pattern: NODE or CLUSTER/NODE, * wildcards.", source="node_name"
    ),
    FilterFlag("cluster", "Cluster name pattern (* wildcards).", source="node_name"),
    FilterFlag("http-status", "HTTP status (404) or prefix (5+).", source="http_status_code"),
    FilterFlag("http-method", "HTTP method (get, post).", source="http_method"),
    FilterFlag("http-path", "HTTP path regular expression.", source="http_path"),
    FilterFlag("trace-id", "Trace id of the flow's request.", source="trace_id"),
)
BY_NAME = {f.name: f for f in FILTER_FLAGS}
NAMESPACE_FLAGS = {"namespace": "ns", "from-namespace": "src_ns", "to-namespace": "dst_ns"}


# ---- Hubble's filter tracker ------------------------------------------------------------
@dataclass
class _Tracker:
    """One list (whitelist or blacklist) being built: the left (source side) and right
    (destination side) filters, which are ORed; and namespaces applied at the end."""

    left: flow_pb2.FlowFilter | None = None
    right: flow_pb2.FlowFilter | None = None
    ns: list[str] = field(default_factory=list)
    src_ns: list[str] = field(default_factory=list)
    dst_ns: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def sides(self, left: bool = True, right: bool = True) -> list[flow_pb2.FlowFilter]:
        from membrane.hubble.flow import flow_pb2

        if left and self.left is None:
            self.left = flow_pb2.FlowFilter()
        if right and self.right is None:
            self.right = flow_pb2.FlowFilter()
        return [f for f, on in ((self.left, left), (self.right, right)) if on and f is not None]

    def filters(self) -> list[flow_pb2.FlowFilter]:
        if self.left is None and self.right is None and not self._any_namespace():
            return []
        left, right = self.sides()
        for f in (left, right):
            if self.dst_ns:
                _apply_namespaces(f, self.dst_ns, "destination")
            if self.src_ns:
                _apply_namespaces(f, self.src_ns, "source")
        if self.ns:
            _apply_namespaces(left, self.ns, "source")
            _apply_namespaces(right, self.ns, "destination")
        return [left] if left == right else [left, right]

    def _any_namespace(self) -> bool:
        return bool(self.ns or self.src_ns or self.dst_ns)


def _apply_namespaces(ff: flow_pb2.FlowFilter, namespaces: list[str], side: str) -> None:
    """Names without a namespace get each of `namespaces`; without any pod or service
    name, the side is the whole namespaces (`ns/`)."""
    pods, services = getattr(ff, f"{side}_pod"), getattr(ff, f"{side}_service")
    if not pods and not services:
        pods.append("")
    for names in (pods, services):
        qualified = [name if "/" in name else f"{ns}/{name}" for name in names for ns in namespaces]
        # names that had a namespace appear once, not once per namespace
        del names[:]
        names.extend(dict.fromkeys(qualified))


class FlowFilterOptions:
    """Filter flags in command-line order -> whitelist and blacklist."""

    def __init__(self) -> None:
        self._whitelist = _Tracker()
        self._blacklist = _Tracker()
        self._negate_next = False

    def add(self, name: str, value: str | None = None) -> None:
        """The flag `--NAME` (no dashes) with its value (None for a switch)."""
        flag = BY_NAME[name]
        if name == "not":
            if self._negate_next:
                raise UserError("--not", "given twice in a row (it negates the next filter)")
            self._negate_next = True
            return
        tracker = self._blacklist if self._negate_next else self._whitelist
        self._negate_next = False
        self._set(tracker, flag, value)

    def lists(self) -> tuple[list[flow_pb2.FlowFilter], list[flow_pb2.FlowFilter]]:
        """(whitelist, blacklist); checked as the agent will check them."""
        if self._negate_next:
            raise UserError("--not", "comes last: it must be followed by a filter flag")
        whitelist, blacklist = self._whitelist.filters(), self._blacklist.filters()
        if not whitelist and not blacklist:  # nothing to check: the checks stay unimported
            return whitelist, blacklist
        from membrane.observe.flowfilter import FlowMatcher

        try:
            FlowMatcher.build(whitelist, blacklist)
        except UserError as err:  # e.g. a namespace turned a pod name into a bad one
            raise UserError(_flag_of_field(err.field), err.problem) from None
        return whitelist, blacklist

    def _set(self, tracker: _Tracker, flag: FilterFlag, value: str | None) -> None:
        from membrane.hubble.flow import flow_pb2

        option = _flag(flag.name)
        if flag.name not in tracker.changed:
            tracker.changed.append(flag.name)
            for group in CONFLICTS:
                if flag.name in group:
                    for other in tracker.changed:
                        if other != flag.name and other in group:
                            raise UserError(option, f"cannot be combined with --{other}")
        if flag.name in ("ipv4", "ipv6"):
            version = flow_pb2.IPv4 if flag.name == "ipv4" else flow_pb2.IPv6
            for ff in tracker.sides():
                ff.ip_version.append(version)
            return
        assert value is not None and flag.source is not None
        item = flag.parse(value, option) if flag.parse else value
        if flag.name in NAMESPACE_FLAGS:
            getattr(tracker, NAMESPACE_FLAGS[flag.name]).append(item)
            self._check_namespaces(tracker, option)
            return
        if flag.name == "cluster":
            item = f"{value}/"
        if isinstance(item, str):
            _check_value(flag.source, item, option)
        if flag.either:
            assert flag.destination is not None
            _append(tracker.sides(right=False)[0], flag.source, item)
            _append(tracker.sides(left=False)[0], flag.destination, item)
        else:
            for ff in tracker.sides():
                _append(ff, flag.source, item)
        self._check_namespaces(tracker, option)

    @staticmethod
    def _check_namespaces(tracker: _Tracker, option: str) -> None:
        """A pod or service in another namespace than --namespace (or --from/--to-namespace)
        gave can match nothing: Hubble refuses it, so do we."""
        source, destination = (
            ("source_pod", "source_service"),
            (
                "destination_pod",
                "destination_service",
            ),
        )
        checks = (
            (tracker.ns, source + destination),
            (tracker.src_ns, source),
            (tracker.dst_ns, destination),
        )
        for ff in (tracker.left, tracker.right):
            if ff is None:
                continue
            for namespaces, fields in checks:
                for ns in namespaces:
                    for name in (n for f in fields for n in getattr(ff, f)):
                        named, sep, _ = name.partition("/")
                        if sep and named != ns:
                            raise UserError(option, f"namespace {ns!r} does not contain {name!r}")


def _flag_of_field(name: str) -> str:
    """The flag that fills FlowFilter field `name` (source_pod: --from-pod)."""
    for side, prefix in (("source_", "from-"), ("destination_", "to-")):
        if name.startswith(side):
            return "--" + prefix + name.removeprefix(side).replace("_", "-")
    return "--" + name.replace("_", "-")


def _append(ff: flow_pb2.FlowFilter, field_name: str, item: object) -> None:
    values = getattr(ff, field_name)
    if isinstance(item, str | int | bool):
        values.append(item)
    else:
        values.add().CopyFrom(item)


def _check_value(field_name: str, value: str, option: str) -> None:
    """The agent's check of one value, reported by the flag that gave it."""
    from membrane.hubble.flow import flow_pb2
    from membrane.observe.flowfilter import compile_filter

    try:
        compile_filter(flow_pb2.FlowFilter(**{field_name: [value]}))
    except UserError as err:
        raise UserError(option, err.problem) from None


# ---- times ------------------------------------------------------------------------------
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1, "m": 60}
_UNIT_SECONDS["h"] = 3600
_ABSOLUTE_FORMATS = (
    "%Y-%m-%d",
    "%Y-%m-%dT%H%z",
    "%Y-%m-%dT%H:%M%z",
    "%Y-%m-%dT%H:%M:%S%z",
    "%Y-%m-%dT%H:%M:%S.%f%z",
    "%a, %d %b %Y %H:%M:%S %z",
)


def parse_duration(text: str) -> timedelta | None:
    """A Go duration (`5m`, `1h30m`, `1.5h`, `300ms`), as Hubble reads --since/--until."""
    sign, rest = (-1, text[1:]) if text.startswith("-") else (1, text.removeprefix("+"))
    if rest == "0":
        return timedelta(0)
    pos, seconds = 0, 0.0
    while pos < len(rest):
        m = _DURATION_PART.match(rest, pos)
        if m is None:
            return None
        seconds += float(m[1]) * _UNIT_SECONDS[m[2]]
        pos = m.end()
    return timedelta(seconds=sign * seconds) if rest else None


def parse_time(text: str, flag: str, now: datetime | None = None) -> Timestamp:
    """`--since`/`--until`: a duration back from now (`5m`, `1h30m`) or an RFC 3339 time
    (`2026-12-06T10:00:00Z`, also with fractions, an offset, or only a date)."""
    from google.protobuf.timestamp_pb2 import Timestamp

    now = now or datetime.now(UTC)
    duration = parse_duration(text)
    if duration is not None:
        at = now - duration
    else:
        at = None
        candidate = re.sub(r"(?i)z$", "+00:00", text)
        # Python's %f takes up to 6 digits: cut nanoseconds (Hubble keeps them; a
        # microsecond is well below a flow's timing anyway)
        candidate = re.sub(r"(\.\d{6})\d+", r"\1", candidate)
        for layout in _ABSOLUTE_FORMATS:
            try:
                at = datetime.strptime(candidate, layout)
            except ValueError:
                continue
            if at.tzinfo is None:
                at = at.replace(tzinfo=UTC)
            break
        if at is None:
            raise UserError(
                flag, f"{text!r} is neither a duration (5m, 1h30m) nor an RFC 3339 time"
            )
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


# ---- the request ------------------------------------------------------------------------
def parse_raw_filters(values: Iterable[str], flag: str) -> list[flow_pb2.FlowFilter]:
    """`--allowlist`/`--denylist`: FlowFilters in Hubble's JSON (proto field names)."""
    if not values:  # the common case: no JSON to parse, no json_format to import
        return []
    from google.protobuf import json_format

    from membrane.hubble.flow import flow_pb2

    out = []
    for value in values:
        try:
            out.append(json_format.Parse(value, flow_pb2.FlowFilter()))
        except json_format.ParseError as err:
            raise UserError(flag, f"{value!r} is not a FlowFilter in JSON: {err}") from None
    return out


def flows_request(
    filter_flags: Sequence[tuple[str, str | None]] = (),
    *,
    last: int = 0,
    first: int = 0,
    all_flows: bool = False,
    follow: bool = False,
    since: str | None = None,
    until: str | None = None,
    allowlist: Sequence[str] = (),
    denylist: Sequence[str] = (),
    now: datetime | None = None,
) -> observer_pb2.GetFlowsRequest:
    """The GetFlowsRequest of `hubble observe` with these options; `filter_flags` are
    (flag name without dashes, value or None) in command-line order."""
    from membrane.hubble.observer import observer_pb2

    for name, value in (("--last", last), ("--first", first)):
        if value < 0:
            raise UserError(name, f"{value} is negative")
    if first and last:
        raise UserError("--first", "cannot be combined with --last")
    if first and all_flows:
        raise UserError("--first", "cannot be combined with --all")
    if first and follow:
        raise UserError("--first", "cannot be combined with --follow")
    if last and all_flows:
        raise UserError("--last", "cannot be combined with --all")
    options = FlowFilterOptions()
    for name, value in filter_flags:
        options.add(name, value)
    whitelist, blacklist = options.lists()
    whitelist += parse_raw_filters(allowlist, "--allowlist")
    blacklist += parse_raw_filters(denylist, "--denylist")
    if allowlist or denylist:
        from membrane.observe.flowfilter import FlowMatcher

        try:
            FlowMatcher.build(whitelist, blacklist)
        except UserError as err:
            raise UserError("--allowlist/--denylist", str(err)) from None
    request = observer_pb2.GetFlowsRequest(
        follow=follow, first=bool(first), whitelist=whitelist, blacklist=blacklist
    )
    if since:
        request.since.CopyFrom(parse_time(since, "--since", now))
    if until and not follow:  # a follow goes on: Hubble drops --until with -f
        request.until.CopyFrom(parse_time(until, "--until", now))
    number = first or last
    if not since and not (until and not follow) and not first:
        if all_flows:
            number = ALL_FLOWS
        elif not last and not follow:
            number = DEFAULT_LAST
    request.number = number
    return request


def raw_filters_yaml(request: observer_pb2.GetFlowsRequest) -> str:
    """`--print-raw-filters`: the lists as Hubble prints them, YAML with one JSON
    FlowFilter per item (proto field names, enums as numbers), ready for
    --allowlist/--denylist."""
    from google.protobuf import json_format

    lines = []
    for key, filters in (("allowlist", request.whitelist), ("denylist", request.blacklist)):
        if not filters:
            continue
        lines.append(f"{key}:")
        for ff in filters:
            text = json.dumps(
                json_format.MessageToDict(
                    ff, preserving_proto_field_name=True, use_integers_for_enums=True
                ),
                separators=(",", ":"),
            )
            lines.append("    - '" + text.replace("'", "''") + "'")
    return "".join(line + "\n" for line in lines) or "{}\n"
