"""Hubble's flow filters: `membrane observe` flags -> the FlowFilter lists Hubble's CLI would
send (what --print-raw-filters shows) -> which of a fixed set of flows pass the matcher.

The cases are the examples of Hubble's documentation and `hubble observe --help`, with
addresses of our plan (198.18.0.0/15, 2001:db8::/32)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from google.protobuf import json_format
from observe_support import FakeResolver, event, world_drop

from membrane.errors import UserError
from membrane.hubble.flow import flow_pb2 as pb
from membrane.observe.filter_options import (
    ALL_FLOWS,
    DEFAULT_LAST,
    flows_request,
    parse_duration,
    raw_filters_yaml,
)
from membrane.observe.flowfilter import FlowMatcher, parse_label_selector
from membrane.observe.record import flow_record

DROP, TRACE, POLICY_VERDICT = 1, 4, 5  # Cilium's monitor message types
TO_ENDPOINT = 0  # a trace's observation point


def endpoint(ep: pb.Endpoint, ns: str, pod: str, identity: int, *labels: str) -> None:
    ep.namespace, ep.pod_name, ep.identity = ns, pod, identity
    ep.labels.extend([*labels, f"k8s:io.kubernetes.pod.namespace={ns}"] if ns else labels)


def make_flow(
    src: tuple[str, ...],
    dst: tuple[str, ...],
    saddr: str,
    daddr: str,
    l4: str,
    sport: int = 0,
    dport: int = 0,
    flags: str = "",
    verdict: int = pb.FORWARDED,
    event: tuple[int, int] = (POLICY_VERDICT, 0),
    direction: int = pb.INGRESS,
    reply: bool = False,
) -> pb.Flow:
    flow = pb.Flow(verdict=verdict, node_name="node-1", traffic_direction=direction)
    endpoint(flow.source, *src)
    endpoint(flow.destination, *dst)
    flow.IP.source, flow.IP.destination = saddr, daddr
    flow.IP.ipVersion = pb.IPv6 if ":" in saddr else pb.IPv4
    proto = getattr(flow.l4, l4)
    if l4 in ("TCP", "UDP"):
        proto.source_port, proto.destination_port = sport, dport
    else:
        proto.type = 128
    for name in filter(None, flags.split(",")):
        setattr(flow.l4.TCP.flags, name, True)
    flow.event_type.type, flow.event_type.sub_type = event
    if verdict == pb.DROPPED:
        flow.drop_reason_desc = pb.POLICY_DENIED
    flow.is_reply.value = reply
    return flow


WEB = ("shop", "web-1", 300, "k8s:app=web")
DB = ("shop", "db-0", 301, "k8s:app=db")
DNS = ("kube-system", "coredns-5d", 302, "k8s:k8s-app=kube-dns")
CLIENT = ("default", "client", 303, "k8s:app=client")
WORLD = ("", "", 2, "reserved:world")
FLOWS = {
    # web opens a connection to the database
    "web>db": make_flow(
        WEB, DB, "198.18.0.10", "198.18.0.20", "TCP", 41000, 5432, "SYN", direction=pb.EGRESS
    ),
    # the database answers
    "db>web": make_flow(
        DB, WEB, "198.18.0.20", "198.18.0.10", "TCP", 5432, 41000, "SYN,ACK", reply=True
    ),
    # a DNS answer to a client in namespace default
    "dns>client": make_flow(DNS, CLIENT, "198.18.1.5", "198.18.2.7", "UDP", 53, 40000, reply=True),
    # the world is denied on web's port 80
    "world>web": make_flow(
        WORLD,
        WEB,
        "198.19.0.50",
        "198.18.0.10",
        "TCP",
        51000,
        80,
        "SYN",
        verdict=pb.DROPPED,
        event=(DROP, pb.POLICY_DENIED),
    ),
    # an IPv6 ping, traced as it is delivered to web
    "client>web6": make_flow(
        CLIENT, WEB, "2001:db8::7", "2001:db8::10", "ICMPv6", event=(TRACE, TO_ENDPOINT)
    ),
}


def flags(*args: str) -> list[tuple[str, str | None]]:
    """Command-line filter flags as (name, value) pairs: `--name value`, or a switch."""
    switches = {"--not": "not", "-4": "ipv4", "-6": "ipv6"}
    shorts = {"-n": "namespace", "-l": "label", "-t": "type"}
    out, items = [], iter(args)
    for arg in items:
        if arg in switches:
            out.append((switches[arg], None))
        else:
            out.append((shorts.get(arg, arg.removeprefix("--")), next(items)))
    return out


def as_dicts(filters: list[pb.FlowFilter]) -> list[dict]:
    return [
        json_format.MessageToDict(f, preserving_proto_field_name=True, use_integers_for_enums=True)
        for f in filters
    ]


# (flags, whitelist, blacklist, the flows that pass)
CASES = [
    (
        ("--from-pod", "kube-system/"),
        [{"source_pod": ["kube-system/"]}],
        [],
        {"dns>client"},
    ),
    (
        ("--ip", "198.18.0.0/24"),
        [{"source_ip": ["198.18.0.0/24"]}, {"destination_ip": ["198.18.0.0/24"]}],
        [],
        {"web>db", "db>web", "world>web"},
    ),
    (
        ("--ip", "2001:db8::/32", "--ip", "198.18.2.7"),
        [
            {"source_ip": ["2001:db8::/32", "198.18.2.7"]},
            {"destination_ip": ["2001:db8::/32", "198.18.2.7"]},
        ],
        [],
        {"dns>client", "client>web6"},
    ),
    (
        ("--label", "app=web"),
        [{"source_label": ["app=web"]}, {"destination_label": ["app=web"]}],
        [],
        {"web>db", "db>web", "world>web", "client>web6"},
    ),
    (
        ("--from-label", "reserved:world"),
        [{"source_label": ["reserved:world"]}],
        [],
        {"world>web"},
    ),
    (
        ("--to-label", "k8s:app in (db, client)"),
        [{"destination_label": ["k8s:app in (db, client)"]}],
        [],
        {"web>db", "dns>client"},
    ),
    (
        ("--not", "--verdict", "FORWARDED"),
        [],
        [{"verdict": [pb.FORWARDED]}],
        {"world>web"},
    ),
    (
        ("--verdict", "DROPPED", "--verdict", "FORWARDED"),
        [{"verdict": [pb.DROPPED, pb.FORWARDED]}],
        [],
        set(FLOWS),
    ),
    (
        ("--port", "53", "--protocol", "udp"),
        [
            {"protocol": ["udp"], "source_port": ["53"]},
            {"protocol": ["udp"], "destination_port": ["53"]},
        ],
        [],
        {"dns>client"},
    ),
    (
        ("--to-port", "5432"),
        [{"destination_port": ["5432"]}],
        [],
        {"web>db"},
    ),
    (
        ("--tcp-flags", "SYN,ACK"),
        [{"tcp_flags": [{"SYN": True, "ACK": True}]}],
        [],
        {"db>web"},
    ),
    (
        ("--tcp-flags", "syn"),
        [{"tcp_flags": [{"SYN": True}]}],
        [],
        {"web>db", "db>web", "world>web"},
    ),
    (
        ("-t", "drop"),
        [{"event_type": [{"type": DROP}]}],
        [],
        {"world>web"},
    ),
    (
        ("-t", "trace:to-endpoint"),
        [{"event_type": [{"type": TRACE, "match_sub_type": True}]}],
        [],
        {"client>web6"},
    ),
    (
        ("-t", "policy-verdict", "-t", "drop:133"),
        [
            {
                "event_type": [
                    {"type": POLICY_VERDICT},
                    {"type": DROP, "match_sub_type": True, "sub_type": 133},
                ]
            }
        ],
        [],
        {"web>db", "db>web", "dns>client", "world>web"},
    ),
    (
        ("--traffic-direction", "egress"),
        [{"traffic_direction": [pb.EGRESS]}],
        [],
        {"web>db"},
    ),
    (
        ("-n", "shop"),
        [{"source_pod": ["shop/"]}, {"destination_pod": ["shop/"]}],
        [],
        {"web>db", "db>web", "world>web", "client>web6"},
    ),
    (
        ("--pod", "web", "-n", "shop"),
        [{"source_pod": ["shop/web"]}, {"destination_pod": ["shop/web"]}],
        [],
        {"web>db", "db>web", "world>web", "client>web6"},
    ),
    (
        ("--pod", "client"),  # without a namespace: namespace default
        [{"source_pod": ["client"]}, {"destination_pod": ["client"]}],
        [],
        {"dns>client", "client>web6"},
    ),
    (
        ("--from-namespace", "shop", "--to-namespace", "shop"),
        [{"source_pod": ["shop/"], "destination_pod": ["shop/"]}],
        [],
        {"web>db", "db>web"},
    ),
    (
        ("--identity", "world"),
        [{"source_identity": [2]}, {"destination_identity": [2]}],
        [],
        {"world>web"},
    ),
    (
        ("--drop-reason-desc", "POLICY_DENIED"),
        [{"drop_reason_desc": [pb.POLICY_DENIED]}],
        [],
        {"world>web"},
    ),
    (
        ("-6",),
        [{"ip_version": [pb.IPv6]}],
        [],
        {"client>web6"},
    ),
    (
        ("--protocol", "icmp"),  # either family, as in Hubble
        [{"protocol": ["icmp"]}],
        [],
        {"client>web6"},
    ),
    (
        ("--protocol", "http"),  # an L7 protocol: our flows carry no L7 record
        [{"protocol": ["http"]}],
        [],
        set(),
    ),
    (
        ("--node-name", "node-*"),
        [{"node_name": ["node-*"]}],
        [],
        set(FLOWS),
    ),
    (
        ("--cluster", "other"),
        [{"node_name": ["other/"]}],
        [],
        set(),
    ),
    (
        # --not negates only the next flag; the negated flags form one blacklist filter:
        # left out are flows to shop's database on 5432 (not every flow to 5432)
        ("--to-pod", "shop/", "--not", "--to-port", "5432", "--not", "--from-pod", "shop/web"),
        [{"destination_pod": ["shop/"]}],
        [{"source_pod": ["shop/web"], "destination_port": ["5432"]}],
        {"db>web", "world>web", "client>web6"},
    ),
    (
        ("--not", "--label", "app=web", "--not", "--label", "app=db"),
        [],
        [
            {"source_label": ["app=web", "app=db"]},
            {"destination_label": ["app=web", "app=db"]},
        ],
        {"dns>client"},
    ),
]


@pytest.mark.parametrize(("args", "whitelist", "blacklist", "passing"), CASES, ids=str)
def test_hubble_examples(
    args: tuple[str, ...], whitelist: list, blacklist: list, passing: set[str]
) -> None:
    request = flows_request(flags(*args))
    assert as_dicts(list(request.whitelist)) == whitelist
    assert as_dicts(list(request.blacklist)) == blacklist
    matcher = FlowMatcher.build(request.whitelist, request.blacklist)
    assert {name for name, flow in FLOWS.items() if matcher.matches(flow)} == passing


def test_raw_filters_print_as_hubble_does() -> None:
    request = flows_request(flags("--from-pod", "kube-system/", "--not", "--verdict", "DROPPED"))
    assert raw_filters_yaml(request) == (
        "allowlist:\n"
        '    - \'{"source_pod":["kube-system/"]}\'\n'
        "denylist:\n"
        "    - '{\"verdict\":[2]}'\n"
    )
    assert raw_filters_yaml(flows_request()) == "{}\n"
    # what it prints is what --allowlist/--denylist read back
    again = flows_request(
        allowlist=['{"source_pod":["kube-system/"]}'], denylist=['{"verdict":[2]}']
    )
    assert (again.whitelist, again.blacklist) == (request.whitelist, request.blacklist)


# ---- the rules around the filters -------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "flag", "problem"),
    [
        (("--from-ip", "1.2.3"), "--from-ip", "'1.2.3' is not an address or CIDR"),
        (("--ip", "198.18.0.0/33"), "--ip", "is not an address or CIDR"),
        (("--to-port", "70000"), "--to-port", "not a port number"),
        (("--pod", "/"), "--pod", "give [namespace/][<name prefix>]"),
        (("--label", "app = = web"), "--label", "not a label selector"),
        (("--protocol", "gre"), "--protocol", "unknown protocol"),
        (("--verdict", "ALLOWED"), "--verdict", "not a verdict"),
        (("--drop-reason-desc", "NOPE"), "--drop-reason-desc", "not a drop reason"),
        (("-t", "bogus"), "--type", "not an event type"),
        (("-t", "trace:to-nowhere"), "--type", "not a sub-type of trace"),
        (("--tcp-flags", "SYN,XMAS"), "--tcp-flags", "'XMAS' is not a TCP flag"),
        (("--traffic-direction", "up"), "--traffic-direction", "ingress or egress"),
        (("--identity", "nobody"), "--identity", "not an identity"),
        (("--node-name", "a/b/c"), "--node-name", "too many slashes"),
        (("--http-status", "99"), "--http-status", "give a code"),
        (("-n", "a/b"), "--namespace", "not a namespace name"),
        # Hubble's conflicts: two ways of naming one side, or a flag and its one-sided form
        (("--from-pod", "a/x", "-n", "a"), "--namespace", "cannot be combined with --from-pod"),
        (("--ip", "198.18.0.1", "--from-ip", "198.18.0.2"), "--from-ip", "--ip"),
        (("--label", "a", "--to-label", "b"), "--to-label", "cannot be combined with --label"),
        (("--pod", "b/x", "-n", "a"), "--namespace", "namespace 'a' does not contain 'b/x'"),
        (("--not", "--not", "--verdict", "DROPPED"), "--not", "twice in a row"),
        (("--verdict", "DROPPED", "--not"), "--not", "followed by a filter flag"),
    ],
)
def test_bad_flags_are_named(args: tuple[str, ...], flag: str, problem: str) -> None:
    with pytest.raises(UserError) as err:
        flows_request(flags(*args))
    assert err.value.field == flag
    assert problem in err.value.problem


def test_a_conflict_is_per_list() -> None:
    """--ip and --not --from-ip: one in each list, which Hubble allows."""
    request = flows_request(flags("--ip", "198.18.0.0/16", "--not", "--from-ip", "198.18.0.1"))
    assert len(request.whitelist) == 2 and len(request.blacklist) == 1


NOW = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("options", "number", "first", "follow"),
    [
        ({}, DEFAULT_LAST, False, False),  # plain `observe`: the last 20
        ({"last": 5}, 5, False, False),
        ({"first": 7}, 7, True, False),
        ({"all_flows": True}, ALL_FLOWS, False, False),
        ({"follow": True}, 0, False, True),  # only new flows
        ({"follow": True, "last": 3}, 3, False, True),
        ({"since": "5m"}, 0, False, False),  # all since then
        ({"since": "5m", "last": 4}, 4, False, False),
    ],
)
def test_selectors(options: dict, number: int, first: bool, follow: bool) -> None:
    request = flows_request(now=NOW, **options)
    assert (request.number, request.first, request.follow) == (number, first, follow)


def test_since_and_until() -> None:
    request = flows_request(since="1h30m", until="2026-12-06T11:59:00.123456789Z", now=NOW)
    assert request.since.ToDatetime(tzinfo=UTC) == datetime(2026, 12, 6, 10, 30, tzinfo=UTC)
    assert request.until.ToDatetime(tzinfo=UTC) == datetime(
        2026, 12, 6, 11, 59, 0, 123456, tzinfo=UTC
    )
    offset = flows_request(since="2026-12-06T13:00:00+02:00", now=NOW)
    assert offset.since.ToDatetime(tzinfo=UTC) == datetime(2026, 12, 6, 11, 0, tzinfo=UTC)
    day = flows_request(since="2026-12-06", now=NOW)
    assert day.since.ToDatetime(tzinfo=UTC) == datetime(2026, 12, 6, tzinfo=UTC)
    # with --follow the stream goes on: --until is not sent (as Hubble)
    assert not flows_request(until="5m", follow=True, now=NOW).HasField("until")
    assert parse_duration("300ms").total_seconds() == 0.3
    assert parse_duration("1.5h").total_seconds() == 5400
    assert parse_duration("5 minutes") is None


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"first": 1, "last": 1}, "--first"),
        ({"first": 1, "all_flows": True}, "--first"),
        ({"first": 1, "follow": True}, "--first"),
        ({"last": 1, "all_flows": True}, "--last"),
        ({"last": -1}, "--last"),
        ({"since": "yesterday"}, "--since"),
        ({"until": "2026-13-01"}, "--until"),
        ({"allowlist": ["{not json"]}, "--allowlist"),
        ({"denylist": ['{"no_such_field": 1}']}, "--denylist"),
    ],
)
def test_bad_selectors_are_named(options: dict, flag: str) -> None:
    with pytest.raises(UserError) as err:
        flows_request(now=NOW, **options)
    assert err.value.field == flag


# ---- the matcher alone ------------------------------------------------------------------
def passing(whitelist: list[dict], blacklist: list[dict] = ()) -> set[str]:
    matcher = FlowMatcher.build(
        [json_format.ParseDict(f, pb.FlowFilter()) for f in whitelist],
        [json_format.ParseDict(f, pb.FlowFilter()) for f in blacklist],
    )
    return {name for name, flow in FLOWS.items() if matcher.matches(flow)}


def test_lists_and_fields() -> None:
    assert passing([]) == set(FLOWS)  # no whitelist: everything
    assert passing([{}]) == set(FLOWS)  # an empty filter matches every flow
    assert passing([], [{}]) == set()  # ... also in the blacklist
    # fields of one filter AND; filters of one list OR
    assert passing([{"verdict": [pb.FORWARDED], "protocol": ["udp"]}]) == {"dns>client"}
    assert passing([{"verdict": [pb.DROPPED]}, {"protocol": ["udp"]}]) == {
        "world>web",
        "dns>client",
    }
    assert passing([{"reply": [True]}]) == {"db>web", "dns>client"}
    assert passing([{"uuid": ["nope"]}]) == set()


def test_a_flow_without_is_reply_matches_no_reply_filter() -> None:
    flow = pb.Flow()
    flow.CopyFrom(FLOWS["web>db"])
    flow.ClearField("is_reply")
    for value in (True, False):
        assert not FlowMatcher.build([pb.FlowFilter(reply=[value])]).matches(flow)


@pytest.mark.parametrize(
    ("selector", "matching"),
    [
        ("app=web", {"web"}),
        ("k8s:app=web", {"web"}),
        ("any:app==web", {"web"}),
        ("reserved:app=web", set()),  # the source must match when given
        ("app!=web", {"db", "world"}),  # true where the key is absent, as in Kubernetes
        ("app notin (web, db)", {"world"}),
        ("app in (web,db)", {"web", "db"}),
        ("app", {"web", "db"}),
        ("!app", {"world"}),
        ("reserved:world", {"world"}),
        ("app=web,io.kubernetes.pod.namespace=shop", {"web"}),
        ("", {"web", "db", "world"}),  # the empty selector selects every endpoint
    ],
)
def test_label_selectors(selector: str, matching: set[str]) -> None:
    endpoints = {
        "web": ("k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop"),
        "db": ("k8s:app=db", "k8s:io.kubernetes.pod.namespace=shop"),
        "world": ("reserved:world",),
    }
    matched = set()
    for name, labels in endpoints.items():
        flow = pb.Flow()
        flow.source.labels.extend(labels)
        if FlowMatcher.build([pb.FlowFilter(source_label=[selector])]).matches(flow):
            matched.add(name)
    assert matched == matching
    parse_label_selector.cache_clear()


@pytest.mark.parametrize(
    ("selectors", "label_sets"),
    [
        # (label set, selected?) as Hubble's label filter decides them
        (["l1", "l2"], [(["l1"], 1), (["l1=v1"], 1), (["l2", "l3", "l4=v4"], 1), (["l3"], 0)]),
        (
            ["l1=v1", "l2=v2"],
            [
                (["l1"], 0),
                (["l1=v1"], 1),
                (["l1=v2", "l2=v1", "l3"], 0),
                (["l2=v2", "l3"], 1),
                ([""], 0),
                ([], 0),
                (["l1=v1=more"], 0),  # the value is "v1=more"
            ],
        ),
        (
            ["l1 in (v1, v2), l3 notin ()"],
            [(["l1"], 0), (["l1=v2", "l3=v3"], 1), (["l2=v2", "l3"], 0), (["l1=v1"], 1)],
        ),
        (
            ["k8s:app=bar", "foo", "reserved:host"],
            [
                (["k8s:app=bar"], 1),
                (["k8s:foo=baz"], 1),
                (["k8s.app=bar"], 0),  # a dot is no source prefix
                (["container:foo=bar"], 1),  # any source name counts
            ],
        ),
        (["any:key"], [(["key"], 1), (["reserved:key"], 1), (["any.key"], 0)]),
    ],
)
def test_label_filters_as_hubble(selectors: list[str], label_sets: list) -> None:
    matcher = FlowMatcher.build([pb.FlowFilter(source_label=selectors)])
    for labels, selected in label_sets:
        flow = pb.Flow()
        flow.source.labels.extend(labels)
        assert matcher.matches(flow) == bool(selected), labels


@pytest.mark.parametrize("selector", ["()", "=", "any:k8s:bla", "a in (b", "a<3"])
def test_bad_label_selectors(selector: str) -> None:
    with pytest.raises(UserError) as err:
        FlowMatcher.build([pb.FlowFilter(destination_label=[selector])])
    assert err.value.field == "destination_label"


@pytest.mark.parametrize(
    ("pattern", "node_names"),
    [
        ("node-1", {"node-1", "default/node-1", "prod/node-1"}),
        ("prod/node-1", {"prod/node-1"}),
        ("default/*", {"node-1", "default/node-1", "default/node-2"}),
        ("*/node-2", {"default/node-2"}),
        ("prod/", {"prod/node-1"}),
        ("NODE-1.", {"node-1", "default/node-1", "prod/node-1"}),  # case, one trailing dot
    ],
)
def test_node_name_patterns(pattern: str, node_names: set[str]) -> None:
    matcher = FlowMatcher.build([pb.FlowFilter(node_name=[pattern])])
    names = {"node-1", "default/node-1", "default/node-2", "prod/node-1", ""}
    assert {n for n in names if matcher.matches(pb.Flow(node_name=n))} == node_names


def test_services_fqdns_and_workloads() -> None:
    flow = pb.Flow(destination_names=["api.example.com"])
    flow.destination_service.namespace, flow.destination_service.name = "shop", "db-main"
    flow.source.workloads.add(kind="Deployment", name="web")

    def match(**fields: list) -> bool:
        return FlowMatcher.build([pb.FlowFilter(**fields)]).matches(flow)

    assert match(destination_service=["shop/db"]) and not match(destination_service=["db"])
    assert match(destination_fqdn=["*.example.com"]) and not match(destination_fqdn=["example.*"])
    assert match(source_workload=[pb.Workload(kind="Deployment")])
    assert match(source_workload=[pb.Workload(name="web")])
    assert not match(source_workload=[pb.Workload(kind="StatefulSet", name="web")])
    # L7 and tracing filters are valid, and match nothing: our flows carry no L7 record
    assert not match(http_status_code=["5+"]) and not match(dns_query=[r".*\.com"])


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"source_ip": ["198.18.0.300"]}, "source_ip"),
        ({"destination_pod": [""]}, "destination_pod"),
        ({"source_label": ["a in (b"]}, "source_label"),
        ({"source_label": ["a<3"]}, "source_label"),
        ({"destination_port": ["-1"]}, "destination_port"),
        ({"protocol": ["gre"]}, "protocol"),
        ({"source_fqdn": ["a..b.."]}, "source_fqdn"),
        ({"http_path": ["("]}, "http_path"),
        ({"dns_query": ["[a-"]}, "dns_query"),
    ],
)
def test_bad_filters_name_their_field(fields: dict, field: str) -> None:
    with pytest.raises(UserError) as err:
        FlowMatcher.build([], [pb.FlowFilter(**fields)])
    assert err.value.field == field


# ---- flows as the agent builds them from datapath events --------------------------------
RESOLVER = FakeResolver()
RECORDED = {
    "allowed": flow_record(event(), RESOLVER, "n1"),  # shop/web:43512 -> shop/db:5432 TCP
    "dropped": flow_record(world_drop(), RESOLVER, "n1"),  # world -> shop/db:5432, dropped
    "ping": flow_record(event(proto=1, sport=8, dport=0), RESOLVER, "n1"),  # web -> db echo
}


@pytest.mark.parametrize(
    ("args", "passing"),
    [
        ((), {"allowed", "dropped", "ping"}),
        (("-n", "shop"), {"allowed", "dropped", "ping"}),
        (("-n", "other"), set()),
        (("--pod", "shop/web"), {"allowed", "ping"}),  # web is the source of both
        (("--pod", "shop/db"), {"allowed", "dropped", "ping"}),  # db is every destination
        (("--pod", "shop/d"), {"allowed", "dropped", "ping"}),  # a name prefix
        (("--from-label", "reserved:world"), {"dropped"}),
        (("--verdict", "DROPPED"), {"dropped"}),
        (("-t", "drop"), {"dropped"}),
        (("-t", "policy-verdict"), {"allowed", "ping"}),
        (("--protocol", "icmp"), {"ping"}),
        (("--protocol", "icmpv6"), set()),
        (("--port", "5432"), {"allowed", "dropped"}),  # destination port
        (("--port", "43512"), {"allowed"}),  # source port
        (("--port", "8"), set()),  # ICMP types are not ports
        # either-side flags pair up per side: web's port is 43512, so nothing here
        (("--pod", "shop/web", "--verdict", "FORWARDED", "--port", "5432"), set()),
        (("--from-pod", "shop/web", "--verdict", "FORWARDED", "--to-port", "5432"), {"allowed"}),
    ],
    ids=str,
)
def test_recorded_flows(args: tuple[str, ...], passing: set[str]) -> None:
    request = flows_request(flags(*args))
    matcher = FlowMatcher.build(request.whitelist, request.blacklist)
    assert {name for name, flow in RECORDED.items() if matcher.matches(flow)} == passing
