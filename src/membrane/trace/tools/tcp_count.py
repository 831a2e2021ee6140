"""`membrane trace tcp-count`: TCP connects counted in the kernel, per destination or per
4-tuple, printed every interval (the counter of the seed document, on stable hooks)."""

from __future__ import annotations

import numpy as np
import typer

from membrane.bpf import Map
from membrane.choices import check_choice
from membrane.trace.interval import INTERVAL, Stamp, check_interval
from membrane.trace.options import COMM, DURATION, OUTPUT, PID, UID, TraceOptions
from membrane.trace.output import Column, Printer
from membrane.trace.session import TraceSession
from membrane.trace.tcp import IP_COLUMN, address_columns, endpoint_fields
from membrane.trace.tools import Tool

_KEYS = ("dst", "tuple")
_SMALLEST_RING = 4096  # one page: this mode emits no events


class IntervalCounts:
    """Takes each interval's counts out of the kernel without losing an increment.

    The kernel adds to keys of the current `count_slot`. `take()` flips the slot and reads
    the keys of the slot it left. A program that read the old slot just before the flip
    may still add to it after that read: such late counts are found at the next `take()`
    (the value grew past what was seen) and reported then, and only then, an interval
    after the slot went quiet, are its keys deleted. So the map holds about one interval's
    keys and every count is reported once."""

    def __init__(self, counts: Map, slot: Map) -> None:
        self._counts = counts
        self._slot_map = slot
        self._slot = 0
        self._seen: dict[bytes, int] = {}  # key -> value reported, of the slot last left

    def take(self) -> dict[bytes, int]:
        """Connections since the last take, by raw `struct tcp_tuple` of the key."""
        taken: dict[bytes, int] = {}
        reused = self._slot ^ 1
        stale = []
        for key, value in self._counts.lookup_batch():
            if key.slot == reused:
                late = value - self._seen.get(bytes(key), 0)
                if late:
                    taken[bytes(key.tuple)] = taken.get(bytes(key.tuple), 0) + late
                stale.append(key)
        self._counts.delete_batch(stale)  # quiet for an interval: no program holds them
        self._slot_map.update(0, reused)
        seen = {}
        for key, value in self._counts.lookup_batch():
            if key.slot == self._slot:
                seen[bytes(key)] = value
                taken[bytes(key.tuple)] = taken.get(bytes(key.tuple), 0) + value
        self._seen = seen
        self._slot = reused
        return taken


def command(
    pid: int = PID,
    comm: str = COMM,
    uid: int = UID,
    duration: float = DURATION,
    output: str = OUTPUT,
    interval: float = INTERVAL,
    by: str = typer.Option(
        "dst",
        "--by",
        "-b",
        help="Count per dst (destination address and port) or per "
        "tuple (source and destination address and port).",
    ),
) -> None:
    """Count TCP connects per destination (or per 4-tuple) in the kernel, and
    report each interval's counts, busiest first. Intervals without
    connects print nothing.

    Connects are counted as `membrane trace connect` reports them, failed
    attempts included; the filters choose the connecting processes.

    Examples:

      membrane trace tcp-count                   # per destination, every second

      membrane trace tcp-count -i 10 --by tuple  # per 4-tuple, every 10 s

      membrane trace tcp-count -i 0 -c curl      # curl's, one report at Ctrl-C
    """
    opts = TraceOptions.parse(pid, comm, uid, duration, output)
    tuple_keys = check_choice(by, _KEYS, "--by") == "tuple"
    every = check_interval(interval)
    cols = [
        IP_COLUMN,
        *(address_columns("saddr", "sport", "S") if tuple_keys else []),
        *address_columns("daddr", "dport", "D"),
        Column("count", "COUNT", 7, right=True),
    ]
    total = 0

    with TraceSession(
        "trace_tcp_connect",
        opts,
        config={"count_mode": True, "count_by_tuple": tuple_keys},
        map_sizes={"events": _SMALLEST_RING},
    ) as session:
        counts = IntervalCounts(session.map("counts"), session.map("count_slot"))
        tuple_dtype = session.obj.btf.dtype("tcp_tuple")
        stamp = Stamp()

        def report() -> None:
            nonlocal total
            taken = counts.take()
            when, seconds, clock = stamp.next()
            if not taken:
                return
            keys = sorted(taken, key=lambda k: (-taken[k], k))
            ends = endpoint_fields(
                np.frombuffer(b"".join(keys), dtype=tuple_dtype),
                local=("saddr", "sport"),
                remote=("daddr", "dport"),
            )
            if not tuple_keys:
                del ends["saddr"], ends["sport"]
            printer = Printer(cols, opts.output)  # bcc repeats the header in every report
            if not printer.json:
                print(clock)
                printer.header()
            printer.write_columns(
                {
                    "time": [when] * len(keys),
                    "seconds": [seconds] * len(keys),
                    **ends,
                    "count": [taken[k] for k in keys],
                }
            )
            if not printer.json:
                print()
            printer.flush()
            total += sum(taken.values())

        seconds = session.run(interval=every, on_interval=report)
        session.detach()  # nothing counts any more: the last report has the rest
        report()
        lost = int(sum(session.map("events_lost").lookup(0)))
        Printer(cols, opts.output).summary(connections=total, lost=lost, seconds=round(seconds, 3))


TOOL = Tool(
    name="tcp-count",
    summary="TCP connects counted in the kernel per destination or 4-tuple, every interval",
    requires=("tracepoint",),
    command=command,
)
