"""How `membrane observe` prints flow records: `compact` (one line per flow, as
`hubble observe` does), `json` (one object per line, for machines) or `table`.

The printers work from the record alone (the JSON the agent sends), so they print the same
for any agent that speaks the flow API.

A compact line reads left to right as what happened and why:

    Nov 21 10:00:01.123: x/a:43512 (ID:256) -> y/b:80 (ID:257) INGRESS FORWARDED
        (TCP Flags: SYN) allowed by CiliumNetworkPolicy y/allow-web rule 0 (L3-L4)
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any

from membrane.abi import Identity
from membrane.observe.record import DROP_TEXTS, POLICY_MATCH_NAMES, POLICY_MATCH_NONE

FORMATS = ("compact", "json", "table")
TABLE_COLUMNS = ["TIME", "SOURCE", "DESTINATION", "DIRECTION", "VERDICT", "SUMMARY", "DECISION"]
# Widths of a followed table, whose rows are printed before later ones are known: a
# timestamp, two "namespace/pod:port (ID:n)", and the rest.
FOLLOW_WIDTHS = (19, 32, 32, 9, 9, 20, 0)
PORTED = ("TCP", "UDP", "SCTP")
# The kind of the agent's own rules (membrane.policy.ruletable.AGENT_OPTION; importing the
# policy package would cost `membrane observe` its quick start; a unit test keeps them equal).
AGENT_OPTION = "AgentOption"

Record = dict[str, Any]


# ---- parts of a line --------------------------------------------------------------------
def flow_time(record: Record) -> str:
    """Local time to the millisecond, like `hubble observe` ("Nov 21 10:00:01.123")."""
    at = datetime.fromisoformat(record["time"]).astimezone()
    return f"{at:%b} {at.day:2d} {at:%H:%M:%S}.{at.microsecond // 1000:03d}"


def endpoint_text(record: Record, side: str) -> str:
    """`side` ("source" or "destination") as namespace/pod:port (identity), or by its IP
    when it is no pod we know."""
    ep = record.get(side) or {}
    ip = (record.get("IP") or {}).get(side, "?")
    name = f"{ep['namespace']}/{ep['pod_name']}" if ep.get("pod_name") else ip
    port = _port(record, side)
    text = f"{name}:{port}" if port else name
    identity = ep.get("identity") or 0
    if not identity:
        return text
    reserved = next(
        (lb.removeprefix("reserved:") for lb in ep.get("labels", ()) if lb.startswith("reserved:")),
        None,
    )
    if identity < Identity.FIRST_ENDPOINT and reserved:
        return f"{text} ({reserved})"
    return f"{text} (ID:{identity})"


def _port(record: Record, side: str) -> int | None:
    l4 = record.get("l4") or {}
    for protocol in PORTED:
        if protocol in l4:
            return l4[protocol].get(f"{side}_port")
    return None


def policy_text(policy: Record) -> str:
    if policy.get("kind") == AGENT_OPTION:  # no policy to name: the agent's own allow
        return policy["description"]
    if policy.get("name") is None:
        return f"rule {policy.get('rule_id')} (its policy was removed since)"
    name = f"{policy['namespace']}/{policy['name']}" if policy.get("namespace") else policy["name"]
    return f"{policy['kind']} {name} rule {policy['rule']}"


def decision(record: Record) -> str:
    """Why the flow went the way it did: the rule that decided, or the drop reason."""
    policy = record.get("policy")
    match = record.get("policy_match_type", POLICY_MATCH_NONE)
    by = policy_text(policy) if policy else ""
    if by and match != POLICY_MATCH_NONE:
        by += f" ({POLICY_MATCH_NAMES.get(match, match)})"
    if record.get("verdict") != "DROPPED":
        return f"allowed by {by}" if by else "no policy applies"
    desc = record.get("drop_reason_desc", "")
    reason = DROP_TEXTS.get(desc) or f"drop reason {record.get('drop_reason')} ({desc})"
    return f"{reason}: {by}" if by else reason


# ---- whole records ----------------------------------------------------------------------
def compact(record: Record) -> str:
    return (
        f"{flow_time(record)}: {endpoint_text(record, 'source')} -> "
        f"{endpoint_text(record, 'destination')} {record.get('traffic_direction', '?')} "
        f"{record.get('verdict', '?')} ({record.get('Summary', '')}) {decision(record)}"
    )


def json_line(record: Record) -> str:
    return json.dumps(record, separators=(",", ":"))


def table_row(record: Record) -> list[str]:
    return [
        flow_time(record),
        endpoint_text(record, "source"),
        endpoint_text(record, "destination"),
        record.get("traffic_direction", "?"),
        record.get("verdict", "?"),
        record.get("Summary", ""),
        decision(record),
    ]


def lost_text(notice: Record) -> str:
    count = notice["lost_events"].get("num_events_lost", "?")
    flows = "flow" if count == 1 else "flows"
    return f"{count} {flows} missed: this client fell behind the agent's flow stream"


# ---- printing ---------------------------------------------------------------------------
class FlowPrinter:
    """Prints the items of a flow response or stream: records, and lost-events notices
    (JSON output keeps them in the stream, as Hubble does; the others say it on stderr).

    Tables never wrap a cell (a flow is one line, as in the other formats): a table not
    followed is printed at `close` with columns as wide as their widest cell; a followed
    one with fixed widths, which longer cells push along."""

    def __init__(self, output: str, follow: bool) -> None:
        self.output = output
        self.follow = follow
        self.count = 0
        self._rows: list[list[str]] = []
        self._header_done = False

    def item(self, item: Record) -> None:
        if "lost_events" in item:
            if self.output == "json":
                self._write(json_line(item))
            else:
                print(f"membrane: {lost_text(item)}", file=sys.stderr, flush=True)
            return
        self.count += 1
        if self.output == "json":
            self._write(json_line(item))
        elif self.output == "compact":
            self._write(compact(item))
        elif self.follow:
            if not self._header_done:
                self._write(_table_line(TABLE_COLUMNS, FOLLOW_WIDTHS))
                self._header_done = True
            self._write(_table_line(table_row(item), FOLLOW_WIDTHS))
        else:
            self._rows.append(table_row(item))

    def close(self) -> None:
        if self.follow or self.output == "json":
            return
        if not self.count:
            print("no flows recorded", file=sys.stderr)
        elif self.output == "table":
            rows = [TABLE_COLUMNS, *self._rows]
            widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS) - 1)]
            for row in rows:
                self._write(_table_line(row, (*widths, 0)))

    def _write(self, line: str) -> None:
        sys.stdout.write(line + "\n")
        if self.follow:  # each flow as it happens, also through a pipe
            sys.stdout.flush()


def _table_line(cells: list[str], widths: tuple[int, ...]) -> str:
    """Cells padded to `widths` (0: the last column, as long as it is), two spaces apart."""
    return "  ".join(
        cell.ljust(width) if width else cell for cell, width in zip(cells, widths, strict=True)
    ).rstrip()
