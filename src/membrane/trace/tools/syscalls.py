"""`membrane trace syscalls`: syscount. Calls, errors and time per syscall (optionally per
process), counted in the kernel and reported per interval."""

from __future__ import annotations

import os
from dataclasses import dataclass

import typer

from membrane.bpf import Map
from membrane.choices import check_choice
from membrane.errors import UserError
from membrane.trace.interval import INTERVAL, Stamp, check_interval
from membrane.trace.options import COMM, DURATION, OUTPUT, PID, UID, TraceOptions
from membrane.trace.output import Column, Printer, text
from membrane.trace.session import TraceSession
from membrane.trace.syscall_table import SyscallTable, table
from membrane.trace.tools import Tool

# Map sizes. Per syscall the keys are the syscall numbers in use (a few hundred, more only
# if someone calls made-up numbers); per process they are processes x syscalls each uses.
# Calls that find the map full are counted and reported as lost.
_ENTRIES = 1024
_ENTRIES_PER_PROCESS = 32768


@dataclass
class Totals:
    count: int = 0
    errors: int = 0
    total_ns: int = 0


def read_totals(counters: Map) -> dict[tuple[int, int], Totals]:
    """(pid, nr) -> the counters summed over CPUs."""
    return {
        (key.pid, key.nr): Totals(
            sum(v.count for v in per_cpu),
            sum(v.errors for v in per_cpu),
            sum(v.total_ns for v in per_cpu),
        )
        for key, per_cpu in counters.lookup_batch()
    }


class Reporter:
    """Turns successive reads of the counters into per-interval rows.

    The kernel's counters only grow, and each report is the difference to the previous
    read: clearing the map between reports instead would lose the calls counted between
    the read and the clear."""

    def __init__(
        self, counters: Map, comms: Map, syscalls: SyscallTable, per_process: bool
    ) -> None:
        self.counters = counters
        self.comms = comms
        self.syscalls = syscalls
        self.per_process = per_process
        self.previous: dict[tuple[int, int], Totals] = {}
        self.stamp = Stamp()
        self.calls = 0

    def rows(self) -> tuple[str, list[dict[str, object]]]:
        """([HH:MM:SS], the rows of what happened since the last call). Row field names
        are a stable JSON contract."""
        # A process gone before the read made its last call before it: its entries are
        # reported one last time, then deleted, so the map does not fill up with the dead.
        gone = {pid for pid, _ in self.previous if pid and not os.path.exists(f"/proc/{pid}")}
        current = read_totals(self.counters)
        names = (
            {pid: text(c.comm) for pid, c in self.comms.lookup_batch()} if self.per_process else {}
        )
        when, seconds, clock = self.stamp.next()
        rows = []
        for (pid, nr), now in current.items():
            before = self.previous.get((pid, nr), Totals())
            count = now.count - before.count
            if count <= 0:
                continue
            total_ns = now.total_ns - before.total_ns
            rows.append(
                {
                    "time": when,
                    "seconds": seconds,
                    "pid": pid if self.per_process else None,
                    "comm": names.get(pid, "") if self.per_process else None,
                    "syscall": self.syscalls.name(nr),
                    "nr": nr,
                    "count": count,
                    "errors": now.errors - before.errors,
                    "total_ns": total_ns,
                    "avg_ns": total_ns // count,
                }
            )
            self.calls += count
        for key in [key for key in current if key[0] in gone]:
            self.counters.delete(self.counters.key_type(*key))
            del current[key]
        for pid in gone:
            self.comms.delete(pid)
        self.previous = current
        return clock, rows


def columns(per_process: bool, milliseconds: bool) -> list[Column]:
    unit, scale, digits = ("ms", 1e6, 6) if milliseconds else ("us", 1e3, 3)

    def latency(ns: int) -> str:
        return f"{ns / scale:.{digits}f}"

    who = [Column("pid", "PID", 7, right=True), Column("comm", "COMM", 16)] if per_process else []
    return [
        *who,
        Column("syscall", "SYSCALL", 22),
        Column("count", "COUNT", 8, right=True),
        Column("errors", "ERRORS", 8, right=True),
        Column("total_ns", f"TIME ({unit})", 16, right=True, fmt=latency),
        Column("avg_ns", f"AVG ({unit})", 12, right=True, fmt=latency),
    ]


def command(
    pid: int = PID,
    comm: str = COMM,
    uid: int = UID,
    duration: float = DURATION,
    output: str = OUTPUT,
    interval: float = INTERVAL,
    per_process: bool = typer.Option(
        False, "--per-process", "-P", help="One row per process and syscall."
    ),
    top: int = typer.Option(10, "--top", "-T", help="Rows per report; 0: all."),
    sort: str = typer.Option(
        "count", "--sort", "-s", help="Order rows by count or by time (total latency)."
    ),
    milliseconds: bool = typer.Option(
        False, "--milliseconds", "-m", help="Times in ms in the table (JSON is always ns)."
    ),
) -> None:
    """Count syscalls: calls, errors, total and average latency per syscall (syscount).

    Counted in the kernel: no event per call reaches user space, which reads the totals
    once per report. Errors are calls that returned an errno.

    Examples:

      membrane trace syscalls                    # top 10 syscalls, a report each second

      membrane trace syscalls -p 1234 -i 0       # process 1234, one report at Ctrl-C

      membrane trace syscalls -P -s time -T 20   # top 20 (process, syscall) by time

      membrane trace syscalls -c nginx -o json   # nginx's syscalls as JSON lines
    """
    opts = TraceOptions.parse(pid, comm, uid, duration, output)
    every = check_interval(interval)
    order = "count" if check_choice(sort, ("count", "time"), "--sort") == "count" else "total_ns"
    if top < 0:
        raise UserError("--top", f"{top} is not a number of rows >= 0")
    syscalls = table()
    cols = columns(per_process, milliseconds)
    rows_printed = reports = 0

    sizes = (
        {"syscalls": _ENTRIES_PER_PROCESS, "comms": _ENTRIES_PER_PROCESS}
        if per_process
        else {"syscalls": _ENTRIES, "comms": 1}
    )
    with TraceSession(
        "trace_syscalls", opts, config={"per_process": per_process}, map_sizes=sizes
    ) as session:
        reporter = Reporter(session.map("syscalls"), session.map("comms"), syscalls, per_process)

        def report(last: bool = False) -> None:
            nonlocal rows_printed, reports
            clock, rows = reporter.rows()
            if last and not rows and reports:
                return  # nothing since the last report: no empty closing one
            reports += 1
            rows.sort(key=lambda r: (-r[order], r["syscall"], r["pid"] or 0))  # type: ignore
            printer = Printer(cols, opts.output)  # bcc repeats the header in every report
            if not printer.json:
                print(clock)
                printer.header()
            printer.records(rows[:top] if top else rows)
            if not printer.json:
                print()
            printer.flush()
            rows_printed += printer.count

        seconds = session.run(interval=every, on_interval=report)
        session.detach()  # the last report sees every call that returned before the stop
        report(last=True)
        lost = sum(session.map("uncounted").lookup(0))
        Printer(cols, opts.output).summary(
            rows=rows_printed, calls=reporter.calls, lost=lost, seconds=round(seconds, 3)
        )


TOOL = Tool(
    name="syscalls",
    summary="syscount: calls, errors, total and average latency per syscall (or process)",
    requires=("raw_tp",),
    command=command,
)
