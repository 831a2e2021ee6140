"""FlowStore keeps the newest GetFlowsResponses, answers GetFlows queries with Hubble's
meaning of number/first/follow/since/until, reports losses once per query, and feeds
followers without ever waiting for them. (Which flows a filter selects:
test_observe_filters.py.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from observe_support import FakeResolver, event, world_drop

from membrane.errors import UserError
from membrane.hubble.flow import flow_pb2
from membrane.hubble.observer import observer_pb2
from membrane.observe.flowfilter import FlowMatcher
from membrane.observe.record import flow_record, flow_response, lost_response, response_dict
from membrane.observe.store import (
    FlowQuery,
    FlowStore,
    Subscription,
    build_matcher,
    check_capacity,
    lost_events,
)

SECOND = 1_000_000_000
RESOLVER = FakeResolver()
ALLOWED = flow_record(event(), RESOLVER, "n1")  # shop/web -> shop/db:5432 TCP, forwarded
DROPPED = flow_record(world_drop(), RESOLVER, "n1")  # world -> shop/db:5432 TCP, dropped


def numbered(
    n: int, verdict: int = flow_pb2.FORWARDED, at: int | None = None
) -> observer_pb2.GetFlowsResponse:
    """Flow n, at second n (or `at`) of the epoch (times order the store's queries)."""
    flow = flow_pb2.Flow(uuid=str(n), verdict=verdict)
    flow.time.FromNanoseconds((n if at is None else at) * SECOND)
    return flow_response(flow)


def wire(n: int) -> dict[str, Any]:
    return response_dict(numbered(n))


def n_of(item: dict[str, Any] | observer_pb2.GetFlowsResponse) -> int:
    if isinstance(item, observer_pb2.GetFlowsResponse):
        return int(item.flow.uuid)
    return int(item["flow"]["uuid"])


def ns(items: list[observer_pb2.GetFlowsResponse]) -> list[int | str]:
    """Flow numbers, and "lost SOURCE COUNT" for notices."""
    out: list[int | str] = []
    for item in items:
        if item.HasField("lost_events"):
            source = flow_pb2.LostEventSource.Name(item.lost_events.source)
            out.append(f"lost {source} {item.lost_events.num_events_lost}")
        else:
            out.append(n_of(item))
    return out


# ---- FlowStore --------------------------------------------------------------------------
def test_store_keeps_the_newest_capacity_records() -> None:
    store = FlowStore(capacity=3)
    store.extend(numbered(i) for i in range(5))
    assert len(store) == 3 and store.total == 5 and store.seen_flows == 5
    assert store.evicted == 2
    assert ns(store.last(10)) == [2, 3, 4]  # asked for the newest: nothing reported lost
    assert ns(store.last(2)) == [3, 4]
    assert store.last(0) == []


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (FlowQuery(number=3), [7, 8, 9]),
        (FlowQuery(number=3, first=True), [0, 1, 2]),
        (FlowQuery(), list(range(10))),  # number 0 without follow: all
        (FlowQuery(first=True), list(range(10))),
        (FlowQuery(since_ns=6 * SECOND), [6, 7, 8, 9]),
        (FlowQuery(number=2, since_ns=6 * SECOND), [6, 7]),  # since wins over number
        (FlowQuery(until_ns=3 * SECOND), [0, 1, 2, 3]),
        (FlowQuery(number=2, until_ns=5 * SECOND), [4, 5]),
        (FlowQuery(number=2, first=True, until_ns=5 * SECOND), [0, 1]),
        (FlowQuery(since_ns=3 * SECOND, until_ns=5 * SECOND), [3, 4, 5]),
        (FlowQuery(since_ns=20 * SECOND), []),
        (FlowQuery(follow=True), []),  # only new flows
    ],
)
def test_queries_as_hubble_reads_its_ring(query: FlowQuery, expected: list[int]) -> None:
    store = FlowStore(capacity=15)
    store.extend(numbered(i) for i in range(10))
    assert ns(store.query(query)) == expected


def test_time_bounds_hold_for_items_a_little_out_of_order() -> None:
    store = FlowStore()
    store.extend(numbered(i) for i in (0, 1, 2, 5, 3, 4))  # 3 and 4 handed over late
    assert ns(store.query(FlowQuery(since_ns=3 * SECOND))) == [5, 3, 4]
    assert ns(store.query(FlowQuery(until_ns=3 * SECOND))) == [0, 1, 2, 3]
    assert ns(store.query(FlowQuery(first=True, until_ns=3 * SECOND))) == [0, 1, 2, 3]


def test_filters_select_before_counting() -> None:
    store = FlowStore()
    store.extend(
        numbered(i, flow_pb2.DROPPED if i % 3 == 0 else flow_pb2.FORWARDED) for i in range(10)
    )
    dropped = build_matcher([flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED])], [])
    assert ns(store.query(FlowQuery(number=2, matcher=dropped))) == [6, 9]
    assert ns(store.query(FlowQuery(number=2, first=True, matcher=dropped))) == [0, 3]
    not_dropped = build_matcher([], [flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED])])
    assert ns(store.query(FlowQuery(number=3, matcher=not_dropped))) == [5, 7, 8]


def test_last_counts_only_matching_records() -> None:
    store = FlowStore()
    allowed, dropped_flow = flow_response(ALLOWED), flow_response(DROPPED)
    store.extend([allowed, dropped_flow, allowed, dropped_flow, allowed])
    dropped = FlowMatcher.build([flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED])])
    assert store.last(5, dropped) == [dropped_flow] * 2
    assert store.last(1, dropped) == [dropped_flow]


def test_ring_buffer_losses_in_range_are_one_line_per_query() -> None:
    store = FlowStore()
    perf = flow_pb2.PERF_EVENT_RING_BUFFER
    store.extend([numbered(0), lost_response(perf, 5, "n1"), numbered(1)])
    store.extend([lost_response(perf, 2, "n1"), numbered(2), numbered(3)])
    dropped = FlowMatcher.build([flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED])])
    # Notices pass every filter, summed into one line ahead of the flows
    assert ns(store.query(FlowQuery(number=5, matcher=dropped))) == [
        "lost PERF_EVENT_RING_BUFFER 7"
    ]
    assert ns(store.last(2)) == [2, 3]  # the newest two: no loss among them
    assert ns(store.last(3)) == ["lost PERF_EVENT_RING_BUFFER 2", 1, 2, 3]


def test_flows_the_ring_let_go_are_lost_to_queries_reaching_back() -> None:
    store = FlowStore(capacity=3)
    store.extend(numbered(i, at=100 * i) for i in range(5))  # far apart: no reordering
    lost = "lost HUBBLE_RING_BUFFER 2"
    assert ns(store.query(FlowQuery(first=True, number=1))) == [lost, 2]
    assert ns(store.query(FlowQuery())) == [lost, 2, 3, 4]
    assert ns(store.query(FlowQuery(since_ns=0))) == [lost, 2, 3, 4]
    assert ns(store.query(FlowQuery(since_ns=300 * SECOND))) == [3, 4]  # within the ring


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("4095", True),
        (1, True),
        (65535, True),
        (131071, True),
        ("4096", False),
        (0, False),
        (-1, False),
        ("x", False),
        ((1 << 25) - 1, False),
    ],
)
def test_capacity_is_one_less_than_a_power_of_two(value: object, ok: bool) -> None:
    if ok:
        assert check_capacity(value) == int(value)  # type: ignore[call-overload]
        return
    with pytest.raises(UserError) as err:
        check_capacity(value)  # type: ignore[arg-type]
    assert err.value.field == "hubble-buffer-size"


def test_a_bad_filter_names_its_list_index_and_field() -> None:
    with pytest.raises(UserError) as err:
        build_matcher([flow_pb2.FlowFilter()], [flow_pb2.FlowFilter(source_ip=["nope"])])
    assert err.value.field == "blacklist[0].source_ip"
    assert build_matcher([], []) is None


async def _take(sub: Subscription, n: int) -> list[observer_pb2.GetFlowsResponse]:
    return [await asyncio.wait_for(sub.get(), 1) for _ in range(n)]


def follow(number: int = 0, **kw: Any) -> FlowQuery:
    return FlowQuery(number=number, follow=True, **kw)


def test_a_follower_gets_the_backlog_then_live_records() -> None:
    async def scenario() -> list[int | str]:
        store = FlowStore()
        store.extend(numbered(i) for i in range(5))
        sub = store.subscribe(follow(2))
        store.append(numbered(5))
        return ns(await _take(sub, 3))

    assert asyncio.run(scenario()) == [3, 4, 5]


def test_a_follow_ends_at_the_first_flow_past_until() -> None:
    async def scenario() -> list[int | str]:
        store = FlowStore()
        store.extend(numbered(i) for i in range(3))
        sub = store.subscribe(follow(1, until_ns=4 * SECOND))
        store.extend(numbered(i) for i in range(3, 7))  # 5, 6: past it, not yet closing
        store.extend([numbered(3, at=4), numbered(20)])  # late 3 still in; 20: the end
        return [n_of(item) for item in await asyncio.wait_for(_drain(sub), 5)]

    assert asyncio.run(scenario()) == [2, 3, 4, 3]


async def _drain(sub: Subscription) -> list[observer_pb2.GetFlowsResponse]:
    return [item async for item in sub]


def test_a_waiting_follower_wakes_for_a_new_record() -> None:
    async def scenario() -> observer_pb2.GetFlowsResponse:
        store = FlowStore()
        sub = store.subscribe()
        waiter = asyncio.create_task(sub.get())
        await asyncio.sleep(0)
        assert not waiter.done()
        asyncio.get_running_loop().call_soon(store.append, numbered(1))
        return await asyncio.wait_for(waiter, 1)

    assert asyncio.run(scenario()) == numbered(1)


def test_a_follower_only_gets_what_its_filter_matches() -> None:
    async def scenario() -> list[Any]:
        store = FlowStore()
        dropped = FlowMatcher.build([flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED])])
        sub = store.subscribe(follow(matcher=dropped))
        store.extend(flow_response(f) for f in (ALLOWED, DROPPED, ALLOWED))
        return [*await _take(sub, 1), sub.missed]

    assert asyncio.run(scenario()) == [flow_response(DROPPED), 0]


def test_a_slow_follower_loses_its_oldest_and_is_told_where() -> None:
    async def scenario() -> tuple[list[Any], int, int]:
        store = FlowStore()
        sub = store.subscribe(follow(), maxsize=3)
        store.extend(numbered(i) for i in range(10))  # the agent never waits for it
        items = await _take(sub, 4)
        store.append(numbered(10))
        items += await _take(sub, 1)
        return items, sub.missed, store.follower_missed

    items, missed, store_missed = asyncio.run(scenario())
    assert response_dict(items[0])["lost_events"] == response_dict(lost_events(7))["lost_events"]
    assert ns(items) == ["lost HUBBLE_RING_BUFFER 7", 7, 8, 9, 10]
    assert missed == store_missed == 7


def test_the_backlog_does_not_use_up_the_live_allowance() -> None:
    async def scenario() -> list[int | str]:
        store = FlowStore()
        store.extend(numbered(i) for i in range(4))
        sub = store.subscribe(follow(4), maxsize=1)
        store.append(numbered(4))
        return ns(await _take(sub, 5))

    assert asyncio.run(scenario()) == [0, 1, 2, 3, 4]


def test_closing_ends_iteration_after_what_was_queued() -> None:
    async def scenario() -> list[int]:
        store = FlowStore()
        sub = store.subscribe()
        store.extend([numbered(1), numbered(2)])
        store.close()
        store.append(numbered(3))  # after close: nobody is fed
        return [n_of(r) async for r in sub]

    assert asyncio.run(scenario()) == [1, 2]


def test_unsubscribe_stops_the_feed() -> None:
    async def scenario() -> list[int]:
        store = FlowStore()
        sub = store.subscribe()
        store.append(numbered(1))
        store.unsubscribe(sub)
        store.append(numbered(2))
        return [n_of(r) async for r in sub]

    assert asyncio.run(scenario()) == [1]


def test_sinks_see_every_batch_after_they_join() -> None:
    store = FlowStore()
    store.append(numbered(0))
    batches: list[list[int | str]] = []
    store.add_sink(lambda batch: batches.append(ns(batch)))
    store.extend(numbered(i) for i in (1, 2))
    assert batches == [[1, 2]]


def test_followers_wait_while_the_reader_is_behind() -> None:
    """A follower is served only while the flow reader has handed over (nearly) all it
    drained: it falls behind, never the reader."""
    from membrane.observe.store import READER_BEHIND_ROWS

    async def scenario() -> tuple[bool, list[int | str]]:
        store = FlowStore()
        backlog = [READER_BEHIND_ROWS + 1]
        store.reader_backlog = lambda: backlog[0]
        sub = store.subscribe()
        store.append(numbered(1))
        waiter = asyncio.create_task(sub.messages(10))
        await asyncio.sleep(0.05)
        waited = not waiter.done()
        backlog[0] = READER_BEHIND_ROWS
        messages = await asyncio.wait_for(waiter, 1)
        return waited, ns([observer_pb2.GetFlowsResponse.FromString(m) for m in messages])

    assert asyncio.run(scenario()) == (True, [1])
