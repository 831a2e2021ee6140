"""The agent's memory of recent flows (Hubble's ring of `--hubble-buffer-size` events), the
queries of GetFlows over it, and the live feeds of followers.

Items are observer.GetFlowsResponse messages: flows, and lost-events notices where the
datapath's ring buffer overflowed. Everything here runs on the agent's event loop thread
(a reader thread hands items over with `loop.call_soon_threadsafe(store.extend, items)`):
no locks, and a follower can never slow the agent down.

Losses are counted per stage and reported once per query, never silently:
- the datapath's ring buffer (PERF_EVENT_RING_BUFFER): the reader's notices, kept in the
  store; a query sums those in its range into one line;
- the store (HUBBLE_RING_BUFFER): flows that fell out of the ring before a query that
  reaches back to its oldest flow (--first, --all, --since before it) could read them;
- a slow follower (HUBBLE_RING_BUFFER, as Hubble names a reader overtaken by the writer):
  it loses its oldest queued items and is told how many, in the stream, where they are
  missing.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from membrane.errors import UserError
from membrane.hubble.flow import flow_pb2
from membrane.hubble.observer import observer_pb2
from membrane.observe.record import lost_response

DEFAULT_CAPACITY = 4095  # Hubble's --hubble-event-buffer-capacity default
# Hubble caps its ring at 65535; ours may be larger (100k flows and more are measured).
MAX_CAPACITY = (1 << 24) - 1
DEFAULT_FOLLOWER_QUEUE = 4096
# Items arrive nearly, not exactly, in time order (CPUs, and readers of other rings such as
# the kernel drop monitor, hand over batches apart): a time bound stops a scan only at an
# item this much beyond it; the items in between are checked one by one.
REORDER_SLACK_NS = 5_000_000_000
Item = observer_pb2.GetFlowsResponse
_STORE_SOURCE = flow_pb2.HUBBLE_RING_BUFFER
_FOLLOWER_SOURCE = flow_pb2.HUBBLE_RING_BUFFER


class Matcher(Protocol):
    """What selects flows: observe.flowfilter's FlowMatcher (Hubble's whitelist and
    blacklist) or anything else with its `matches`."""

    def matches(self, flow: flow_pb2.Flow) -> bool: ...


def build_matcher(
    whitelist: Sequence[flow_pb2.FlowFilter],
    blacklist: Sequence[flow_pb2.FlowFilter],
    names: tuple[str, str] = ("whitelist", "blacklist"),
) -> Matcher | None:
    """Hubble's filter lists as one matcher (None: both empty, every flow). An invalid
    value is a UserError naming where it is: `whitelist[0].source_ip`."""
    if not whitelist and not blacklist:
        return None
    from membrane.observe.flowfilter import FlowMatcher, compile_filter

    for name, filters in zip(names, (whitelist, blacklist), strict=True):
        for i, flow_filter in enumerate(filters):
            try:
                compile_filter(flow_filter)
            except UserError as err:
                raise UserError(f"{name}[{i}].{err.field}", err.problem) from None
    return FlowMatcher.build(whitelist, blacklist)


def check_capacity(capacity: int | str, option: str = "hubble-buffer-size") -> int:
    """Hubble's rule for its ring: 2^n - 1 flows (1, 3, 7, ..., 4095, ...)."""
    try:
        value = int(capacity)
    except (TypeError, ValueError):
        raise UserError(option, f"{capacity!r} is not a whole number") from None
    if value <= 0 or value & (value + 1):
        raise UserError(
            option, f"{value} is not one less than a power of two (1, 3, 7, ..., 4095, ...)"
        )
    if value > MAX_CAPACITY:
        raise UserError(option, f"{value} is larger than {MAX_CAPACITY}")
    return value


def item_ns(item: Item) -> int:
    """An item's time (the flow's), in nanoseconds since the epoch."""
    t = item.time
    return t.seconds * 1_000_000_000 + t.nanos


@dataclass(frozen=True)
class FlowQuery:
    """A GetFlowsRequest's choice of items, with Hubble's meaning: `number` newest
    matching flows (0: all, or with `follow` none), or with `first` the oldest; `since`
    takes precedence over `number` (the first `number` from `since` on); flows after
    `until` end the answer (and a follow). Lost-events notices pass every filter."""

    number: int = 0
    first: bool = False
    follow: bool = False
    since_ns: int | None = None
    until_ns: int | None = None
    matcher: Matcher | None = None

    def selects(self, item: Item) -> bool:
        return self.matcher is None or self.matcher.matches(item.flow)


def lost_events(count: int, node_name: str = "", source: int = _FOLLOWER_SOURCE) -> Item:
    """The notice a follower gets in place of items it was too slow to take."""
    return lost_response(source, count, node_name)


class SubscriptionClosed(Exception):
    """The store closed the subscription (the agent is stopping)."""


class Subscription:
    """One follower's queue of matching items. Iterate it (`async for item in sub`), or
    `await sub.get()`; an item is a GetFlowsResponse, or a lost-events notice where items
    were dropped because the follower fell `maxsize` items behind."""

    def __init__(self, query: FlowQuery, backlog: list[Item], maxsize: int) -> None:
        self.query = query
        self.missed = 0  # items dropped for this follower, in total
        self._unreported = 0
        # The backlog was asked for, so it raises the limit rather than using it up.
        self._items: deque[Item] = deque(backlog)
        self._limit = maxsize + len(backlog)
        self._ready = asyncio.Event()
        self._closed = False
        if backlog:
            self._ready.set()

    def offer(self, item: Item) -> None:
        if self._closed:
            return
        if item.HasField("flow"):
            until = self.query.until_ns
            if until is not None and item_ns(item) > until:
                if item_ns(item) > until + REORDER_SLACK_NS:
                    self.close()  # Hubble ends a follow once flows are past `until`
                return
            if not self.query.selects(item):
                return
        if len(self._items) >= self._limit:
            self._items.popleft()
            self.missed += 1
            self._unreported += 1
        self._items.append(item)
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def get(self) -> Item:
        while not self._items and not self._unreported:
            if self._closed:
                raise SubscriptionClosed
            self._ready.clear()
            await self._ready.wait()
        if self._unreported:
            count, self._unreported = self._unreported, 0
            return lost_events(count)
        return self._items.popleft()

    def __aiter__(self) -> AsyncIterator[Item]:
        return self

    async def __anext__(self) -> Item:
        try:
            return await self.get()
        except SubscriptionClosed:
            raise StopAsyncIteration from None


class FlowStore:
    """The last `capacity` items, oldest first, and the followers' subscriptions."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, node_name: str = "") -> None:
        self.capacity = capacity
        self.node_name = node_name
        self._items: deque[Item] = deque(maxlen=capacity)
        self._subscriptions: set[Subscription] = set()
        self._sinks: list[Callable[[list[Item]], object]] = []
        self.total = 0  # items ever appended
        self.seen_flows = 0  # flows ever appended (ServerStatus.seen_flows)
        self.evicted = 0  # items that fell out of the ring
        self.follower_missed = 0  # items dropped for slow followers, all of them

    def __len__(self) -> int:
        return len(self._items)

    def append(self, item: Item) -> None:
        if len(self._items) == self.capacity:
            self.evicted += 1
        self._items.append(item)
        self.total += 1
        if item.HasField("flow"):
            self.seen_flows += 1
        for sub in self._subscriptions:
            missed = sub.missed
            sub.offer(item)
            self.follower_missed += sub.missed - missed

    def extend(self, items: Iterable[Item]) -> None:
        batch = list(items)
        for item in batch:
            self.append(item)
        for sink in self._sinks:
            sink(batch)

    def add_sink(self, sink: Callable[[list[Item]], object]) -> None:
        """`sink` sees every batch the store takes from now on (the flow log)."""
        self._sinks.append(sink)

    # ---- queries ---------------------------------------------------------------------------
    def query(self, query: FlowQuery) -> list[Item]:
        """The answer to a query that does not follow: its flows, oldest first, after
        one lost-events line per source that lost any in the range it covers."""
        flows, lost = self._select(query)
        return [*self._lost_lines(lost), *flows]

    def last(self, n: int, matcher: Matcher | None = None) -> list[Item]:
        """The newest `n` matching flows (and the losses among them)."""
        return self.query(FlowQuery(number=n, matcher=matcher)) if n > 0 else []

    def _select(self, query: FlowQuery) -> tuple[list[Item], dict[int, int]]:
        lost: dict[int, int] = {}
        if query.follow and query.number == 0 and query.since_ns is None:
            return [], lost  # only new flows
        since, until = query.since_ns, query.until_ns
        reached_oldest = True
        if query.first and since is None:
            flows = self._forward(query, lost)
        else:
            # Newest to oldest, until enough are found or `since` is passed.
            want = query.number if since is None else 0
            flows = []
            for item in reversed(self._items):
                if not item.HasField("flow"):
                    _count_lost(lost, item)
                    continue
                t = item_ns(item)
                if since is not None and t < since:
                    if t < since - REORDER_SLACK_NS:
                        reached_oldest = False
                        break
                    continue
                if (until is None or t <= until) and query.selects(item):
                    flows.append(item)
                    if len(flows) == want:
                        reached_oldest = False
                        break
            flows.reverse()
            if since is not None and query.number and not query.follow:
                flows = flows[: query.number]
        # Flows the ring let go of are lost to a query reaching back to the oldest: all,
        # first, or since before it (not to `number` newest, which asked for no more).
        wants_history = query.first or since is not None or query.number == 0
        if reached_oldest and wants_history and self.evicted:
            lost[_STORE_SOURCE] = lost.get(_STORE_SOURCE, 0) + self.evicted
        return flows, lost

    def _forward(self, query: FlowQuery, lost: dict[int, int]) -> list[Item]:
        flows: list[Item] = []
        for item in self._items:
            if not item.HasField("flow"):
                _count_lost(lost, item)
                continue
            until = query.until_ns
            if until is not None and item_ns(item) > until:
                if item_ns(item) > until + REORDER_SLACK_NS:
                    break
                continue
            if query.selects(item):
                flows.append(item)
                if len(flows) == query.number:
                    break
        return flows

    def _lost_lines(self, lost: dict[int, int]) -> Iterator[Item]:
        now = time.time_ns()
        for source, count in sorted(lost.items()):
            yield lost_response(source, count, self.node_name, now)

    # ---- followers -------------------------------------------------------------------------
    def subscribe(
        self, query: FlowQuery = FlowQuery(follow=True), maxsize: int = DEFAULT_FOLLOWER_QUEUE
    ) -> Subscription:
        """A follower's feed: first the query's backlog, then every new matching item.
        Taken in one step, so nothing falls between the backlog and the live feed."""
        flows, lost = self._select(query)
        sub = Subscription(query, [*self._lost_lines(lost), *flows], maxsize)
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


def _count_lost(lost: dict[int, int], item: Item) -> None:
    if item.HasField("lost_events"):
        source = item.lost_events.source
        lost[source] = lost.get(source, 0) + item.lost_events.num_events_lost
