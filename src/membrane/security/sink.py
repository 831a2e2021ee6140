"""Where security events go: the agent's store of recent events (what `membrane security
events --last N` reads), its live followers (`-f`) and the export file. Any thread may
publish: process lifecycle and tracing policies' readers each run on their own.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from membrane.security.events import LazyEvent
from membrane.security.redaction import Redactor
from membrane.tetragon.tetragon import events_pb2

Event = events_pb2.GetEventsResponse
Item = Event | LazyEvent  # what the store keeps: a message, or one built when read
DEFAULT_CAPACITY = 8191
FOLLOWER_QUEUE = 1024  # batches a follower may lag behind before it is told it lost some


def resolve(item: Item) -> Event:
    """The message of a stored item (a LazyEvent is built now, once)."""
    return item.event() if isinstance(item, LazyEvent) else item


class EventSink(Protocol):
    """What a producer of security events needs: `publish(events)`, from any thread,
    never waiting on a reader."""

    def publish(self, events: Sequence[Item]) -> None: ...


class Follower:
    """One live reader: batches in an asyncio queue on its event loop. A reader that falls
    FOLLOWER_QUEUE batches behind loses the newest and is told how many."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Sequence[Item]] = asyncio.Queue(FOLLOWER_QUEUE)
        self.lost = 0

    def _put(self, events: Sequence[Item]) -> None:
        try:
            self.queue.put_nowait(events)
        except asyncio.QueueFull:
            self.lost += len(events)


class EventStore:
    """The last `capacity` events, the followers, and the exporters (called on the
    publishing thread with each batch; they must only queue it). Redaction filters are
    applied first, so no reader sees what they hide."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, redactor: Redactor | None = None) -> None:
        self.redactor = redactor if redactor else None
        self._events: deque[Item] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._followers: list[Follower] = []
        self._exporters: list[Callable[[Sequence[Item]], None]] = []
        self.published = 0

    @property
    def capacity(self) -> int:
        return self._events.maxlen or 0

    def __len__(self) -> int:
        return len(self._events)

    def add_exporter(self, export: Callable[[Sequence[Item]], None]) -> None:
        self._exporters.append(export)

    def publish(self, events: Sequence[Item]) -> None:
        if not events:
            return
        if self.redactor is not None:
            for item in events:
                if isinstance(item, LazyEvent):
                    item.post = self.redactor.event
                else:
                    self.redactor.event(item)
        with self._lock:
            self._events.extend(events)
            self.published += len(events)
            followers = list(self._followers)
        for follower in followers:
            follower.loop.call_soon_threadsafe(follower._put, events)
        for export in self._exporters:
            export(events)

    def recent(self, count: int | None = None) -> list[Item]:
        """The newest `count` items (all with None), oldest first (`resolve` each)."""
        with self._lock:
            events = list(self._events)
        return events if count is None else events[-count:] if count else []

    def follow(self, loop: asyncio.AbstractEventLoop) -> tuple[list[Item], Follower]:
        """The events stored now and a follower of every later one: nothing is missed or
        seen twice between the two."""
        follower = Follower(loop)
        with self._lock:
            self._followers.append(follower)
            return list(self._events), follower

    def unfollow(self, follower: Follower) -> None:
        with self._lock:
            if follower in self._followers:
                self._followers.remove(follower)
