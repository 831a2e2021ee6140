"""The agent's memory of recent flows (Hubble's ring of `--hubble-buffer-size` events), the
queries of GetFlows over it, and the live feeds of followers.

Items are observer.GetFlowsResponse messages: flows, and lost-events notices where the
datapath's ring buffer overflowed. The ring holds segments: batches of built items, or the
flow reader's raw rows (agent.flows.RawSegment), whose flows are built only when a query,
a follower or the flow log reads them, and once. Everything here runs on the agent's event
loop thread (a reader thread hands batches over with `loop.call_soon_threadsafe(store.extend,
batch)`): no locks, and a follower can never slow the agent down.

Losses are counted per stage and reported once per query, never silently:
- the datapath's ring buffer (PERF_EVENT_RING_BUFFER): the reader's notices, kept in the
  store; a query sums those in its range into one line;
- the store (HUBBLE_RING_BUFFER): flows that fell out of the ring before a query that
  reaches back to its oldest flow (--first, --all, --since before it) could read them;
- a slow follower (HUBBLE_RING_BUFFER, as Hubble names a reader overtaken by the writer):
  its cursor skips to the oldest item it may still read and it is told how many flows
  it skipped (and the notices among them), in the stream, where they are missing.
"""

from __future__ import annotations

import asyncio
import bisect
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from membrane.errors import UserError
from membrane.hubble.flow import flow_pb2
from membrane.hubble.observer import observer_pb2
from membrane.observe.record import lost_response

DEFAULT_CAPACITY = 4095  # Hubble's --hubble-event-buffer-capacity default
# Hubble caps its ring at 65535; ours may be larger (100k flows and more are measured).
MAX_CAPACITY = (1 << 24) - 1
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
    from membrane.observe.flowfilter import FlowMatcher

    return FlowMatcher.build(whitelist, blacklist, names)


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


class Segment:
    """A run of consecutive items of the ring, numbered from `start` (the store's sequence
    number of its first item, set when the store takes it). `item(i)` is a
    GetFlowsResponse, `messages(lo, hi)` the same items serialized (what a follower is
    sent); a segment may build them only when read (RawSegment)."""

    start = 0
    flows_before = 0  # flows the store took before this segment
    lost_before: Mapping[int, int] = MappingProxyType({})  # events reported lost before it
    only_flows = False  # True: every item is a flow (no notices among them)

    def __len__(self) -> int:
        raise NotImplementedError

    def item(self, i: int) -> Item:
        raise NotImplementedError

    def messages(self, lo: int, hi: int) -> list[bytes]:
        """Items lo..hi-1, serialized."""
        return [self.item(i).SerializeToString() for i in range(lo, hi)]

    def is_flow(self, i: int) -> bool:
        return self.only_flows or self.item(i).HasField("flow")

    def time_ns(self, i: int) -> int:
        """Item i's time (item_ns), perhaps without building it."""
        return item_ns(self.item(i))

    def __iter__(self) -> Iterator[Item]:
        return (self.item(i) for i in range(len(self)))

    def bind(self, start: int, uuid_prefix: int) -> None:
        self.start = start

    def counts_before(self, offset: int) -> tuple[int, dict[int, int]]:
        """Flows, and events its notices reported lost by source, in items [0, offset)
        (here: every item is a flow)."""
        return offset, {}


class BuiltSegment(Segment):
    """Items already built: the kernel drop monitor's, notices, a refill from the flow log."""

    def __init__(self, items: list[Item]) -> None:
        self.items = items
        self._messages: list[bytes | None] = [None] * len(items)

    def __len__(self) -> int:
        return len(self.items)

    def item(self, i: int) -> Item:
        return self.items[i]

    def messages(self, lo: int, hi: int) -> list[bytes]:
        out = self._messages[lo:hi]
        for at, message in enumerate(out):
            if message is None:  # serialized once, however many followers read it
                out[at] = self._messages[lo + at] = self.items[lo + at].SerializeToString()
        return out  # type: ignore[return-value]

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def counts_before(self, offset: int) -> tuple[int, dict[int, int]]:
        lost: dict[int, int] = {}
        flows = 0
        for item in self.items[:offset]:
            if item.HasField("flow"):
                flows += 1
            else:
                _count_lost(lost, item)
        return flows, lost


# What a follower is handed: a built item (from its backlog, a notice), or items lo..hi-1
# of a segment (served as that segment's messages, never built when nothing filters).
Entry = Item | tuple[Segment, int, int]


class Subscription:
    """One follower: a cursor into the store's ring (as Hubble's ring readers are), after
    the backlog its query asked for. Iterate it (`async for item in sub`), `await
    sub.get()`, or take slices of serialized items (`await sub.messages(limit)`, what the
    server sends); an item is a GetFlowsResponse, or a lost-events notice where the writer
    overtook the follower (it fell more than `maxsize` items, or the whole ring, behind):
    the exact number of items it skipped, where they are missing. Nothing is copied per
    follower, and items are built only when a filter must look at them."""

    def __init__(self, store: FlowStore, query: FlowQuery, backlog: list[Entry], maxsize: int):
        self.query = query
        self.missed = 0  # items skipped for this follower, in total
        self._store = store
        self._backlog: deque[Entry] = deque(backlog)  # asked for: not part of the allowance
        self._cursor = store.next_seq
        # What the store took before the cursor: flows, and events lost by source (so a
        # skip tells exactly how many flows, and which notices, went by unread).
        self._flows_at, self._lost_at = store.counts_before(self._cursor)
        self._end: int | None = None  # the sequence number it ends at, once closed
        self._lag_limit = maxsize
        self._ready = asyncio.Event()
        if backlog:
            self._ready.set()

    @property
    def _closed(self) -> bool:
        return self._end is not None

    def wake(self) -> None:
        self._ready.set()

    def close(self) -> None:
        if self._end is None:
            self._end = self._store.next_seq
        self._ready.set()

    async def get(self) -> Item:
        [entry] = await self._entries(1)
        if isinstance(entry, tuple):
            segment, i, _ = entry
            return segment.item(i)
        return entry

    async def messages(self, limit: int) -> list[bytes]:
        """The next items, serialized: at least one, at most `limit`; waits for one, and
        while the store's reader is behind (FlowStore.reader_caught_up). Raises
        SubscriptionClosed at the end."""
        await self._store.reader_caught_up()
        out: list[bytes] = []
        for entry in await self._entries(limit):
            if isinstance(entry, tuple):
                out += entry[0].messages(entry[1], entry[2])
            else:
                out.append(entry.SerializeToString())
        return out

    async def _entries(self, limit: int) -> list[Entry]:
        while True:
            entries, scanned = self._take(limit)
            if entries:
                return entries
            if scanned:
                await asyncio.sleep(0)  # a long run of non-matching items: let others run
                continue
            if self._closed:
                raise SubscriptionClosed
            self._ready.clear()
            await self._ready.wait()

    def _take(self, limit: int) -> tuple[list[Entry], bool]:
        """Up to `limit` items for this follower, oldest first (lost-events notices where
        it was overtaken), without waiting; and True when it stopped after a long run of
        items that matched nothing (the caller lets others run before it goes on)."""
        out: list[Entry] = []
        room = limit
        store, query = self._store, self.query
        until = query.until_ns
        scanned = 0
        while room > 0:
            if self._backlog:
                out.append(self._backlog.popleft())
                room -= 1
                continue
            end = store.next_seq if self._end is None else self._end
            oldest = max(store.first_seq, end - self._lag_limit)
            if self._cursor < oldest:
                self._skip_to(oldest)
                continue
            if self._cursor >= end:
                break
            segment = store.segment_of(self._cursor)
            lo, hi = self._cursor - segment.start, min(len(segment), end - segment.start)
            if segment.only_flows and query.matcher is None and until is None:
                hi = min(hi, lo + room)  # every item goes: the run as it is
                out.append((segment, lo, hi))
                room -= hi - lo
                self._cursor += hi - lo
                self._flows_at += hi - lo
                continue
            for i in range(lo, hi):
                if room == 0:
                    break
                self._cursor += 1
                if not segment.is_flow(i):
                    item = segment.item(i)
                    _count_lost(self._lost_at, item)
                    out.append(item)
                    room -= 1
                    continue
                self._flows_at += 1
                if until is not None and (at := segment.time_ns(i)) > until:
                    if at > until + REORDER_SLACK_NS:
                        self._end = self._cursor  # Hubble ends a follow once flows are past `until`
                        break
                    continue
                if _selects(query, segment, i):
                    out.append((segment, i, i + 1))
                    room -= 1
                    continue
                scanned += 1
                if scanned >= _SCAN_BEFORE_YIELD:
                    return out, True
        return out, False

    def _skip_to(self, oldest: int) -> None:
        """Move the cursor to `oldest`: one notice of the flows skipped, and the notices
        skipped with them summed by source (they are losses the follower must hear of),
        into the backlog."""
        store = self._store
        flows, lost = store.counts_before(oldest)
        skipped = flows - self._flows_at
        self._cursor, self._flows_at = oldest, flows
        if skipped:
            self._backlog.append(lost_events(skipped, store.node_name))
        self._backlog.extend(
            lost_events(count, store.node_name, source)
            for source, total in sorted(lost.items())
            if (count := total - self._lost_at.get(source, 0))
        )
        self._lost_at = lost
        self.missed += skipped
        store.follower_missed += skipped

    def __aiter__(self) -> AsyncIterator[Item]:
        return self

    async def __anext__(self) -> Item:
        try:
            return await self.get()
        except SubscriptionClosed:
            raise StopAsyncIteration from None


_SCAN_BEFORE_YIELD = 512
# Followers wait while the flow reader has more than this many events not yet handed to
# the store (its batches are ~4k; a staging ring of 256k: agent.flows), a few ms at a time.
READER_BEHIND_ROWS = 32_768
READER_WAIT_S = 0.005


class FlowStore:
    """The last `capacity` items, oldest first, as a ring of segments addressed by sequence
    numbers, and the followers reading it."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, node_name: str = "") -> None:
        self.capacity = capacity
        self.node_name = node_name
        # Flow uuids are this prefix and the flow's sequence number: the same on every read.
        self.uuid_prefix = secrets.randbits(64)
        self._segments: list[Segment] = []
        self._starts: list[int] = []  # each segment's start, for bisection
        self._subscriptions: set[Subscription] = set()
        self._sinks: list[Callable[[Segment], object]] = []
        self.total = 0  # items ever appended; also the next item's sequence number
        self.seen_flows = 0  # flows ever appended (ServerStatus.seen_flows)
        self.follower_missed = 0  # flows skipped for slow followers, all of them
        # Events the flow reader has not handed over yet, when the agent tells: serving
        # followers waits while it is behind, so that the CPU and the GIL go to the reader
        # and a follower falls behind (and hears how much it missed), never the reader.
        self.reader_backlog: Callable[[], int] | None = None
        self._lost_total: dict[int, int] = {}  # events the notices taken reported lost

    @property
    def next_seq(self) -> int:
        return self.total

    @property
    def first_seq(self) -> int:
        """The sequence number of the oldest item still in the ring."""
        return max(self.total - self.capacity, 0)

    @property
    def evicted(self) -> int:
        return self.first_seq  # items that fell out of the ring

    def __len__(self) -> int:
        return self.total - self.first_seq

    def append(self, item: Item) -> None:
        self.extend([item])

    def extend(self, items: Iterable[Item] | Segment) -> None:
        """Take a batch: built items, or a Segment (the flow reader's raw rows)."""
        segment = items if isinstance(items, Segment) else BuiltSegment(list(items))
        if not len(segment):
            return
        segment.bind(self.total, self.uuid_prefix)
        segment.flows_before, segment.lost_before = self.seen_flows, dict(self._lost_total)
        self._segments.append(segment)
        self._starts.append(self.total)
        self.total += len(segment)
        flows, lost = segment.counts_before(len(segment))
        self.seen_flows += flows
        for source, count in lost.items():
            self._lost_total[source] = self._lost_total.get(source, 0) + count
        self._trim()
        for sub in self._subscriptions:
            sub.wake()
        for sink in self._sinks:
            sink(segment)

    def _trim(self) -> None:
        first = self.first_seq
        gone = 0
        for seg in self._segments:
            if seg.start + len(seg) > first:
                break
            gone += 1
        if gone:
            del self._segments[:gone], self._starts[:gone]

    def counts_before(self, seq: int) -> tuple[int, dict[int, int]]:
        """Flows, and events reported lost by source, the store took before item `seq`
        (the oldest in the ring, or later)."""
        if seq >= self.total or not self._segments:
            return self.seen_flows, dict(self._lost_total)
        seg = self._segments[max(bisect.bisect_right(self._starts, seq) - 1, 0)]
        flows, lost = seg.counts_before(seq - seg.start)
        total = dict(seg.lost_before)
        for source, count in lost.items():
            total[source] = total.get(source, 0) + count
        return seg.flows_before + flows, total

    async def reader_caught_up(self) -> None:
        """Returns once the reader has at most READER_BEHIND_ROWS to hand over (at once,
        but under a flood on a busy machine)."""
        backlog = self.reader_backlog
        while backlog is not None and backlog() > READER_BEHIND_ROWS:
            await asyncio.sleep(READER_WAIT_S)

    def segment_of(self, seq: int) -> Segment:
        """The segment holding item `seq` (in the ring)."""
        return self._segments[bisect.bisect_right(self._starts, seq) - 1]

    def add_sink(self, sink: Callable[[Segment], object]) -> None:
        """`sink` sees every batch the store takes from now on (the flow log): a Segment,
        iterable as GetFlowsResponses (building them is up to the sink's thread)."""
        self._sinks.append(sink)

    def items_between(self, start: int, end: int) -> Iterator[Item]:
        """Items start..end-1 (sequence numbers within the ring), oldest first."""
        return (seg.item(i) for seg, i in self._places_between(start, end))

    def _places_between(self, start: int, end: int) -> Iterator[tuple[Segment, int]]:
        start = max(start, self.first_seq)
        at = bisect.bisect_right(self._starts, start) - 1
        while start < end and at < len(self._segments):
            seg = self._segments[at]
            stop = min(end - seg.start, len(seg))
            for i in range(start - seg.start, stop):
                yield seg, i
            start = seg.start + stop
            at += 1

    def _newest_first(self) -> Iterator[tuple[Segment, int]]:
        first = self.first_seq
        for seg in reversed(self._segments):
            low = max(first - seg.start, 0)
            for i in range(len(seg) - 1, low - 1, -1):
                yield seg, i

    # ---- queries ---------------------------------------------------------------------------
    def query(self, query: FlowQuery) -> list[Item]:
        """The answer to a query that does not follow: its flows, oldest first, after
        one lost-events line per source that lost any in the range it covers."""
        flows, lost = self._select(query)
        return [*self._lost_lines(lost), *(seg.item(i) for seg, i in flows)]

    def query_messages(self, query: FlowQuery) -> list[bytes]:
        """query(), serialized: raw rows are encoded, never built, unless a filter had to
        look at them."""
        flows, lost = self._select(query)
        lines = [line.SerializeToString() for line in self._lost_lines(lost)]
        return [*lines, *(seg.messages(i, i + 1)[0] for seg, i in flows)]

    def last(self, n: int, matcher: Matcher | None = None) -> list[Item]:
        """The newest `n` matching flows (and the losses among them)."""
        return self.query(FlowQuery(number=n, matcher=matcher)) if n > 0 else []

    def _select(self, query: FlowQuery) -> tuple[list[tuple[Segment, int]], dict[int, int]]:
        """Where the query's flows are, oldest first, and the losses in its range."""
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
            for seg, i in self._newest_first():
                if not seg.is_flow(i):
                    _count_lost(lost, seg.item(i))
                    continue
                t = seg.time_ns(i)
                if since is not None and t < since:
                    if t < since - REORDER_SLACK_NS:
                        reached_oldest = False
                        break
                    continue
                if (until is None or t <= until) and _selects(query, seg, i):
                    flows.append((seg, i))
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

    def _forward(self, query: FlowQuery, lost: dict[int, int]) -> list[tuple[Segment, int]]:
        flows: list[tuple[Segment, int]] = []
        until = query.until_ns
        for seg, i in self._places_between(self.first_seq, self.next_seq):
            if not seg.is_flow(i):
                _count_lost(lost, seg.item(i))
                continue
            if until is not None and (t := seg.time_ns(i)) > until:
                if t > until + REORDER_SLACK_NS:
                    break
                continue
            if _selects(query, seg, i):
                flows.append((seg, i))
                if len(flows) == query.number:
                    break
        return flows

    def _lost_lines(self, lost: dict[int, int]) -> Iterator[Item]:
        now = time.time_ns()
        for source, count in sorted(lost.items()):
            yield lost_response(source, count, self.node_name, now)

    # ---- followers -------------------------------------------------------------------------
    def subscribe(
        self, query: FlowQuery = FlowQuery(follow=True), maxsize: int | None = None
    ) -> Subscription:
        """A follower's feed: first the query's backlog, then every new matching item.
        Taken in one step, so nothing falls between the backlog and the live feed. It may
        fall `maxsize` items (default: the ring) behind the writer before it skips."""
        flows, lost = self._select(query)
        limit = self.capacity if maxsize is None else min(maxsize, self.capacity)
        backlog: list[Entry] = [*self._lost_lines(lost), *((seg, i, i + 1) for seg, i in flows)]
        sub = Subscription(self, query, backlog, limit)
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


def _selects(query: FlowQuery, seg: Segment, i: int) -> bool:
    """Whether item i of `seg` passes the query's filters (built only when there are)."""
    return query.matcher is None or query.selects(seg.item(i))


def _count_lost(lost: dict[int, int], item: Item) -> None:
    if item.HasField("lost_events"):
        source = item.lost_events.source
        lost[source] = lost.get(source, 0) + item.lost_events.num_events_lost
