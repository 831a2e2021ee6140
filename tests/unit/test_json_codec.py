"""The flow log's fast JSON codec gives exactly what protobuf's json_format gives, both
ways, for every kind of flow we write, and refuses the JSON protobuf refuses."""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.protobuf import json_format
from observe_support import FakeResolver, event, world_drop

from membrane.abi import DropReason
from membrane.hubble.flow import flow_pb2
from membrane.hubble.json_codec import decode, encode
from membrane.hubble.observer import observer_pb2
from membrane.observe.format import json_line
from membrane.observe.record import flow_record, flow_response, lost_response

Response = observer_pb2.GetFlowsResponse
RESOLVER = FakeResolver()
V6 = {"family": 6, "saddr": "2001:db8::a", "daddr": "2001:db8::b"}
RESPONSES = [
    flow_response(flow_record(event(), RESOLVER, "n1")),
    flow_response(flow_record(event(proto=17, **V6), RESOLVER, "n1")),
    flow_response(flow_record(event(proto=1, sport=8, dport=0), RESOLVER, "n1")),
    flow_response(flow_record(world_drop(), RESOLVER, "n1")),
    flow_response(
        flow_record(world_drop(drop_reason=DropReason.INVALID_SOURCE_IP, **V6), RESOLVER, "n1")
    ),
    lost_response(flow_pb2.PERF_EVENT_RING_BUFFER, 12, "n1"),
]


def reference(obj: dict[str, Any]) -> Response:
    return json_format.ParseDict(obj, Response())


@pytest.mark.parametrize("response", RESPONSES)
def test_our_lines_decode_as_protobuf_decodes_them(response: Response) -> None:
    obj = json.loads(json_line(response))
    assert decode(obj, Response()) == reference(obj) == response


@pytest.mark.parametrize("response", RESPONSES)
def test_encode_writes_what_protobuf_writes(response: Response) -> None:
    assert encode(response) == json_format.MessageToDict(response, preserving_proto_field_name=True)


def test_encode_edge_values() -> None:
    r = Response(node_name="n")
    r.flow.is_reply.value = False  # a wrapper present with its zero value
    r.flow.IP.SetInParent()  # an empty message, present
    r.flow.time.FromNanoseconds(1_000_000_001_000)  # micro- and nanosecond fractions
    r.flow.event_type.sub_type = -1
    r.lost_events.num_events_lost = 1 << 63  # uint64: a string (and the oneof moves)
    r.lost_events.cpu.value = 0
    for message in (r, Response(), observer_pb2.ServerStatusResponse(num_flows=1 << 40)):
        assert encode(message) == json_format.MessageToDict(
            message, preserving_proto_field_name=True
        )
    f = Response()
    f.flow.is_reply.value = False
    f.flow.time.FromNanoseconds(1_500_000_000)
    f.flow.verdict = 99  # a number the enum does not name
    assert encode(f) == json_format.MessageToDict(f, preserving_proto_field_name=True)


@pytest.mark.parametrize(
    "obj",
    [
        {"flow": {"time": "2026-12-06T10:00:01Z"}},  # no fraction
        {"flow": {"time": "2026-12-06T10:00:01.5+01:00"}},  # an offset: protobuf's parser
        {"flow": {"verdict": 2, "is_reply": False, "IP": {}}},  # enum by number, empty message
        {"flow": {"source": {"ID": "7", "identity": 3.0}}},  # numbers as strings or floats
        {"lost_events": {"source": "HUBBLE_RING_BUFFER", "num_events_lost": "3", "cpu": 1}},
        {"flow": {"event_type": {"type": 1, "sub_type": 133}}, "node_name": None},
    ],
)
def test_other_valid_json_too(obj: dict[str, Any]) -> None:
    assert decode(obj, Response()) == reference(obj)


@pytest.mark.parametrize(
    "obj",
    [
        {"flow": {"policy": {"name": "x"}}},  # a field outside the schema
        {"flow": {"verdict": "MAYBE"}},
        {"flow": {"time": "yesterday"}},
        {"flow": {"source": {"ID": "seven"}}},
        {"flow": {"source": {"labels": "k8s:app=x"}}},
        {"flow": {"uuid": 5}},
        {"flow": {"source": {"ID": 1.5}}},
        {"flow": {"is_reply": "yes"}},
    ],
)
def test_what_protobuf_refuses_is_refused(obj: dict[str, Any]) -> None:
    with pytest.raises(json_format.ParseError):
        reference(obj)
    with pytest.raises(json_format.ParseError):
        decode(obj, Response())
