"""The process lifecycle monitor: bpf/security_process.bpf.c's exec, clone and exit events,
read from its ring buffer on a thread of their own, kept in the process cache and
published as Tetragon's process_exec and process_exit events.

Start order closes the gap between the walk of /proc and the first event: the programs
are attached first, then /proc is read, then the ring is drained. A process that started
in between is in both; its event simply replaces the /proc entry.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence

from membrane.abi import SecProcEventType, SecProcFlag
from membrane.bpf import BpfObject
from membrane.bpf.fs import ensure_tracefs
from membrane.bpf.links import Link, attach_auto
from membrane.bpf.ringbuf import BATCH_FILL, Records, RingBuffer
from membrane.security.cache import ProcessCache
from membrane.security.events import LazyEvent, dropped_notice, exec_event, exit_event
from membrane.security.process import (
    FLAG_CLONE,
    FLAG_EXECVE,
    FLAG_TRUNC_ARGS,
    FLAG_TRUNC_FILENAME,
)
from membrane.security.procfs import load_processes
from membrane.security.sink import Item
from membrane.trace.batch import EventBatch, EventLayout

log = logging.getLogger("membrane.agent")
OBJECT = "security_process"
RING_BYTES = 8 << 20  # ~20k exec events of a typical size: a fork storm's burst
POLL_MS = 100
# What the monitor needs from the kernel (membrane.bpf.probe feature names).
NEEDED_FEATURES = ("tracepoint", "raw_tp", "map_ringbuf")


class ProcessMonitor:
    """Load, attach, fill the cache from /proc, then follow the ring until `stop`."""

    def __init__(
        self,
        cache: ProcessCache,
        publish: Callable[[Sequence[Item]], None],
        ring_bytes: int = RING_BYTES,
    ) -> None:
        self.cache = cache
        self.publish = publish
        self.links: list[Link] = []
        self._lost: int | None = None  # the ring's count when it was closed
        self._stack = contextlib.ExitStack()
        ensure_tracefs()  # tracepoints attach by their id in tracefs
        self.obj = self._stack.enter_context(BpfObject.open(OBJECT))
        try:
            self.obj.set_config(events_wakeup_bytes=ring_bytes // BATCH_FILL)
            self.obj.set_max_entries("events", ring_bytes)
            self.obj.load()
            for prog in self.obj.programs.values():
                self.links.append(attach_auto(prog))
            self.layout = EventLayout.of(self.obj.btf.dtype("sec_proc_event"), "data")
            self._ring = RingBuffer(
                self.obj.map("events"), lost_map=self.obj.map("events_lost"), variable=True
            )
            self._stack.callback(self._ring.close)
        except BaseException:
            self.close()
            raise
        self.procfs = len(load_processes(cache))
        self.execs = self.exits = self.clones = 0
        self.unknown_exits = 0  # exits of processes the cache never knew
        self._cloned: set[int] = set()  # pids whose clone and exec came in one batch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="security-process", daemon=True)

    @property
    def lost(self) -> int:
        """Events the ring had no room for (and starts the map had none for)."""
        return self._lost if self._lost is not None else self._ring.lost

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self.close()

    def close(self) -> None:
        if self._lost is None and hasattr(self, "_ring"):  # not when the load failed
            with contextlib.suppress(Exception):
                self._lost = self._ring.lost
        for link in reversed(self.links):
            link.close()
        self.links.clear()
        self._stack.close()

    def _run(self) -> None:
        reported = self._ring.lost
        while not self._stop.is_set():
            try:
                records = self._ring.poll(POLL_MS)
                if (lost := self._ring.lost) > reported:  # said where they are missing
                    self.publish([dropped_notice(self.cache.node_name, lost - reported)])
                    reported = lost
                if len(records):
                    self.handle(records)
            except Exception:
                log.exception("process monitor failed; going on")
        with contextlib.suppress(Exception):
            records = self._ring.drain()
            if len(records):
                self.handle(records)

    def handle(self, records: Records) -> None:
        """Apply a batch to the cache in order and publish its exec and exit events."""
        batch, _ = EventBatch.decode(self.layout, records)
        if not len(batch):
            return
        head = batch.head
        starts = batch.tail()[0].tolist()
        block = records.block
        names = head.dtype.names
        wall = time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        rows = [dict(zip(names, values, strict=True)) for values in head.tolist()]
        replaced = _execed_in_batch(rows)
        out: list[LazyEvent] = []
        for i, row in enumerate(rows):
            kind, time_ns = row["hdr"][2], row["hdr"][0] + wall  # (ts_ns, version, type, cpu)
            if kind == SecProcEventType.EXEC:
                data = bytes(block[starts[i] : starts[i] + _data_len(row)])
                out.append(self._exec(row, data, time_ns))
            elif kind == SecProcEventType.CLONE:
                if i in replaced:  # its exec follows in this batch: no entry needed between
                    self.clones += 1
                    self._cloned.add(row["pid"])
                else:
                    self._clone(row, row["ktime"] + wall)
            elif kind == SecProcEventType.EXIT:
                event = self._exit(row, time_ns)
                if event is not None:
                    out.append(event)
        if out:
            self.publish(out)

    def _exec(self, row: dict, data: bytes, time_ns: int) -> LazyEvent:
        self.execs += 1
        b, c = row["binary_len"], row["cwd_len"]
        binary = data[:b].decode(errors="replace")
        cwd = data[b : b + c].decode(errors="replace")
        argv = data[b + c :].split(b"\0")
        args = " ".join(a.decode(errors="replace") for a in argv[1:] if a)
        flags = [FLAG_EXECVE]
        before = self.cache.entry(row["pid"])
        if row["pid"] in self._cloned or (before is not None and before.flags == FLAG_CLONE):
            self._cloned.discard(row["pid"])
            flags.append(FLAG_CLONE)
        if row["flags"] & SecProcFlag.TRUNC_ARGS:
            flags.append(FLAG_TRUNC_ARGS)
        if row["flags"] & SecProcFlag.TRUNC_BINARY:
            flags.append(FLAG_TRUNC_FILENAME)
        entry = self.cache.new_entry(
            pid=row["pid"],
            tid=row["tid"],
            ktime_ns=row["ktime"],
            start_time_ns=time_ns,
            uid=row["uid"],
            auid=row["auid"],
            binary=binary,
            arguments=args,
            cwd=cwd,
            flags=flags,
            parent_pid=row["ppid"],
            netns=row["netns"],
            cgroup_id=row["cgroup_id"],
        )
        self.cache.start(entry)
        return exec_event(self.cache, entry, time_ns)

    def _clone(self, row: dict, start_time_ns: int) -> None:
        """A new process runs its parent's program until it execs: the parent's binary,
        arguments and directory, its own pid and start."""
        self.clones += 1
        parent = self.cache.entry(row["ppid"])
        entry = self.cache.new_entry(
            pid=row["pid"],
            tid=row["tid"],
            ktime_ns=row["ktime"],
            start_time_ns=start_time_ns,
            uid=row["uid"],
            auid=row["auid"],
            binary=parent.binary if parent else "",
            arguments=parent.arguments if parent else "",
            cwd=parent.cwd if parent else "",
            flags=[FLAG_CLONE],
            parent_pid=row["ppid"],
            netns=row["netns"],
            cgroup_id=row["cgroup_id"],
        )
        self.cache.start(entry)

    def _exit(self, row: dict, time_ns: int) -> LazyEvent | None:
        entry = self.cache.exit(row["pid"])
        if entry is None:
            self.unknown_exits += 1
            return None
        self.exits += 1
        return exit_event(self.cache, entry, time_ns, row["status"])


def _execed_in_batch(rows: list[dict]) -> set[int]:
    """Indexes of clone events whose process's next event in the batch is its exec: the
    usual fork+exec. The clone's entry would be replaced at once, so none is made."""
    replaced, upcoming = set(), {}
    for i in range(len(rows) - 1, -1, -1):
        kind, pid = rows[i]["hdr"][2], rows[i]["pid"]
        if kind == SecProcEventType.CLONE and upcoming.get(pid) == SecProcEventType.EXEC:
            replaced.add(i)
        upcoming[pid] = kind
    return replaced


def _data_len(row: dict) -> int:
    return row["binary_len"] + row["cwd_len"] + row["args_len"]
