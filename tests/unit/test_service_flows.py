"""Flows name the Service a connection went through (Hubble's destination_service, and
source_service on the backend's replies), in the flow record and in the encoded bytes."""

from __future__ import annotations

from dataclasses import dataclass

from observe_support import DB, WEB, FakeResolver, event, event_rows, flow_event_dtype

from membrane.hubble.observer import observer_pb2
from membrane.observe.encode import FlowEncoder
from membrane.observe.record import flow_record


@dataclass
class ServiceResolver(FakeResolver):
    """web's connections to db:5432 went through the frontend of shop/db."""

    def connection_service(
        self, client: str, backend: str, port: int, protocol: int
    ) -> tuple[str, str] | None:
        if (client, backend, port, protocol) == (WEB.ipv4, DB.ipv4, 5432, 6):
            return ("shop", "db")
        return None


def test_a_service_connection_names_its_service_both_ways() -> None:
    to_db = flow_record(event(), ServiceResolver(), "node-1")
    assert (to_db.destination_service.namespace, to_db.destination_service.name) == (
        "shop",
        "db",
    )
    assert not to_db.HasField("source_service")
    reply = event(saddr=event()["daddr"], daddr=event()["saddr"], sport=5432, dport=43512)
    back = flow_record(reply, ServiceResolver(), "node-1")
    assert back.source_service.name == "db" and not back.HasField("destination_service")


def test_other_flows_and_plain_resolvers_name_none() -> None:
    other = flow_record(event(dport=5433), ServiceResolver(), "node-1")
    assert not other.HasField("destination_service") and not other.HasField("source_service")
    plain = flow_record(event(), FakeResolver(), "node-1")
    assert not plain.HasField("destination_service")


def test_the_encoder_writes_the_same_service() -> None:
    rows = event_rows(flow_event_dtype(), [event(), event(dport=5433)])
    encoded = FlowEncoder(ServiceResolver(), "node-1").encode(rows, 1, 0, 0)
    first, second = (observer_pb2.GetFlowsResponse.FromString(b).flow for b in encoded)
    assert first.destination_service.name == "db"
    assert not second.HasField("destination_service")
