"""FlowStore keeps the newest GetFlowsResponses and feeds followers (as protobuf JSON)
without ever waiting for them; FlowFilter parses query parameters (or CLI options) and
matches flows."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from observe_support import FakeResolver, event, world_drop

from membrane.errors import UserError
from membrane.hubble.flow import flow_pb2
from membrane.hubble.observer import observer_pb2
from membrane.observe.record import flow_record, flow_response, lost_response, response_dict
from membrane.observe.store import FlowFilter, FlowStore, Subscription, lost_events

RESOLVER = FakeResolver()
ALLOWED = flow_record(event(), RESOLVER, "n1")  # shop/web -> shop/db:5432 TCP, forwarded
DROPPED = flow_record(world_drop(), RESOLVER, "n1")  # world -> shop/db:5432 TCP, dropped
PING = flow_record(event(proto=1, sport=8, dport=0), RESOLVER, "n1")


def numbered(n: int) -> observer_pb2.GetFlowsResponse:
    return flow_response(flow_pb2.Flow(uuid=str(n), verdict=flow_pb2.FORWARDED))


def wire(n: int) -> dict[str, Any]:
    return response_dict(numbered(n))


def n_of(item: dict[str, Any]) -> int:
    return int(item["flow"]["uuid"])


# ---- FlowFilter -------------------------------------------------------------------------
def test_params_parse_and_round_trip() -> None:
    params = {
        "namespace": "shop",
        "pod": "shop/db",
        "verdict": "dropped",
        "protocol": "TCP",
        "port": "5432",
    }
    f = FlowFilter.from_params(params)
    assert f == FlowFilter("shop", ("shop", "db"), "DROPPED", "TCP", 5432)
    assert FlowFilter.from_params(f.to_params()) == f
    assert FlowFilter.from_params({}) == FlowFilter() and FlowFilter().to_params() == {}


def test_a_pod_without_namespace_is_in_default() -> None:
    assert FlowFilter.from_params({"pod": "web"}).pod == ("default", "web")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"verdict": "ALLOWED"}, "verdict"),
        ({"protocol": "http"}, "protocol"),
        ({"port": "0"}, "port"),
        ({"port": "http"}, "port"),
        ({"pod": "shop/"}, "pod"),
        ({"pod": "a/b/c"}, "pod"),
        ({"namespace": "a b"}, "namespace"),
        ({"namspace": "shop"}, "namspace"),
    ],
)
def test_bad_params_name_the_field(params: dict[str, str], field: str) -> None:
    with pytest.raises(UserError) as err:
        FlowFilter.from_params(params)
    assert err.value.field == field
    with pytest.raises(UserError) as err:
        FlowFilter.from_params(params, option_prefix="--")
    assert err.value.field == f"--{field}"


@pytest.mark.parametrize(
    ("params", "allowed", "dropped", "ping"),
    [
        ({}, True, True, True),
        ({"namespace": "shop"}, True, True, True),
        ({"namespace": "other"}, False, False, False),
        ({"pod": "shop/web"}, True, False, True),  # web is the source of ALLOWED
        ({"pod": "shop/db"}, True, True, True),  # db is every destination
        ({"verdict": "DROPPED"}, False, True, False),
        ({"protocol": "icmp"}, False, False, True),
        ({"protocol": "udp"}, False, False, False),
        ({"protocol": "icmpv6"}, False, False, False),
        ({"port": "5432"}, True, True, False),  # destination port
        ({"port": "43512"}, True, False, False),  # source port
        ({"port": "8"}, False, False, False),  # ICMP types are not ports
        ({"pod": "shop/web", "verdict": "FORWARDED", "port": "5432"}, True, False, False),
    ],
)
def test_filter_matches(params: dict[str, str], allowed: bool, dropped: bool, ping: bool) -> None:
    f = FlowFilter.from_params(params)
    assert (f.matches(ALLOWED), f.matches(DROPPED), f.matches(PING)) == (allowed, dropped, ping)


# ---- FlowStore --------------------------------------------------------------------------
def test_store_keeps_the_newest_capacity_records() -> None:
    store = FlowStore(capacity=3)
    store.extend(numbered(i) for i in range(5))
    assert len(store) == 3 and store.total == 5
    assert [n_of(r) for r in store.last(10)] == [2, 3, 4]
    assert [n_of(r) for r in store.last(2)] == [3, 4]
    assert store.last(0) == []


def test_last_counts_only_matching_records() -> None:
    store = FlowStore()
    allowed, dropped_flow = flow_response(ALLOWED), flow_response(DROPPED)
    store.extend([allowed, dropped_flow, allowed, dropped_flow, allowed])
    dropped = FlowFilter(verdict="DROPPED")
    assert store.last(5, dropped) == [response_dict(dropped_flow)] * 2
    assert store.last(1, dropped) == [response_dict(dropped_flow)]


def test_lost_notices_pass_every_filter() -> None:
    store = FlowStore()
    lost = lost_response(flow_pb2.PERF_EVENT_RING_BUFFER, 5, "n1")
    store.extend([flow_response(ALLOWED), lost])
    [item] = store.last(5, FlowFilter(verdict="DROPPED"))
    assert item["lost_events"] == {"source": "PERF_EVENT_RING_BUFFER", "num_events_lost": "5"}


async def _take(sub: Subscription, n: int) -> list[dict[str, Any]]:
    return [await asyncio.wait_for(sub.get(), 1) for _ in range(n)]


def test_a_follower_gets_the_backlog_then_live_records() -> None:
    async def scenario() -> list[int]:
        store = FlowStore()
        store.extend(numbered(i) for i in range(5))
        sub = store.subscribe(last=2)
        store.append(numbered(5))
        return [n_of(r) for r in await _take(sub, 3)]

    assert asyncio.run(scenario()) == [3, 4, 5]


def test_a_waiting_follower_wakes_for_a_new_record() -> None:
    async def scenario() -> dict[str, Any]:
        store = FlowStore()
        sub = store.subscribe()
        waiter = asyncio.create_task(sub.get())
        await asyncio.sleep(0)
        assert not waiter.done()
        asyncio.get_running_loop().call_soon(store.append, numbered(1))
        return await asyncio.wait_for(waiter, 1)

    assert asyncio.run(scenario()) == wire(1)


def test_a_follower_only_gets_what_its_filter_matches() -> None:
    async def scenario() -> list[dict[str, Any]]:
        store = FlowStore()
        sub = store.subscribe(FlowFilter(verdict="DROPPED"))
        store.extend(flow_response(f) for f in (ALLOWED, DROPPED, ALLOWED))
        return await _take(sub, 1) + [sub.missed]

    assert asyncio.run(scenario()) == [response_dict(flow_response(DROPPED)), 0]


def test_a_slow_follower_loses_its_oldest_and_is_told_where() -> None:
    async def scenario() -> tuple[list[Any], int]:
        store = FlowStore()
        sub = store.subscribe(maxsize=3)
        store.extend(numbered(i) for i in range(10))  # the agent never waits for it
        items = await _take(sub, 4)
        store.append(numbered(10))
        items += await _take(sub, 1)
        return items, sub.missed

    items, missed = asyncio.run(scenario())
    assert items[0]["lost_events"] == lost_events(7)["lost_events"]
    assert items[1:] == [wire(7), wire(8), wire(9), wire(10)]
    assert missed == 7


def test_the_backlog_does_not_use_up_the_live_allowance() -> None:
    async def scenario() -> list[Any]:
        store = FlowStore()
        store.extend(numbered(i) for i in range(4))
        sub = store.subscribe(last=4, maxsize=1)
        store.append(numbered(4))
        return await _take(sub, 5)

    assert asyncio.run(scenario()) == [wire(i) for i in range(5)]


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
