"""GetEventsResponse builders: the envelope every event shares, and the process_exec and
process_exit events of the lifecycle. A tracing policy's event fills its own oneof
(process_tracepoint, process_kprobe, process_uprobe) after `envelope` and names its
process with `fill_process`.

Lifecycle events are published as `LazyEvent`s: the processes they name are taken from
the cache when the event happens, the message is built only when something reads it (a
query, a follower, the export file). Building one costs ~100 us (the process, its parent
and every ancestor), most of the monitor's time per process; most events are never read.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

from membrane.security.cache import ProcessCache
from membrane.security.process import ProcessEntry
from membrane.tetragon.tetragon import events_pb2

Event = events_pb2.GetEventsResponse


def envelope(node_name: str, time_ns: int) -> Event:
    event = Event(node_name=node_name)
    event.time.FromNanoseconds(time_ns)
    return event


def fill_process(
    message: Any, cache: ProcessCache, pid: int, tid: int | None = None, ancestors: bool = False
) -> bool:
    """Set `message.process` (and `.parent`, and `.ancestors` if asked) for an event of
    `pid`/`tid` from the cache. False when the cache does not know the pid (the event
    then names only pid and tid, with flag `unknown`, as Tetragon does)."""
    entry = cache.entry(pid)
    if entry is None:
        message.process.pid.value = pid
        if tid is not None:
            message.process.tid.value = tid
        message.process.flags = "unknown"
        return False
    _fill(message, cache, entry, ancestors)
    if tid is not None:
        message.process.tid.value = tid
    return True


def _fill(message: Any, cache: ProcessCache, entry: ProcessEntry, ancestors: bool) -> None:
    _fill_from(
        message, entry, cache.parent(entry), list(cache.ancestors(entry)) if ancestors else []
    )


def _fill_from(
    message: Any, entry: ProcessEntry, parent: ProcessEntry | None, ancestors: list[ProcessEntry]
) -> None:
    message.process.CopyFrom(entry.to_proto())
    if parent is not None:
        message.parent.CopyFrom(parent.to_proto())
    if ancestors:
        message.ancestors.extend(a.to_proto() for a in ancestors)


class LazyEvent:
    """An event whose message is built when first read (`event()`), then kept. `post`
    (the store's redaction) runs on it once, right after it is built."""

    __slots__ = ("_event", "_make", "post")

    def __init__(self, make: Callable[[], Event]) -> None:
        self._make = make
        self._event: Event | None = None
        self.post: Callable[[Event], None] | None = None

    def event(self) -> Event:
        if self._event is None:
            event = self._make()
            if self.post is not None:
                self.post(event)
            self._event = event
        return self._event


def exec_event(cache: ProcessCache, entry: ProcessEntry, time_ns: int) -> LazyEvent:
    """process_exec with the process's parent and ancestors (entries link to their parent,
    so the chain is the one of the exec whenever the message is built)."""
    node = cache.node_name

    def make() -> Event:
        event = envelope(node, time_ns)
        _fill_from(event.process_exec, entry, entry.parent, list(cache.ancestors(entry)))
        return event

    return LazyEvent(make)


def exit_event(
    cache: ProcessCache, entry: ProcessEntry, time_ns: int, wait_status: int
) -> LazyEvent:
    """process_exit; `wait_status` as wait(2) reports it: a signal in the low 7 bits, else
    the exit code."""
    node = cache.node_name

    def make() -> Event:
        event = envelope(node, time_ns)
        message = event.process_exit
        _fill_from(message, entry, entry.parent, [])
        signo = wait_status & 0x7F
        if signo:
            message.signal = signal_name(signo)
        else:
            message.status = (wait_status >> 8) & 0xFF
        message.time.FromNanoseconds(time_ns)
        return event

    return LazyEvent(make)


def dropped_notice(node_name: str, count: int) -> Event:
    """What the stream says where the kernel's ring had no room for `count` events:
    Tetragon's rate_limit_info (number_of_dropped_process_events)."""
    event = envelope(node_name, time.time_ns())
    event.rate_limit_info.number_of_dropped_process_events = count
    return event


def signal_name(signo: int) -> str:
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"SIG{signo}"
