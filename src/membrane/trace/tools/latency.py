"""`membrane trace latency SYSCALL...`: a log2 histogram of each chosen syscall's latency,
per interval, printed like bcc's histograms."""

from __future__ import annotations

import numpy as np
import typer

from membrane.abi import SYS_NR_MAX
from membrane.bpf import Map
from membrane.errors import UserError
from membrane.trace.histogram import buckets, log2_lines
from membrane.trace.interval import INTERVAL, Stamp, check_interval
from membrane.trace.options import COMM, DURATION, OUTPUT, PID, UID, TraceOptions
from membrane.trace.output import Printer
from membrane.trace.session import TraceSession
from membrane.trace.syscall_table import table
from membrane.trace.tools import Tool


def chosen(names: list[str]) -> dict[int, str]:
    """nr -> name of the syscalls asked for, in the order given; UserError naming the
    first unknown one."""
    syscalls = table()
    out: dict[int, str] = {}
    for name in names:
        nr = syscalls.number(name)
        if not 0 <= nr < SYS_NR_MAX:  # the size of the program's `wanted` constant
            raise UserError("SYSCALL", f"{nr} is not a syscall number (0 to {SYS_NR_MAX - 1})")
        out.setdefault(nr, syscalls.name(nr))
    return out


def read_hists(hists: Map) -> dict[int, np.ndarray]:
    """nr -> its histogram slots summed over CPUs. They only grow; reports subtract."""
    return {
        nr: np.sum([np.frombuffer(bytes(h), dtype=np.uint64) for h in per_cpu], axis=0)
        for nr, per_cpu in hists.lookup_batch()
    }


def command(
    syscalls: list[str] = typer.Argument(
        ..., metavar="SYSCALL...", help="Syscall names (or numbers), e.g. read write."
    ),
    pid: int = PID,
    comm: str = COMM,
    uid: int = UID,
    duration: float = DURATION,
    output: str = OUTPUT,
    interval: float = INTERVAL,
    milliseconds: bool = typer.Option(
        False, "--milliseconds", "-m", help="Histogram in milliseconds (default: usecs)."
    ),
) -> None:
    """Latency histograms of syscalls: how long each call took, log2 buckets per syscall.

    Aggregated in the kernel: no event per call reaches user space. JSON lines carry the
    buckets (low and high bounds in the unit, and the count) of each syscall per report.

    Examples:

      membrane trace latency read write          # a histogram per syscall each second

      membrane trace latency fsync -p 1234 -i 0  # process 1234's fsyncs, once at Ctrl-C

      membrane trace latency futex -m -o json    # in milliseconds, as JSON lines
    """
    opts = TraceOptions.parse(pid, comm, uid, duration, output)
    every = check_interval(interval)
    wanted = chosen(syscalls)
    unit, unit_ns = ("msecs", 1_000_000) if milliseconds else ("usecs", 1000)
    printer = Printer([], opts.output)
    mask = bytearray(SYS_NR_MAX)
    for nr in wanted:
        mask[nr] = 1

    with TraceSession(
        "trace_latency",
        opts,
        config={"wanted": bytes(mask), "unit_ns": unit_ns},
        map_sizes={"hists": len(wanted)},
    ) as session:
        hists = session.map("hists")
        previous: dict[int, np.ndarray] = {}
        stamp = Stamp()
        calls = reports = 0

        def report(last: bool = False) -> None:
            nonlocal previous, calls, reports
            current = read_hists(hists)
            when, seconds, clock = stamp.next()
            deltas = {nr: current[nr] - previous.get(nr, 0) for nr in wanted if nr in current}
            deltas = {nr: d for nr, d in deltas.items() if d.any()}
            previous = current
            if last and not deltas and reports:
                return  # nothing since the last report: no empty closing one
            reports += 1
            if not printer.json:
                print(clock)
            for nr, slots in deltas.items():
                count = int(slots.sum())
                calls += count
                if printer.json:
                    printer.record(
                        {
                            "time": when,
                            "seconds": seconds,
                            "syscall": wanted[nr],
                            "nr": nr,
                            "unit": unit,
                            "count": count,
                            "buckets": buckets(slots.tolist()),
                        }
                    )
                else:
                    print(f"\nsyscall = {wanted[nr]}")
                    print("\n".join(log2_lines(slots.tolist(), unit)))
            if not printer.json:
                print()
            printer.flush()

        seconds = session.run(interval=every, on_interval=report)
        session.detach()  # the last report sees every call that returned before the stop
        report(last=True)
        lost = sum(session.map("uncounted").lookup(0))
        printer.summary(calls=calls, lost=lost, seconds=round(seconds, 3))


TOOL = Tool(
    name="latency",
    summary="syscall latency: a log2 histogram per chosen syscall, per interval",
    requires=("raw_tp",),
    command=command,
)
