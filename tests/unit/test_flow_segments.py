"""The flow reader's batches in the store: raw rows (agent.flows.RawSegment) that become
GetFlowsResponses only when read, once, with uuids that do not change between reads; and
followers as cursors into the store's ring, told exactly how much the writer overtook."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import numpy as np
import pytest
from observe_support import FakeResolver, event, event_rows, flow_event_dtype, world_drop

from membrane.agent.flows import RawSegment
from membrane.hubble.flow import flow_pb2
from membrane.observe.encode import FlowEncoder
from membrane.observe.flowfilter import FlowMatcher
from membrane.observe.record import event_response, lost_response, supported_rows
from membrane.observe.store import FlowQuery, FlowStore

RESOLVER = FakeResolver()
ENCODER = FlowEncoder(RESOLVER, "n1")


@pytest.fixture(scope="module")
def dtype() -> np.dtype:
    return flow_event_dtype()


def at(i: int, **header: int) -> dict[str, Any]:
    """Event i, i ms after the first, with its own source port (and `header` fields)."""
    return event(h={"ts_ns": 1_000_000_000 + i * 1_000_000, **header}, sport=10_000 + i)


def segment(dtype: np.dtype, first: int, count: int) -> RawSegment:
    return RawSegment(event_rows(dtype, [at(i) for i in range(first, first + count)]), ENCODER)


class CountingEncoder(FlowEncoder):
    rows_encoded = 0

    def encode(self, rows: np.ndarray, *args: Any) -> list[bytes]:
        self.rows_encoded += len(rows)
        return super().encode(rows, *args)


def test_rows_become_flows_only_when_read_once_with_stable_uuids(dtype: np.dtype) -> None:
    encoder = CountingEncoder(FakeResolver(), "n1")
    events = [at(i) for i in range(600)]  # three chunks of 256 rows: 0-255, 256-511, 512-599
    store = FlowStore()
    store.extend(RawSegment(event_rows(dtype, events), encoder))
    assert store.seen_flows == len(store) == 600 and encoder.rows_encoded == 0
    newest = store.last(3)
    assert encoder.rows_encoded == 88  # the last chunk only
    assert store.last(3) == newest and encoder.rows_encoded == 88  # encoded once, kept
    everything = store.query(FlowQuery())
    assert encoder.rows_encoded == 600
    uuids = [item.flow.uuid for item in everything]
    assert len(set(uuids)) == 600 and all(uuid.UUID(u).version == 4 for u in uuids)
    assert everything[-3:] == newest
    # The same flows the per-event path builds, but for the uuid
    for item, ev in zip(everything, events, strict=True):
        expected = event_response(ev, FakeResolver(), "n1", flow_uuid=item.flow.uuid)
        assert item == expected


def test_uuids_differ_between_stores(dtype: np.dtype) -> None:
    a, b = FlowStore(), FlowStore()
    a.extend(segment(dtype, 0, 1))
    b.extend(segment(dtype, 0, 1))
    assert a.last(1)[0].flow.uuid != b.last(1)[0].flow.uuid


def test_queries_over_raw_and_built_segments_keep_their_order(dtype: np.dtype) -> None:
    store = FlowStore(capacity=7)
    store.extend(segment(dtype, 0, 4))
    store.extend([lost_response(flow_pb2.PERF_EVENT_RING_BUFFER, 9, "n1")])
    store.extend(segment(dtype, 4, 4))  # the ring keeps the newest 7: 2, 3, notice, 4..7
    got = store.query(FlowQuery())
    assert [item.flow.l4.TCP.source_port - 10_000 for item in got[2:]] == list(range(2, 8))
    assert got[0].lost_events.source == flow_pb2.PERF_EVENT_RING_BUFFER
    assert got[0].lost_events.num_events_lost == 9
    assert got[1].lost_events.source == flow_pb2.HUBBLE_RING_BUFFER
    assert got[1].lost_events.num_events_lost == 2
    drops = FlowMatcher.build([flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED])])
    store.extend(RawSegment(event_rows(dtype, [world_drop()]), ENCODER))
    found = store.last(5, drops)  # the notice in range, then the one drop
    assert [item.WhichOneof("response_types") for item in found] == ["lost_events", "flow"]
    assert found[1].flow.verdict == flow_pb2.DROPPED


def test_a_follower_overtaken_by_the_writer_is_told_exactly_how_many(dtype: np.dtype) -> None:
    async def scenario() -> tuple[list[Any], int]:
        store = FlowStore(capacity=15)
        sub = store.subscribe()
        store.extend(segment(dtype, 0, 10))
        first = await asyncio.wait_for(sub.get(), 1)  # flow 0
        store.extend(segment(dtype, 10, 20))  # 29 items written: the ring keeps 15..29
        rest = [await asyncio.wait_for(sub.get(), 1) for _ in range(16)]
        return [first, *rest], sub.missed

    items, missed = asyncio.run(scenario())
    assert items[0].flow.l4.TCP.source_port == 10_000
    assert items[1].lost_events.source == flow_pb2.HUBBLE_RING_BUFFER
    assert items[1].lost_events.num_events_lost == missed == 14  # flows 1..14
    assert [i.flow.l4.TCP.source_port - 10_000 for i in items[2:]] == list(range(15, 30))


def test_a_follower_reads_a_long_run_of_non_matching_rows_without_stalling(
    dtype: np.dtype,
) -> None:
    async def scenario() -> Any:
        store = FlowStore(capacity=4095)
        drops = FlowMatcher.build([flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED])])
        sub = store.subscribe(FlowQuery(follow=True, matcher=drops))
        store.extend(segment(dtype, 0, 2000))  # forwarded: none match
        store.extend(RawSegment(event_rows(dtype, [world_drop()]), ENCODER))
        return await asyncio.wait_for(sub.get(), 10)

    assert asyncio.run(scenario()).flow.verdict == flow_pb2.DROPPED


def test_sinks_see_every_flow_of_a_raw_segment(dtype: np.dtype) -> None:
    store = FlowStore()
    seen: list[int] = []
    store.add_sink(lambda batch: seen.extend(i.flow.l4.TCP.source_port for i in batch))
    store.extend(segment(dtype, 0, 5))
    assert seen == [10_000 + i for i in range(5)]


def test_rows_of_another_version_or_type_are_not_flows(dtype: np.dtype) -> None:
    batch = event_rows(dtype, [at(0), at(1, version=99), at(2, type=77), world_drop()])
    assert supported_rows(batch).tolist() == [True, False, False, True]


def test_a_skip_counts_only_flows_and_passes_on_the_notices_it_skipped(dtype: np.dtype) -> None:
    async def scenario() -> list[Any]:
        store = FlowStore(capacity=7)
        sub = store.subscribe()
        perf = flow_pb2.PERF_EVENT_RING_BUFFER
        store.extend(segment(dtype, 0, 3))
        store.extend([lost_response(perf, 40, "n1")])
        store.extend(segment(dtype, 3, 3))
        store.extend([lost_response(perf, 2, "n1")])
        store.extend(segment(dtype, 6, 6))  # 14 items: the ring keeps the last notice, 6..11
        return [await asyncio.wait_for(sub.get(), 1) for _ in range(4)]

    skipped, notices, kept, first = asyncio.run(scenario())
    assert skipped.lost_events.source == flow_pb2.HUBBLE_RING_BUFFER
    assert skipped.lost_events.num_events_lost == 6  # flows 0..5; the two notices are not flows
    assert notices.lost_events.source == flow_pb2.PERF_EVENT_RING_BUFFER
    assert notices.lost_events.num_events_lost == 40
    assert kept.lost_events.num_events_lost == 2  # still in the ring: read in its place
    assert first.flow.l4.TCP.source_port == 10_006


def test_query_messages_are_the_query_serialized(dtype: np.dtype) -> None:
    """What GetFlows sends (raw rows encoded, not built, unless a filter looks at them) is
    what the query answers, the losses first."""
    from membrane.hubble.observer import observer_pb2

    store = FlowStore(capacity=511)
    store.extend(segment(dtype, 0, 300))
    store.extend([lost_response(flow_pb2.PERF_EVENT_RING_BUFFER, 3, "n1")])
    store.extend(segment(dtype, 300, 300))  # 601 items: the ring keeps the newest 511
    drops = FlowMatcher.build([flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED])])
    store.extend(event_rows_segment(dtype, [world_drop()]))
    for query in (FlowQuery(), FlowQuery(number=5), FlowQuery(first=True, number=7)):
        parsed = [observer_pb2.GetFlowsResponse.FromString(m) for m in store.query_messages(query)]
        expected = store.query(query)
        for got, want in zip(parsed, expected, strict=True):
            if want.HasField("lost_events"):  # a notice's time is the query's
                assert got.lost_events == want.lost_events
            else:
                assert got == want
    [drop] = store.query_messages(FlowQuery(matcher=drops, number=1))
    assert observer_pb2.GetFlowsResponse.FromString(drop).flow.verdict == flow_pb2.DROPPED


def event_rows_segment(dtype: np.dtype, events: list[dict[str, Any]]) -> RawSegment:
    return RawSegment(event_rows(dtype, events), ENCODER)
