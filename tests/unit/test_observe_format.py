"""What `membrane observe` prints for flows: Hubble's compact lines, JSON lines (protobuf
JSON of observer.GetFlowsResponse), dict blocks, tables, and lost-events notices."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from observe_support import DB, WEB, FakeResolver, event, world_drop

from membrane.hubble.flow import flow_pb2
from membrane.hubble.observer import observer_pb2
from membrane.observe.format import (
    FlowPrinter,
    compact,
    dict_block,
    endpoint_text,
    flow_type,
    json_line,
    parse_response,
    verdict_text,
)
from membrane.observe.record import RuleView, flow_record, flow_response, response_dict
from membrane.observe.store import lost_events
from membrane.policy.ruletable import allow_localhost_rule

RESOLVER = FakeResolver()


def rec(ev: dict) -> flow_pb2.Flow:
    return flow_record(ev, RESOLVER, "n1")


def resp(ev: dict) -> observer_pb2.GetFlowsResponse:
    return flow_response(rec(ev))


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Compact times are local: pin the zone."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_compact_policy_verdict() -> None:
    assert compact(rec(event())) == (
        "Nov 21 10:00:01.123: shop/web:43512 (ID:256) -> shop/db:5432 (ID:257) "
        "policy-verdict:L3-L4 INGRESS ALLOWED (TCP Flags: SYN)"
    )


def test_compact_prints_policy_names_when_asked() -> None:
    assert compact(rec(event()), print_policy_names=True).endswith(
        "INGRESS ALLOWED by CiliumNetworkPolicy shop/db-from-web (TCP Flags: SYN)"
    )
    deny = rec(world_drop(drop_reason=181, match=1, rule_id=9))
    assert compact(deny, print_policy_names=True).endswith(
        "Policy denied by denylist DROPPED by CiliumClusterwideNetworkPolicy no-world "
        "(TCP Flags: SYN)"
    )


def test_compact_default_deny_drop_from_world() -> None:
    assert compact(rec(world_drop())) == (
        "Nov 21 10:00:01.123: 203.0.113.9:40000 (world) -> shop/db:5432 (ID:257) "
        "Policy denied DROPPED (TCP Flags: SYN)"
    )


def test_compact_reply_points_back_to_the_client() -> None:
    """db's answer, seen at db's egress: printed client first, as Hubble prints replies."""
    answer = event(
        saddr=DB.ipv4,
        daddr=WEB.ipv4,
        sport=5432,
        dport=43512,
        dir=1,
        ep_id=DB.id,
        peer_identity=WEB.identity,
        match=3,
        rule_id=0,
        tcp_flags=0x12,
    )
    assert ": shop/web:43512 (ID:256) <- shop/db:5432 (ID:257) " in compact(rec(answer))


@pytest.mark.parametrize(
    ("ev", "kind", "verdict"),
    [
        (event(), "policy-verdict:L3-L4 INGRESS", "ALLOWED"),
        (event(match=0, rule_id=0), "policy-verdict:none INGRESS", "ALLOWED"),
        (world_drop(drop_reason=132), "Invalid source ip", "DROPPED"),
        (
            world_drop(drop_reason=160),
            "No configuration available to perform policy decision",
            "DROPPED",
        ),
        (world_drop(drop_reason=199), "DROP_REASON_UNKNOWN", "DROPPED"),
    ],
)
def test_type_and_verdict_columns(ev: dict, kind: str, verdict: str) -> None:
    assert (flow_type(rec(ev)), verdict_text(rec(ev))) == (kind, verdict)


def test_the_node_let_through_by_allow_localhost_says_so() -> None:
    """`--allow-localhost=always`: the agent's own rule, named by its kind."""
    ref = allow_localhost_rule("ingress")
    view = RuleView(
        kind=ref.kind,
        namespace=ref.namespace,
        name=ref.name,
        direction=ref.direction,
        deny=ref.deny,
        index=ref.index,
        description=ref.describe(),
        l3=True,
        l4=False,
    )
    node = event(saddr="198.19.0.1", peer_identity=1, rule_id=3)
    r = flow_record(node, FakeResolver(rules={3: view}), "n1")
    assert endpoint_text(r, "source") == "198.19.0.1:43512 (host)"
    assert compact(r, print_policy_names=True).endswith(
        f"policy-verdict:L3-Only INGRESS ALLOWED by {ref.kind} {ref.name} (TCP Flags: SYN)"
    )


def test_endpoints_without_ports_or_pods() -> None:
    ping = rec(event(proto=1, sport=8, dport=0, saddr="198.18.9.9", peer_identity=300))
    assert endpoint_text(ping, "source") == "198.18.9.9 (ID:300)"
    assert endpoint_text(ping, "destination") == "shop/db (ID:257)"


def test_json_lines_are_get_flows_responses() -> None:
    r = resp(world_drop())
    line = json_line(r)
    assert "\n" not in line and json.loads(line) == response_dict(r)
    assert parse_response(json.loads(line)) == r
    assert set(json.loads(line)) == {"flow", "node_name", "time"}


def test_dict_block() -> None:
    assert dict_block(rec(world_drop())).splitlines() == [
        "  TIMESTAMP: Nov 21 10:00:01.123",
        "     SOURCE: 203.0.113.9:40000 (world)",
        "DESTINATION: shop/db:5432 (ID:257)",
        "       TYPE: Policy denied",
        "    VERDICT: DROPPED",
        "    SUMMARY: TCP Flags: SYN",
    ]


def test_printer_compact_and_lost_notice(capsys: pytest.CaptureFixture[str]) -> None:
    printer = FlowPrinter("compact", follow=True)
    printer.item(resp(event()))
    printer.item(lost_events(3))
    printer.close()
    out, err = capsys.readouterr()
    assert out == compact(rec(event())) + "\n"
    assert "EVENTS LOST: 3 events (HUBBLE_RING_BUFFER)" in err
    assert printer.count == 1


def test_printer_json_keeps_lost_notices_in_the_stream(capsys: pytest.CaptureFixture[str]) -> None:
    printer = FlowPrinter("json", follow=False)
    items = [resp(event()), lost_events(2)]
    for item in items:
        printer.item(item)
    printer.close()
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == [response_dict(i) for i in items]
    assert json.loads(lines[1])["lost_events"] == {
        "source": "HUBBLE_RING_BUFFER",
        "num_events_lost": "2",
    }


def test_printer_dict_separates_flows(capsys: pytest.CaptureFixture[str]) -> None:
    printer = FlowPrinter("dict", follow=False)
    printer.item(resp(event()))
    printer.item(resp(world_drop()))
    printer.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 13 and lines[6] == "-" * 12


def test_printer_table(capsys: pytest.CaptureFixture[str]) -> None:
    printer = FlowPrinter("table", follow=False)
    printer.item(resp(event()))
    printer.item(resp(world_drop()))
    printer.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
    assert "ALLOWED" in lines[1] and "shop/web:43512" in lines[1]
    assert "DROPPED" in lines[2] and "Policy denied" in lines[2]


def test_followed_table_prints_the_header_once(capsys: pytest.CaptureFixture[str]) -> None:
    printer = FlowPrinter("table", follow=True)
    printer.item(resp(event()))
    printer.item(resp(event()))
    printer.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("TIMESTAMP") and lines[1] == lines[2]
    # fixed columns: the source starts where its header does
    assert lines[1].index("shop/web") == lines[0].index("SOURCE")


@pytest.mark.parametrize("output", ["table", "compact", "dict"])
def test_nothing_recorded_says_so(output: str, capsys: pytest.CaptureFixture[str]) -> None:
    FlowPrinter(output, follow=False).close()
    out, err = capsys.readouterr()
    assert "no flows recorded" in out + err
