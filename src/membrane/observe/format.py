"""How `membrane observe` prints flows, as `hubble observe` does: `compact` (one line per
flow), `json` (one observer.GetFlowsResponse per line, protobuf JSON with proto field names),
`dict` (one block of KEY: value lines per flow) or `table`.

The printers work from the GetFlowsResponse alone, so they print the same for any agent
that speaks Hubble's flow API. A compact line reads left to right as what happened:

    Nov 21 10:00:01.123: x/a:43512 (ID:256) -> y/b:80 (ID:257) policy-verdict:L3-L4
        INGRESS ALLOWED (TCP Flags: SYN)

With `print_policy_names`, the policies that decided follow the verdict
("ALLOWED by CiliumNetworkPolicy y/allow-web").

Printing needs only the generated flow and observer modules: the agent's flow records
(observe.record, with the datapath's numbers) are imported for a drop's text alone, and the
JSON encoder for `json` alone, so a compact `membrane observe` starts without them.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any

from membrane.hubble.flow import flow_pb2
from membrane.hubble.observer import observer_pb2

FORMATS = ("compact", "json", "dict", "table")
TABLE_COLUMNS = ["TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
# Widths of a followed table, whose rows are printed before later ones are known: a
# timestamp, two "namespace/pod:port (ID:n)", the type, the verdict, and the rest.
FOLLOW_WIDTHS = (19, 32, 32, 28, 9, 0)
FIRST_ENDPOINT_IDENTITY = 256  # identities below are reserved (world, host, ...)
# Monitor message types (cilium pkg/monitor/api) a flow's event_type.type names
MESSAGE_TYPE_DROP, MESSAGE_TYPE_TRACE, MESSAGE_TYPE_POLICY_VERDICT = 1, 4, 5
POLICY_VERDICTS = {flow_pb2.FORWARDED: "ALLOWED", flow_pb2.DROPPED: "DENIED"}
POLICY_VERDICTS[flow_pb2.AUDIT] = "AUDITED"
# Hubble's names of a policy verdict's policy_match_type (the numbers observe.record sets)
POLICY_MATCH_NAMES = {0: "none", 1: "L3-Only", 2: "L3-L4", 3: "L4-Only", 4: "all"}

Response = observer_pb2.GetFlowsResponse


# ---- the wire form ---------------------------------------------------------------------
def parse_response(item: dict[str, Any]) -> Response:
    """A GetFlowsResponse from its JSON form; a field outside the schema is an error."""
    from google.protobuf import json_format  # here: printing flows does without it

    return json_format.ParseDict(item, Response())


def json_line(response: Response) -> str:
    """One line of `-o json`: protobuf JSON with proto field names (hubble.json_codec)."""
    from membrane.hubble.json_codec import encode

    return json.dumps(encode(response), separators=(",", ":"))


# ---- parts of a line --------------------------------------------------------------------
def flow_time(flow: flow_pb2.Flow) -> str:
    """Local time to the millisecond, like `hubble observe` ("Nov 21 10:00:01.123")."""
    ns = flow.time.ToNanoseconds()
    at = datetime.fromtimestamp(ns // 1_000_000_000).astimezone()
    return f"{at:%b} {at.day:2d} {at:%H:%M:%S}.{ns // 1_000_000 % 1000:03d}"


def endpoint_text(flow: flow_pb2.Flow, side: str) -> str:
    """`side` ("source" or "destination") as namespace/pod:port (ID:identity), or by its IP
    when it is no pod we know; reserved identities by name ("(world)")."""
    ep: flow_pb2.Endpoint = getattr(flow, side)
    ip = getattr(flow.IP, side) or "?"
    name = f"{ep.namespace}/{ep.pod_name}" if ep.pod_name else ip
    port = _port(flow, side)
    text = f"{name}:{port}" if port else name
    if not ep.identity:
        return text
    reserved = next((lb[9:] for lb in ep.labels if lb.startswith("reserved:")), None)
    if ep.identity < FIRST_ENDPOINT_IDENTITY and reserved:
        return f"{text} ({reserved})"
    return f"{text} (ID:{ep.identity})"


def _port(flow: flow_pb2.Flow, side: str) -> int | None:
    protocol = flow.l4.WhichOneof("protocol")
    if protocol in ("TCP", "UDP", "SCTP"):
        return getattr(getattr(flow.l4, protocol), f"{side}_port") or None
    return None


def drop_text(flow: flow_pb2.Flow) -> str:
    from membrane.observe.record import DROP_TEXTS

    name = flow_pb2.DropReason.Name(flow.drop_reason_desc)
    return DROP_TEXTS.get(name) or name


def flow_type(flow: flow_pb2.Flow) -> str:
    """Hubble's TYPE column: `policy-verdict:L3-L4 INGRESS`, the drop reason of a drop,
    `to-endpoint` for a trace."""
    kind = flow.event_type.type
    direction = flow_pb2.TrafficDirection.Name(flow.traffic_direction)
    if kind == MESSAGE_TYPE_POLICY_VERDICT:
        match = POLICY_MATCH_NAMES.get(flow.policy_match_type, str(flow.policy_match_type))
        return f"policy-verdict:{match} {direction}"
    if kind == MESSAGE_TYPE_DROP:
        return drop_text(flow)
    if kind == MESSAGE_TYPE_TRACE:
        point = flow_pb2.TraceObservationPoint.Name(flow.trace_observation_point)
        return point.lower().replace("_", "-")
    return f"event type {kind}"


def verdict_text(flow: flow_pb2.Flow) -> str:
    if flow.event_type.type == MESSAGE_TYPE_POLICY_VERDICT:
        return POLICY_VERDICTS.get(flow.verdict, flow_pb2.Verdict.Name(flow.verdict))
    return flow_pb2.Verdict.Name(flow.verdict)


def policy_names(flow: flow_pb2.Flow) -> str:
    """The policies that allowed or denied the flow: "CiliumNetworkPolicy ns/name"."""
    policies = [
        *flow.ingress_denied_by,
        *flow.egress_denied_by,
        *flow.ingress_allowed_by,
        *flow.egress_allowed_by,
    ]
    names = [
        f"{p.kind} {p.namespace}/{p.name}" if p.namespace else f"{p.kind} {p.name}"
        for p in policies
    ]
    return ", ".join(names)


def sides(flow: flow_pb2.Flow) -> tuple[str, str, str]:
    """Left side, arrow, right side: a reply is printed `client <- server`, as Hubble does;
    `<>` when it is not known whether the packet is one."""
    src, dst = endpoint_text(flow, "source"), endpoint_text(flow, "destination")
    if not flow.HasField("is_reply"):
        return src, "<>", dst
    if flow.is_reply.value:
        return dst, "<-", src
    return src, "->", dst


# ---- whole flows ------------------------------------------------------------------------
def compact(flow: flow_pb2.Flow, print_policy_names: bool = False) -> str:
    left, arrow, right = sides(flow)
    verdict = verdict_text(flow)
    if print_policy_names and (names := policy_names(flow)):
        verdict += f" by {names}"
    summary = f" ({flow.Summary})" if flow.Summary else ""
    return f"{flow_time(flow)}: {left} {arrow} {right} {flow_type(flow)} {verdict}{summary}"


def table_row(flow: flow_pb2.Flow, print_policy_names: bool = False) -> list[str]:
    verdict = verdict_text(flow)
    if print_policy_names and (names := policy_names(flow)):
        verdict += f" by {names}"
    return [
        flow_time(flow),
        endpoint_text(flow, "source"),
        endpoint_text(flow, "destination"),
        flow_type(flow),
        verdict,
        flow.Summary,
    ]


def dict_block(flow: flow_pb2.Flow, print_policy_names: bool = False) -> str:
    """Hubble's `-o dict`: one `KEY: value` line per column, keys right-aligned."""
    row = table_row(flow, print_policy_names)
    width = max(len(c) for c in TABLE_COLUMNS)
    return "\n".join(f"{k:>{width}}: {v}" for k, v in zip(TABLE_COLUMNS, row, strict=True))


def lost_text(lost: flow_pb2.LostEvent) -> str:
    source = flow_pb2.LostEventSource.Name(lost.source)
    flows = "event" if lost.num_events_lost == 1 else "events"
    return f"EVENTS LOST: {lost.num_events_lost} {flows} ({source})"


# ---- printing ---------------------------------------------------------------------------
class FlowPrinter:
    """Prints the GetFlowsResponses of a flow query or stream: flows, and lost-events notices
    (JSON output keeps them in the stream, as Hubble does; the others say it on stderr).

    Tables never wrap a cell (a flow is one line, as in the other formats): a table not
    followed is printed at `close` with columns as wide as their widest cell; a followed
    one with fixed widths, which longer cells push along."""

    def __init__(self, output: str, follow: bool, print_policy_names: bool = False) -> None:
        self.output = output
        self.follow = follow
        self.print_policy_names = print_policy_names
        self.count = 0
        self._rows: list[list[str]] = []
        self._header_done = False

    def item(self, response: Response) -> None:
        kind = response.WhichOneof("response_types")
        if kind != "flow":
            if self.output == "json":
                self._write(json_line(response))
            elif kind == "lost_events":
                print(f"membrane: {lost_text(response.lost_events)}", file=sys.stderr, flush=True)
            return
        self.count += 1
        flow, names = response.flow, self.print_policy_names
        if self.output == "json":
            self._write(json_line(response))
        elif self.output == "compact":
            self._write(compact(flow, names))
        elif self.output == "dict":
            if self.count > 1:
                self._write("-" * 12)
            self._write(dict_block(flow, names))
        elif self.follow:
            if not self._header_done:
                self._write(_table_line(TABLE_COLUMNS, FOLLOW_WIDTHS))
                self._header_done = True
            self._write(_table_line(table_row(flow, names), FOLLOW_WIDTHS))
        else:
            self._rows.append(table_row(flow, names))

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
