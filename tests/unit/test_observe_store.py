"""FlowStore keeps the newest records and feeds followers without ever waiting for them;
FlowFilter parses query parameters (or CLI options) and matches records."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from observe_support import FakeResolver, event, world_drop

from membrane.errors import UserError
from membrane.observe.record import flow_record
from membrane.observe.store import FlowFilter, FlowStore, Subscription, lost_events

RESOLVER = FakeResolver()
ALLOWED = flow_record(event(), RESOLVER, "n1")  # shop/web -> shop/db:5432 TCP, forwarded
DROPPED = flow_record(world_drop(), RESOLVER, "n1")  # world -> shop/db:5432 TCP, dropped
PING = flow_record(event(proto=1, sport=8, dport=0), RESOLVER, "n1")


def numbered(n: int) -> dict[str, Any]:
    return {"n": n, "verdict": "FORWARDED"}


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
    assert [r["n"] for r in store.last(10)] == [2, 3, 4]
    assert [r["n"] for r in store.last(2)] == [3, 4]
    assert store.last(0) == []


def test_last_counts_only_matching_records() -> None:
    store = FlowStore()
    store.extend([ALLOWED, DROPPED, ALLOWED, DROPPED, ALLOWED])
    dropped = FlowFilter(verdict="DROPPED")
    assert store.last(5, dropped) == [DROPPED, DROPPED]
    assert store.last(1, dropped) == [DROPPED]


async def _take(sub: Subscription, n: int) -> list[dict[str, Any]]:
    return [await asyncio.wait_for(sub.get(), 1) for _ in range(n)]


def test_a_follower_gets_the_backlog_then_live_records() -> None:
    async def scenario() -> list[int]:
        store = FlowStore()
        store.extend(numbered(i) for i in range(5))
        sub = store.subscribe(last=2)
        store.append(numbered(5))
        return [r["n"] for r in await _take(sub, 3)]

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

    assert asyncio.run(scenario()) == numbered(1)


def test_a_follower_only_gets_what_its_filter_matches() -> None:
    async def scenario() -> list[dict[str, Any]]:
        store = FlowStore()
        sub = store.subscribe(FlowFilter(verdict="DROPPED"))
        store.extend([ALLOWED, DROPPED, ALLOWED])
        return await _take(sub, 1) + [sub.missed]

    assert asyncio.run(scenario()) == [DROPPED, 0]


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
    assert items == [lost_events(7), numbered(7), numbered(8), numbered(9), numbered(10)]
    assert missed == 7


def test_the_backlog_does_not_use_up_the_live_allowance() -> None:
    async def scenario() -> list[Any]:
        store = FlowStore()
        store.extend(numbered(i) for i in range(4))
        sub = store.subscribe(last=4, maxsize=1)
        store.append(numbered(4))
        return await _take(sub, 5)

    assert asyncio.run(scenario()) == [numbered(i) for i in range(5)]


def test_closing_ends_iteration_after_what_was_queued() -> None:
    async def scenario() -> list[int]:
        store = FlowStore()
        sub = store.subscribe()
        store.extend([numbered(1), numbered(2)])
        store.close()
        store.append(numbered(3))  # after close: nobody is fed
        return [r["n"] async for r in sub]

    assert asyncio.run(scenario()) == [1, 2]


def test_unsubscribe_stops_the_feed() -> None:
    async def scenario() -> list[int]:
        store = FlowStore()
        sub = store.subscribe()
        store.append(numbered(1))
        store.unsubscribe(sub)
        store.append(numbered(2))
        return [r["n"] async for r in sub]

    assert asyncio.run(scenario()) == [1]
