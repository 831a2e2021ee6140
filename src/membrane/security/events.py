"""GetEventsResponse builders: the envelope every event shares, and the process_exec and
process_exit events of the lifecycle. A tracing policy's event fills its own oneof
(process_tracepoint, process_kprobe, process_uprobe) after `envelope` and names its
process with `fill_process`."""

from __future__ import annotations

import signal
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

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
    message.process.CopyFrom(entry.to_proto())
    parent = cache.parent(entry)
    if parent is not None:
        message.parent.CopyFrom(parent.to_proto())
    if ancestors:
        message.ancestors.extend(a.to_proto() for a in cache.ancestors(entry))


def exec_event(cache: ProcessCache, entry: ProcessEntry, time_ns: int) -> Event:
    event = envelope(cache.node_name, time_ns)
    _fill(event.process_exec, cache, entry, ancestors=True)
    return event


def exit_event(cache: ProcessCache, entry: ProcessEntry, time_ns: int, wait_status: int) -> Event:
    """`wait_status` as wait(2) reports it: a signal in the low 7 bits, else the code."""
    event = envelope(cache.node_name, time_ns)
    message = event.process_exit
    _fill(message, cache, entry, ancestors=False)
    signo = wait_status & 0x7F
    if signo:
        message.signal = signal_name(signo)
    else:
        message.status = (wait_status >> 8) & 0xFF
    stamp = Timestamp()
    stamp.FromNanoseconds(time_ns)
    message.time.CopyFrom(stamp)
    return event


def signal_name(signo: int) -> str:
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"SIG{signo}"
