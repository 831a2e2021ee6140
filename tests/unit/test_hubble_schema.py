"""Our flows are Hubble's: the proto files carry Hubble's package, message and field names
and numbers (checked against a table taken from Hubble's API documentation, so a wrong
number fails here), and every line of `membrane observe -o json` parses strictly as an
observer.GetFlowsResponse, for drops and verdicts of every protocol over both families."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from google.protobuf import json_format
from observe_support import FakeResolver, event, observer_server, world_drop
from typer.testing import CliRunner

from membrane.abi import DropReason, FlowMatch
from membrane.cli.observe import observe
from membrane.hubble.flow import flow_pb2
from membrane.hubble.observer import observer_pb2
from membrane.hubble.relay import relay_pb2
from membrane.observe.record import flow_record, flow_response, lost_response
from membrane.observe.store import FlowStore

# (message, field, number) as Hubble's api/v1 flow.proto and observer.proto define them.
HUBBLE_FIELDS = [
    ("flow.Flow", "time", 1),
    ("flow.Flow", "verdict", 2),
    ("flow.Flow", "drop_reason", 3),
    ("flow.Flow", "ethernet", 4),
    ("flow.Flow", "IP", 5),
    ("flow.Flow", "l4", 6),
    ("flow.Flow", "source", 8),
    ("flow.Flow", "destination", 9),
    ("flow.Flow", "Type", 10),
    ("flow.Flow", "node_name", 11),
    ("flow.Flow", "source_names", 13),
    ("flow.Flow", "destination_names", 14),
    ("flow.Flow", "reply", 16),
    ("flow.Flow", "event_type", 19),
    ("flow.Flow", "source_service", 20),
    ("flow.Flow", "destination_service", 21),
    ("flow.Flow", "traffic_direction", 22),
    ("flow.Flow", "policy_match_type", 23),
    ("flow.Flow", "trace_observation_point", 24),
    ("flow.Flow", "drop_reason_desc", 25),
    ("flow.Flow", "is_reply", 26),
    ("flow.Flow", "interface", 28),
    ("flow.Flow", "proxy_port", 29),
    ("flow.Flow", "uuid", 34),
    ("flow.Flow", "auth_type", 35),
    ("flow.Flow", "trace_reason", 36),
    ("flow.Flow", "Summary", 100000),
    ("flow.Flow", "egress_allowed_by", 21001),
    ("flow.Flow", "ingress_allowed_by", 21002),
    ("flow.Flow", "egress_denied_by", 21004),
    ("flow.Flow", "ingress_denied_by", 21005),
    ("flow.Layer4", "TCP", 1),
    ("flow.Layer4", "UDP", 2),
    ("flow.Layer4", "ICMPv4", 3),
    ("flow.Layer4", "ICMPv6", 4),
    ("flow.Layer4", "SCTP", 5),
    ("flow.Endpoint", "ID", 1),
    ("flow.Endpoint", "identity", 2),
    ("flow.Endpoint", "namespace", 3),
    ("flow.Endpoint", "labels", 4),
    ("flow.Endpoint", "pod_name", 5),
    ("flow.Endpoint", "workloads", 6),
    ("flow.Endpoint", "cluster_name", 7),
    ("flow.TCP", "source_port", 1),
    ("flow.TCP", "destination_port", 2),
    ("flow.TCP", "flags", 3),
    ("flow.UDP", "source_port", 1),
    ("flow.UDP", "destination_port", 2),
    ("flow.SCTP", "source_port", 1),
    ("flow.SCTP", "destination_port", 2),
    ("flow.ICMPv4", "type", 1),
    ("flow.ICMPv4", "code", 2),
    ("flow.ICMPv6", "type", 1),
    ("flow.ICMPv6", "code", 2),
    ("flow.TCPFlags", "FIN", 1),
    ("flow.TCPFlags", "SYN", 2),
    ("flow.TCPFlags", "RST", 3),
    ("flow.TCPFlags", "PSH", 4),
    ("flow.TCPFlags", "ACK", 5),
    ("flow.TCPFlags", "URG", 6),
    ("flow.TCPFlags", "ECE", 7),
    ("flow.TCPFlags", "CWR", 8),
    ("flow.TCPFlags", "NS", 9),
    ("flow.IP", "source", 1),
    ("flow.IP", "destination", 2),
    ("flow.IP", "ipVersion", 3),
    ("flow.IP", "encrypted", 4),
    ("flow.Ethernet", "source", 1),
    ("flow.Ethernet", "destination", 2),
    ("flow.Policy", "name", 1),
    ("flow.Policy", "namespace", 2),
    ("flow.Policy", "labels", 3),
    ("flow.Policy", "revision", 4),
    ("flow.Policy", "kind", 5),
    ("flow.CiliumEventType", "type", 1),
    ("flow.CiliumEventType", "sub_type", 2),
    ("flow.EventTypeFilter", "type", 1),
    ("flow.EventTypeFilter", "match_sub_type", 2),
    ("flow.EventTypeFilter", "sub_type", 3),
    ("flow.LostEvent", "source", 1),
    ("flow.LostEvent", "num_events_lost", 2),
    ("flow.LostEvent", "cpu", 3),
    ("flow.NetworkInterface", "index", 1),
    ("flow.NetworkInterface", "name", 2),
    ("flow.FlowFilter", "source_ip", 1),
    ("flow.FlowFilter", "source_pod", 2),
    ("flow.FlowFilter", "destination_ip", 3),
    ("flow.FlowFilter", "destination_pod", 4),
    ("flow.FlowFilter", "verdict", 5),
    ("flow.FlowFilter", "event_type", 6),
    ("flow.FlowFilter", "source_label", 10),
    ("flow.FlowFilter", "destination_label", 11),
    ("flow.FlowFilter", "protocol", 12),
    ("flow.FlowFilter", "source_port", 13),
    ("flow.FlowFilter", "destination_port", 14),
    ("flow.FlowFilter", "reply", 15),
    ("flow.FlowFilter", "source_identity", 19),
    ("flow.FlowFilter", "destination_identity", 20),
    ("flow.FlowFilter", "tcp_flags", 23),
    ("flow.FlowFilter", "node_name", 24),
    ("flow.FlowFilter", "ip_version", 25),
    ("flow.FlowFilter", "uuid", 29),
    ("flow.FlowFilter", "traffic_direction", 30),
    ("flow.FlowFilter", "drop_reason_desc", 35),
    ("observer.GetFlowsRequest", "number", 1),
    ("observer.GetFlowsRequest", "follow", 3),
    ("observer.GetFlowsRequest", "blacklist", 5),
    ("observer.GetFlowsRequest", "whitelist", 6),
    ("observer.GetFlowsRequest", "since", 7),
    ("observer.GetFlowsRequest", "until", 8),
    ("observer.GetFlowsRequest", "first", 9),
    ("observer.GetFlowsResponse", "flow", 1),
    ("observer.GetFlowsResponse", "node_status", 2),
    ("observer.GetFlowsResponse", "lost_events", 3),
    ("observer.GetFlowsResponse", "node_name", 1000),
    ("observer.GetFlowsResponse", "time", 1001),
    ("observer.ServerStatusResponse", "num_flows", 1),
    ("observer.ServerStatusResponse", "max_flows", 2),
    ("observer.ServerStatusResponse", "seen_flows", 3),
    ("observer.ServerStatusResponse", "uptime_ns", 4),
    ("observer.ServerStatusResponse", "num_connected_nodes", 5),
    ("observer.ServerStatusResponse", "num_unavailable_nodes", 6),
    ("observer.ServerStatusResponse", "unavailable_nodes", 7),
    ("observer.ServerStatusResponse", "version", 8),
    ("observer.GetNodesResponse", "nodes", 1),
    ("observer.Node", "name", 1),
    ("observer.Node", "version", 2),
    ("observer.Node", "address", 3),
    ("observer.Node", "state", 4),
    ("observer.Node", "tls", 5),
    ("observer.Node", "uptime_ns", 6),
    ("observer.Node", "num_flows", 7),
    ("observer.Node", "max_flows", 8),
    ("observer.Node", "seen_flows", 9),
    ("observer.TLS", "enabled", 1),
    ("observer.TLS", "server_name", 2),
    ("relay.NodeStatusEvent", "state_change", 1),
    ("relay.NodeStatusEvent", "node_names", 2),
    ("relay.NodeStatusEvent", "message", 3),
]
# (enum, name, number)
HUBBLE_ENUM_VALUES = [
    ("flow.Verdict", "FORWARDED", 1),
    ("flow.Verdict", "DROPPED", 2),
    ("flow.Verdict", "ERROR", 3),
    ("flow.Verdict", "AUDIT", 4),
    ("flow.Verdict", "REDIRECTED", 5),
    ("flow.Verdict", "TRACED", 6),
    ("flow.Verdict", "TRANSLATED", 7),
    ("flow.FlowType", "L3_L4", 1),
    ("flow.FlowType", "L7", 2),
    ("flow.IPVersion", "IPv4", 1),
    ("flow.IPVersion", "IPv6", 2),
    ("flow.TrafficDirection", "INGRESS", 1),
    ("flow.TrafficDirection", "EGRESS", 2),
    ("flow.TraceObservationPoint", "TO_ENDPOINT", 101),
    ("flow.TraceObservationPoint", "FROM_ENDPOINT", 5),
    ("flow.TraceObservationPoint", "TO_STACK", 3),
    ("flow.TraceReason", "RELATED", 4),
    ("flow.LostEventSource", "PERF_EVENT_RING_BUFFER", 1),
    ("flow.LostEventSource", "OBSERVER_EVENTS_QUEUE", 2),
    ("flow.LostEventSource", "HUBBLE_RING_BUFFER", 3),
    ("flow.DropReason", "INVALID_SOURCE_IP", 132),
    ("flow.DropReason", "POLICY_DENIED", 133),
    ("flow.DropReason", "INVALID_PACKET_DROPPED", 134),
    ("flow.DropReason", "CT_TRUNCATED_OR_INVALID_HEADER", 135),
    ("flow.DropReason", "CT_UNKNOWN_L4_PROTOCOL", 137),
    ("flow.DropReason", "UNSUPPORTED_L3_PROTOCOL", 139),
    ("flow.DropReason", "UNKNOWN_L4_PROTOCOL", 142),
    ("flow.DropReason", "NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION", 165),
    ("flow.DropReason", "INVALID_IDENTITY", 171),
    ("flow.DropReason", "FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND", 175),
    ("flow.DropReason", "POLICY_DENY", 181),
    ("flow.DropReason", "TTL_EXCEEDED", 196),
    ("relay.NodeState", "NODE_CONNECTED", 1),
    ("relay.NodeState", "NODE_UNAVAILABLE", 2),
]
MODULES = {"flow": flow_pb2, "observer": observer_pb2, "relay": relay_pb2}


def _descriptor(full_name: str) -> Any:
    """The message or enum descriptor of a full name."""
    package, name = full_name.split(".")
    file = MODULES[package].DESCRIPTOR
    assert file.package == package
    return file.message_types_by_name.get(name) or file.enum_types_by_name[name]


@pytest.mark.parametrize(("message", "field", "number"), HUBBLE_FIELDS)
def test_field_numbers_are_hubbles(message: str, field: str, number: int) -> None:
    descriptor = _descriptor(message)
    assert descriptor.fields_by_name[field].number == number


@pytest.mark.parametrize(("enum", "name", "number"), HUBBLE_ENUM_VALUES)
def test_enum_numbers_are_hubbles(enum: str, name: str, number: int) -> None:
    assert _descriptor(enum).values_by_name[name].number == number


def test_the_service_is_hubbles_observer() -> None:
    service = observer_pb2.DESCRIPTOR.services_by_name["Observer"]
    assert service.full_name == "observer.Observer"
    methods = {m.name: (m.input_type.full_name, m.output_type.full_name) for m in service.methods}
    assert methods["GetFlows"] == ("observer.GetFlowsRequest", "observer.GetFlowsResponse")
    assert methods["ServerStatus"][1] == "observer.ServerStatusResponse"
    assert methods["GetNodes"][1] == "observer.GetNodesResponse"
    assert service.methods_by_name["GetFlows"].server_streaming


# ---- every -o json line is a GetFlowsResponse ------------------------------------------
V6 = {"family": 6, "saddr": "2001:db8::a", "daddr": "2001:db8::b"}
CASES = [
    {},  # TCP SYN, allowed by a rule
    {"proto": 17},
    {"proto": 1, "sport": 8, "dport": 0},
    {"proto": 58, "sport": 128, "dport": 0, **V6},
    {"proto": 17, **V6},
    {**V6},
    {"match": FlowMatch.REPLY, "rule_id": 0, "tcp_flags": 0x12},
    {"proto": 1, "sport": 3, "dport": 4, "match": FlowMatch.RELATED, "rule_id": 0},
    {"dir": 1, "ep_id": 12, "peer_identity": 257},
]
DROPS = [
    {},  # default deny
    {"drop_reason": DropReason.POLICY_DENY, "match": 1, "rule_id": 9},
    {"proto": 17, **V6},
    {"proto": 1, "sport": 8, "dport": 0},
    {"proto": 58, "sport": 128, "dport": 0, **V6},
    {"drop_reason": DropReason.INVALID_SOURCE_IP, **V6},
    {"drop_reason": DropReason.FRAG_NOT_FOUND},
    {"drop_reason": DropReason.NO_ENDPOINT_STATE, "proto": 47},
]


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The agent's Observer server over a store of the flows of CASES and DROPS."""
    monkeypatch.delenv("MEMBRANE_HUBBLE_SERVER", raising=False)
    store = FlowStore(node_name="node-1")
    resolver = FakeResolver()
    store.extend(flow_response(flow_record(event(**f), resolver, "node-1")) for f in CASES)
    store.extend(flow_response(flow_record(world_drop(**f), resolver, "node-1")) for f in DROPS)
    store.append(lost_response(flow_pb2.PERF_EVENT_RING_BUFFER, 3, "node-1"))
    with observer_server(store, str(tmp_path / "hubble.sock")) as address:
        yield address


def test_every_json_line_parses_strictly_as_a_get_flows_response(agent: str) -> None:
    app = typer.Typer()
    app.command()(observe)
    result = CliRunner().invoke(app, ["--server", agent, "--last", "100", "-o", "json"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == len(CASES) + len(DROPS) + 1
    responses = []
    for line in lines:
        response = observer_pb2.GetFlowsResponse()
        json_format.Parse(line, response, ignore_unknown_fields=False)
        responses.append(response)
        assert json.loads(line)["node_name"] == "node-1"
    flows = [r.flow for r in responses if r.HasField("flow")]
    assert {f.verdict for f in flows} == {flow_pb2.FORWARDED, flow_pb2.DROPPED}
    assert {f.IP.ipVersion for f in flows} == {flow_pb2.IPv4, flow_pb2.IPv6}
    assert {f.l4.WhichOneof("protocol") for f in flows} == {"TCP", "UDP", "ICMPv4", "ICMPv6", None}
    assert all(f.Type == flow_pb2.L3_L4 and f.uuid and f.HasField("time") for f in flows)
    # the ring buffer's loss among the last 100: one line, ahead of the flows
    assert responses[0].lost_events.num_events_lost == 3
    # each line is exactly its message's protobuf JSON: nothing outside the schema
    for line, response in zip(lines, responses, strict=True):
        assert json.loads(line) == json_format.MessageToDict(
            response, preserving_proto_field_name=True
        )


# Hubble's wire form of requests and answers, byte for byte: (message, its bytes)
WIRE = [
    (observer_pb2.GetFlowsRequest(number=20), b"\x08\x14"),
    (observer_pb2.GetFlowsRequest(follow=True), b"\x18\x01"),
    (observer_pb2.GetFlowsRequest(first=True), b"\x48\x01"),
    (
        observer_pb2.GetFlowsRequest(whitelist=[flow_pb2.FlowFilter(source_pod=["a/"])]),
        b"\x32\x04\x12\x02a/",
    ),
    (
        observer_pb2.GetFlowsRequest(blacklist=[flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED])]),
        b"\x2a\x03\x2a\x01\x02",  # packed repeated enum
    ),
    (observer_pb2.ServerStatusResponse(num_flows=1, max_flows=4095), b"\x08\x01\x10\xff\x1f"),
    (observer_pb2.GetFlowsResponse(node_name="n"), b"\xc2\x3e\x01n"),  # field 1000
]


@pytest.mark.parametrize(("message", "wire"), WIRE)
def test_the_wire_form_is_hubbles(message: Any, wire: bytes) -> None:
    assert message.SerializeToString() == wire
    assert type(message).FromString(wire) == message


def test_the_grpc_paths_are_hubbles() -> None:
    service = observer_pb2.DESCRIPTOR.services_by_name["Observer"]
    paths = {f"/{service.full_name}/{m.name}" for m in service.methods}
    assert paths >= {
        "/observer.Observer/GetFlows",
        "/observer.Observer/ServerStatus",
        "/observer.Observer/GetNodes",
    }


def test_a_field_outside_the_schema_is_refused() -> None:
    with pytest.raises(json_format.ParseError):
        json_format.Parse('{"flow": {"policy": {"name": "x"}}}', observer_pb2.GetFlowsResponse())
