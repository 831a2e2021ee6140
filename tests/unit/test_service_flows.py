"""Flows name the Service a connection went through (Hubble's destination_service, and
source_service on the backend's replies), in the flow record and in the encoded bytes."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
from observe_support import DB, WEB, FakeResolver, event, event_rows, flow_event_dtype

from membrane.agent.flows import RawSegment
from membrane.hubble.observer import observer_pb2
from membrane.observe.encode import FlowEncoder, _distinct_rows
from membrane.observe.record import flow_record
from membrane.service.manager import FlowIndex, ServiceManager


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
    encoder = FlowEncoder(ServiceResolver(), "node-1")
    encoded = encoder.encode(rows, 1, 0, 0, encoder.connection_services(rows))
    first, second = (observer_pb2.GetFlowsResponse.FromString(b).flow for b in encoded)
    assert first.destination_service.name == "db"
    assert not second.HasField("destination_service")


@dataclass
class ChangingResolver(ServiceResolver):
    """shop/db until it is deleted; its backend's ports say which rows to look at."""

    deleted: bool = False

    def connection_service(
        self, client: str, backend: str, port: int, protocol: int
    ) -> tuple[str, str] | None:
        return None if self.deleted else super().connection_service(client, backend, port, protocol)

    def backend_ports(self) -> frozenset[int]:
        return frozenset() if self.deleted else frozenset({5432})


def names(segment: RawSegment) -> list[tuple[str, str]]:
    flows = [segment.item(i).flow for i in range(len(segment))]
    return [(f.destination_service.name, f.source_service.name) for f in flows]


def test_the_service_is_resolved_when_the_rows_are_read() -> None:
    """Rows read while shop/db existed name it after it is deleted (the encoder's caches
    are cold: nothing was encoded before); a later connection to the same backend,
    read after, names none, though its 5-tuple is the same."""
    resolver = ChangingResolver()
    encoder = FlowEncoder(resolver, "node-1")
    reply = event(saddr=event()["daddr"], daddr=event()["saddr"], sport=5432, dport=43512)
    dtype = flow_event_dtype()
    through = RawSegment(event_rows(dtype, [event(), reply, event(dport=5433)]), encoder)
    through.bind(0, 1)
    resolver.deleted = True
    direct = RawSegment(event_rows(dtype, [event(), reply]), encoder)
    direct.bind(3, 1)
    assert names(through) == [("db", ""), ("", "db"), ("", "")]
    assert names(direct) == [("", ""), ("", "")]
    assert direct.services is None  # no backend's port: nothing was looked up


def test_rows_of_no_backend_port_are_not_looked_up() -> None:
    asked: list[int] = []

    @dataclass
    class Counting(ChangingResolver):
        def connection_service(
            self, client: str, backend: str, port: int, protocol: int
        ) -> tuple[str, str] | None:
            asked.append(port)
            return super().connection_service(client, backend, port, protocol)

    rows = event_rows(flow_event_dtype(), [event(dport=80, sport=81)] * 50 + [event()] * 50)
    codes = FlowEncoder(Counting(), "node-1").connection_services(rows)
    assert codes is not None and (codes[:50] == 0).all() and (codes[50:] != 0).all()
    assert asked == [5432]  # the 50 equal rows of a port of a backend: one lookup


def test_distinct_rows_match_numpys_unique() -> None:
    rng = np.random.default_rng(7)
    keys = rng.integers(0, 3, size=(500, 11), dtype=np.uint32)
    first, inverse = _distinct_rows(keys)
    assert (keys[first][inverse] == keys).all()
    assert len(first) == len(np.unique(keys, axis=0))


def test_a_frontend_names_its_service_without_a_map_lookup() -> None:
    """A flow seen before the endpoint programs' per-packet translation (to the ClusterIP),
    or a reply after it (from the ClusterIP), names the frontend's Service; its port is
    one the encoder looks at."""
    index = FlowIndex(
        frozenset({("198.18.0.5", 8080, 6)}),
        {1: ("shop", "web")},
        {("198.19.128.10", 80, 6): ("shop", "web")},
    )
    assert index.backend_ports == {8080, 80}
    no_maps = SimpleNamespace(flow_index=index, maps=None)  # a map lookup would fail
    assert ServiceManager.connection_service(no_maps, None, "198.19.128.10", 80, 6) == (  # type: ignore[arg-type]
        "shop",
        "web",
    )
    assert ServiceManager.connection_service(no_maps, None, "198.19.128.11", 80, 6) is None  # type: ignore[arg-type]
