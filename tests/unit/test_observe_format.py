"""What `membrane observe` prints for flow records: compact lines, JSON lines, tables, and
lost-events notices."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from observe_support import FakeResolver, event, world_drop

from membrane.observe.format import (
    AGENT_OPTION,
    FlowPrinter,
    compact,
    decision,
    endpoint_text,
    json_line,
)
from membrane.observe.record import RuleView, flow_record
from membrane.observe.store import lost_events
from membrane.policy.ruletable import AGENT_OPTION as RULE_TABLE_AGENT_OPTION
from membrane.policy.ruletable import allow_localhost_rule

RESOLVER = FakeResolver()


def rec(ev: dict) -> dict:
    return flow_record(ev, RESOLVER, "n1")


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Compact times are local: pin the zone."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_compact_allowed_flow() -> None:
    assert compact(rec(event())) == (
        "Nov 21 10:00:01.123: shop/web:43512 (ID:256) -> shop/db:5432 (ID:257) "
        "INGRESS FORWARDED (TCP Flags: SYN) "
        "allowed by CiliumNetworkPolicy shop/db-from-web rule 0 (L3-L4)"
    )


def test_compact_default_deny_drop_from_world() -> None:
    assert compact(rec(world_drop())) == (
        "Nov 21 10:00:01.123: 203.0.113.9:40000 (world) -> shop/db:5432 (ID:257) "
        "INGRESS DROPPED (TCP Flags: SYN) Policy denied (no rule allows it)"
    )


def test_deny_rule_drop_names_the_policy() -> None:
    r = rec(world_drop(drop_reason=181, match=1, rule_id=9))
    assert decision(r) == (
        "Policy denied by a deny rule: CiliumClusterwideNetworkPolicy no-world rule 1 (L3-Only)"
    )


@pytest.mark.parametrize(
    ("ev", "text"),
    [
        (event(match=0, rule_id=0), "no policy applies"),
        (world_drop(drop_reason=132), "Invalid source IP"),
        (world_drop(drop_reason=199), "drop reason 199 (DROP_REASON_UNKNOWN)"),
    ],
)
def test_decisions(ev: dict, text: str) -> None:
    assert decision(rec(ev)) == text


def test_a_removed_policy_is_named_by_its_rule_id() -> None:
    r = flow_record(event(), FakeResolver(rules={}), "n1")
    assert decision(r) == "allowed by rule 7 (its policy was removed since)"


def test_the_node_let_through_by_allow_localhost_says_so() -> None:
    """`--allow-localhost=always`: the agent's own rule, named as such (no policy)."""
    assert AGENT_OPTION == RULE_TABLE_AGENT_OPTION
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
    assert decision(r) == (
        "allowed by allow-localhost ingress (agent option --allow-localhost=always) (L3-Only)"
    )


def test_endpoints_without_ports_or_pods() -> None:
    ping = rec(event(proto=1, sport=8, dport=0, saddr="198.18.9.9", peer_identity=300))
    assert endpoint_text(ping, "source") == "198.18.9.9 (ID:300)"
    assert endpoint_text(ping, "destination") == "shop/db (ID:257)"


def test_json_lines_are_the_records() -> None:
    r = rec(world_drop())
    line = json_line(r)
    assert "\n" not in line and json.loads(line) == r


def test_printer_compact_and_lost_notice(capsys: pytest.CaptureFixture[str]) -> None:
    printer = FlowPrinter("compact", follow=True)
    printer.item(rec(event()))
    printer.item(lost_events(3))
    printer.close()
    out, err = capsys.readouterr()
    assert out == compact(rec(event())) + "\n"
    assert "3 flows missed" in err
    assert printer.count == 1


def test_printer_json_keeps_lost_notices_in_the_stream(capsys: pytest.CaptureFixture[str]) -> None:
    printer = FlowPrinter("json", follow=False)
    for item in (rec(event()), lost_events(2)):
        printer.item(item)
    printer.close()
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == [rec(event()), lost_events(2)]


def test_printer_table(capsys: pytest.CaptureFixture[str]) -> None:
    printer = FlowPrinter("table", follow=False)
    printer.item(rec(event()))
    printer.item(rec(world_drop()))
    printer.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "TIME",
        "SOURCE",
        "DESTINATION",
        "DIRECTION",
        "VERDICT",
        "SUMMARY",
        "DECISION",
    ]
    assert "FORWARDED" in lines[1] and "shop/web:43512" in lines[1]
    assert "DROPPED" in lines[2] and "Policy denied" in lines[2]


def test_followed_table_prints_the_header_once(capsys: pytest.CaptureFixture[str]) -> None:
    printer = FlowPrinter("table", follow=True)
    printer.item(rec(event()))
    printer.item(rec(event()))
    printer.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("TIME") and lines[1] == lines[2]
    # fixed columns: the source starts where its header does
    assert lines[1].index("shop/web") == lines[0].index("SOURCE")


@pytest.mark.parametrize("output", ["table", "compact"])
def test_nothing_recorded_says_so(output: str, capsys: pytest.CaptureFixture[str]) -> None:
    FlowPrinter(output, follow=False).close()
    out, err = capsys.readouterr()
    assert "no flows recorded" in out + err
