"""The agent's memory of recent flows, and the live feed for `membrane observe --follow`.

Items are observer.GetFlowsResponse messages (a flow, or a lost-events notice); they leave
the store as their protobuf JSON (`response_dict`), the form the API serves. Everything
here runs on the agent's event loop thread (a reader thread hands items over with
`loop.call_soon_threadsafe(store.extend, items)`): no locks, and a follower can never slow
the agent down. A follower that does not keep up loses its oldest queued items and is told
how many, in the stream, where they are missing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Any

from membrane.hubble.flow import flow_pb2
from membrane.hubble.observer import observer_pb2
from membrane.observe.flowfilter import FlowFilter
from membrane.observe.record import lost_response, response_dict

DEFAULT_CAPACITY = 8192
DEFAULT_FOLLOWER_QUEUE = 4096
Item = observer_pb2.GetFlowsResponse
Record = dict[str, Any]  # an item's protobuf JSON


def lost_events(count: int, node_name: str = "") -> Record:
    """The line a follower gets in place of items it was too slow to take: Hubble's
    lost_events notice (source: the follower's own buffer)."""
    return response_dict(lost_response(flow_pb2.HUBBLE_RING_BUFFER, count, node_name))


def _passes(item: Item, flow_filter: FlowFilter | None) -> bool:
    """Flows that match; notices always (a loss concerns every filter)."""
    if flow_filter is None or not item.HasField("flow"):
        return True
    return flow_filter.matches(item.flow)


class SubscriptionClosed(Exception):
    """The store closed the subscription (the agent is stopping)."""


class Subscription:
    """One follower's queue of matching records. Iterate it (`async for item in sub`), or
    `await sub.get()`; an item is a record, or a `lost_events` notice where records were
    dropped because the follower fell `maxsize` records behind."""

    def __init__(self, flow_filter: FlowFilter, backlog: list[Item], maxsize: int) -> None:
        self.filter = flow_filter
        self.missed = 0  # records dropped for this follower, in total
        self._unreported = 0
        # The backlog was asked for, so it raises the limit rather than using it up.
        self._items: deque[Item] = deque(backlog)
        self._limit = maxsize + len(backlog)
        self._ready = asyncio.Event()
        self._closed = False
        if backlog:
            self._ready.set()

    def offer(self, record: Item) -> None:
        if self._closed or not _passes(record, self.filter):
            return
        if len(self._items) >= self._limit:
            self._items.popleft()
            self.missed += 1
            self._unreported += 1
        self._items.append(record)
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def get(self) -> Record:
        while not self._items and not self._unreported:
            if self._closed:
                raise SubscriptionClosed
            self._ready.clear()
            await self._ready.wait()
        if self._unreported:
            count, self._unreported = self._unreported, 0
            return lost_events(count)
        return response_dict(self._items.popleft())

    def __aiter__(self) -> AsyncIterator[Record]:
        return self

    async def __anext__(self) -> Record:
        try:
            return await self.get()
        except SubscriptionClosed:
            raise StopAsyncIteration from None


class FlowStore:
    """The last `capacity` items, oldest first, and the followers' subscriptions."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._records: deque[Item] = deque(maxlen=capacity)
        self._subscriptions: set[Subscription] = set()
        self.total = 0  # records ever appended

    def __len__(self) -> int:
        return len(self._records)

    def append(self, record: Item) -> None:
        self._records.append(record)
        self.total += 1
        for sub in self._subscriptions:
            sub.offer(record)

    def extend(self, records: Iterable[Item]) -> None:
        for record in records:
            self.append(record)

    def last(self, n: int, flow_filter: FlowFilter | None = None) -> list[Record]:
        """The newest `n` items that match, oldest first, as protobuf JSON."""
        return [response_dict(item) for item in self._last(n, flow_filter)]

    def _last(self, n: int, flow_filter: FlowFilter | None) -> list[Item]:
        if n <= 0:
            return []
        found: list[Item] = []
        for record in reversed(self._records):
            if _passes(record, flow_filter):
                found.append(record)
                if len(found) == n:
                    break
        found.reverse()
        return found

    def subscribe(
        self,
        flow_filter: FlowFilter | None = None,
        last: int = 0,
        maxsize: int = DEFAULT_FOLLOWER_QUEUE,
    ) -> Subscription:
        """A follower's feed: first the newest `last` matching records, then every new
        one. Taken in one step, so nothing falls between the backlog and the live feed."""
        flow_filter = flow_filter or FlowFilter()
        sub = Subscription(flow_filter, self._last(last, flow_filter), maxsize)
        self._subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)
        sub.close()

    def close(self) -> None:
        """End every follower's feed (their iteration stops once they have read it)."""
        for sub in self._subscriptions:
            sub.close()
        self._subscriptions.clear()
