"""`membrane trace syscalls` and `membrane trace latency` count exactly the syscalls of
workloads the tests run, and keep out those of the processes the filters exclude."""

from __future__ import annotations

import itertools
import json
import queue
import re
import secrets
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from trace_support import run_trace, stop_tracer

from membrane.testing.cli import user_error
from membrane.testing.tracer import start_tracer, stop_tracer_text
from membrane.trace.syscall_table import table

pytestmark = pytest.mark.root
SYSCALLS_FIELDS = {
    "time",
    "seconds",
    "pid",
    "comm",
    "syscall",
    "nr",
    "count",
    "errors",
    "total_ns",
    "avg_ns",
}
LATENCY_FIELDS = {"time", "seconds", "syscall", "nr", "unit", "count", "buckets"}
NAP_NS = 2_000_000  # each nanosleep of the workload: at least 2 ms

# A workload whose syscalls the test knows exactly. It names itself, then for each batch
# "getppid,close,nanosleep" on its command line waits for a byte on stdin, makes that many
# getppid(), close(-1) (fails: EBADF) and 2 ms nanosleep() calls through syscall(2), and
# says "done". It then waits for one more byte (in a read that is still in flight when the
# tracer stops, so never counted) before it exits.
WORKLOAD = textwrap.dedent(f"""
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, sys.argv[1].encode(), 0, 0, 0)
    getppid, close, nanosleep = map(int, sys.argv[2].split(","))
    class Timespec(ctypes.Structure):
        _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]
    nap = Timespec(0, {NAP_NS})
    os.write(1, b"ready\\n")
    for batch in sys.argv[3:]:
        os.read(0, 1)
        n_getppid, n_close, n_sleep = map(int, batch.split(","))
        for _ in range(n_getppid):
            libc.syscall(getppid)
        for _ in range(n_close):
            libc.syscall(close, -1)
        for _ in range(n_sleep):
            libc.syscall(nanosleep, ctypes.byref(nap), None)
        os.write(1, b"done\\n")
    os.read(0, 1)
""")


class Workload:
    """The workload process; `go()` runs its next batch and returns once it is done."""

    def __init__(self, comm: str, *batches: tuple[int, int, int]) -> None:
        nrs = ",".join(str(table().number(n)) for n in ("getppid", "close", "nanosleep"))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKLOAD, comm, nrs, *(",".join(map(str, b)) for b in batches)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.pid = self.proc.pid
        assert self._line() == b"ready\n"

    def _line(self) -> bytes:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline()

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"g")
        self.proc.stdin.flush()
        assert self._line() == b"done\n"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def workloads() -> Iterator[list[Workload]]:
    """Workloads a test starts (append them); all are killed afterwards."""
    started: list[Workload] = []
    yield started
    for w in started:
        w.close()


def comm_name() -> str:
    return f"mbs-{secrets.token_hex(3)}"


def by_syscall(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        assert row["syscall"] not in out, f"two rows for {row['syscall']}"
        out[row["syscall"]] = row
    return out


# ---- syscalls ----------------------------------------------------------------------------
def test_counts_exactly_the_workloads_calls_and_errors(workloads: list[Workload]) -> None:
    traced = Workload(comm_name(), (300, 20, 3))
    other = Workload(comm_name(), (50, 7, 0))  # the same syscalls, kept out by --pid
    workloads += [traced, other]
    tracer = start_tracer("syscalls", "--pid", str(traced.pid), "-i", "0", "-T", "0", "-o", "json")
    traced.go()
    other.go()
    rows, summary = stop_tracer(tracer)

    assert all(set(r) == SYSCALLS_FIELDS for r in rows)
    assert all(r["pid"] is None and r["comm"] is None for r in rows)
    seen = by_syscall(rows)
    assert (seen["getppid"]["count"], seen["getppid"]["errors"]) == (300, 0)
    assert (seen["close"]["count"], seen["close"]["errors"]) == (20, 20)  # EBADF each
    nap = seen["nanosleep"]
    assert nap["count"] == 3 and nap["errors"] == 0
    assert nap["total_ns"] >= 3 * NAP_NS and nap["avg_ns"] >= NAP_NS
    assert all(r["avg_ns"] == r["total_ns"] // r["count"] for r in rows)
    assert seen["getppid"]["nr"] == table().number("getppid")
    assert len({r["time"] for r in rows}) == 1  # --interval 0: one report, at the end
    assert summary["lost"] == 0 and summary["rows"] == len(rows)
    assert summary["calls"] == sum(r["count"] for r in rows)


def test_each_interval_reports_only_its_own_calls(workloads: list[Workload]) -> None:
    traced = Workload(comm_name(), (40, 0, 0), (25, 0, 0))
    workloads.append(traced)
    tracer = start_tracer("syscalls", "--pid", str(traced.pid), "-i", "0.2", "-o", "json")
    lines: queue.Queue[dict[str, Any]] = queue.Queue()
    threading.Thread(target=_read_json_lines, args=(tracer, lines), daemon=True).start()

    reports = []
    for _ in range(2):
        traced.go()
        while True:  # the report that holds this batch's getppid calls
            row = lines.get(timeout=10)
            if row.get("syscall") == "getppid":
                reports.append(row)
                break
    tracer.send_signal(2)
    tracer.wait(timeout=20)
    assert tracer.returncode == 0
    assert [r["count"] for r in reports] == [40, 25]  # differences, not running totals
    assert reports[0]["time"] < reports[1]["time"]
    assert all(0 < r["seconds"] < 5 for r in reports)


def _read_json_lines(proc: subprocess.Popen[str], out: queue.Queue[dict[str, Any]]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        out.put(json.loads(line))


def test_per_process_rows_and_comm_filter(workloads: list[Workload]) -> None:
    comm = comm_name()
    first, second = Workload(comm, (11, 2, 0)), Workload(comm, (17, 0, 0))
    stranger = Workload(comm_name(), (5, 0, 0))  # another name: --comm keeps it out
    workloads += [first, second, stranger]
    tracer = start_tracer(
        "syscalls", "--comm", comm, "--per-process", "-i", "0", "-T", "0", "-o", "json"
    )
    for w in (first, second, stranger):
        w.go()
    rows, summary = stop_tracer(tracer)

    assert {(r["pid"], r["comm"]) for r in rows} == {(first.pid, comm), (second.pid, comm)}
    getppid = {r["pid"]: r["count"] for r in rows if r["syscall"] == "getppid"}
    assert getppid == {first.pid: 11, second.pid: 17}
    assert [(r["pid"], r["errors"]) for r in rows if r["syscall"] == "close"] == [(first.pid, 2)]
    assert summary["lost"] == 0


def test_a_process_is_named_by_its_last_exec(workloads: list[Workload]) -> None:
    shell = subprocess.Popen(["sh", "-c", "read go; exec /bin/true"], stdin=subprocess.PIPE)
    try:
        tracer = start_tracer(
            "syscalls", "-p", str(shell.pid), "-P", "-i", "0", "-T", "0", "-o", "json"
        )
        shell.communicate(b"go\n", timeout=10)
    finally:
        shell.kill()
    rows, _ = stop_tracer(tracer)
    assert {(r["pid"], r["comm"]) for r in rows} == {(shell.pid, "true")}
    assert [(r["count"], r["errors"]) for r in rows if r["syscall"] == "execve"] == [(1, 0)]


def test_top_and_sort(workloads: list[Workload]) -> None:
    traced = Workload(comm_name(), (200, 0, 3))
    workloads.append(traced)
    by_count = start_tracer("syscalls", "-p", str(traced.pid), "-i", "0", "-T", "1", "-o", "json")
    by_time = start_tracer(
        "syscalls", "-p", str(traced.pid), "-i", "0", "-T", "1", "--sort", "time", "-o", "json"
    )
    traced.go()
    count_rows, count_summary = stop_tracer(by_count)
    time_rows, _ = stop_tracer(by_time)
    assert [(r["syscall"], r["count"]) for r in count_rows] == [("getppid", 200)]
    assert [(r["syscall"], r["count"]) for r in time_rows] == [("nanosleep", 3)]
    assert count_summary["calls"] > 200  # counted everything, printed the top row


def test_table_has_bcc_columns(workloads: list[Workload]) -> None:
    traced = Workload(comm_name(), (123, 4, 0))
    workloads.append(traced)
    tracer = start_tracer("syscalls", "-p", str(traced.pid), "-i", "0")
    traced.go()
    out, err = stop_tracer_text(tracer)
    lines = out.splitlines()
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\]", lines[0])
    assert lines[1].split() == ["SYSCALL", "COUNT", "ERRORS", "TIME", "(us)", "AVG", "(us)"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:] if line.strip()}
    assert rows["getppid"][:2] == ["123", "0"]
    assert rows["close"][:2] == ["4", "4"]
    assert re.fullmatch(r"\d+\.\d{3}", rows["getppid"][2])
    assert "lost: 0" in err


# ---- latency -----------------------------------------------------------------------------
def test_latency_histograms_hold_every_call(workloads: list[Workload]) -> None:
    traced = Workload(comm_name(), (150, 9, 4))
    other = Workload(comm_name(), (60, 0, 2))
    workloads += [traced, other]
    tracer = start_tracer(
        "latency",
        "getppid",
        "close",
        "nanosleep",
        "--pid",
        str(traced.pid),
        "-i",
        "0",
        "-o",
        "json",
    )
    traced.go()
    other.go()
    rows, summary = stop_tracer(tracer)

    assert all(set(r) == LATENCY_FIELDS for r in rows)
    seen = by_syscall(rows)
    assert {name: r["count"] for name, r in seen.items()} == {
        "getppid": 150,
        "close": 9,
        "nanosleep": 4,
    }
    for r in rows:
        assert r["unit"] == "usecs"
        assert sum(b["count"] for b in r["buckets"]) == r["count"]
        assert r["buckets"][0]["low"] == 0 and r["buckets"][-1]["count"] > 0
        assert all(b["high"] + 1 == n["low"] for b, n in itertools.pairwise(r["buckets"]))
    # 2 ms naps land at 2000 us or above: in "1024 -> 2047" or a higher bucket
    assert all(b["low"] >= 1024 for b in seen["nanosleep"]["buckets"] if b["count"])
    assert summary == {"calls": 163, "lost": 0, "seconds": summary["seconds"]}


THREADED = textwrap.dedent(f"""
    import ctypes, os, sys, threading
    libc = ctypes.CDLL(None, use_errno=True)
    class Timespec(ctypes.Structure):
        _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]
    def naps():
        nap = Timespec(0, {NAP_NS})
        for _ in range(int(sys.argv[2])):
            libc.syscall(int(sys.argv[1]), ctypes.byref(nap), None)
    os.write(1, b"ready\\n")
    os.read(0, 1)
    threads = [threading.Thread(target=naps) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    os.write(1, b"done\\n")
    os.read(0, 1)
""")


def test_latency_is_timed_per_thread() -> None:
    """Four threads sleep at the same time: each call is timed from its own thread's entry
    (a start time per process would pair one thread's exit with another's entry)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", THREADED, str(table().number("nanosleep")), "5"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == b"ready\n"
        tracer = start_tracer("latency", "nanosleep", "-p", str(proc.pid), "-i", "0", "-o", "json")
        proc.stdin.write(b"g")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"done\n"
        rows, summary = stop_tracer(tracer)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert [r["count"] for r in rows] == [20] and summary["lost"] == 0
    assert all(b["low"] >= 1024 for b in rows[0]["buckets"] if b["count"])


def test_latency_table_is_bccs_histogram(workloads: list[Workload]) -> None:
    traced = Workload(comm_name(), (77, 0, 1))
    workloads.append(traced)
    tracer = start_tracer("latency", "getppid", "nanosleep", "-p", str(traced.pid), "-i", "0", "-m")
    traced.go()
    out, err = stop_tracer_text(tracer)
    sections = out.split("\nsyscall = ")[1:]
    assert [s.split("\n", 1)[0] for s in sections] == ["getppid", "nanosleep"]
    body = re.compile(r" *(\d+) -> (\d+) +: (\d+) +\|(\**) *\|")
    for section, calls in zip(sections, (77, 1), strict=True):
        lines = section.strip("\n").splitlines()
        assert lines[1] == "     msecs               : count     distribution"
        rows = [body.fullmatch(line) for line in lines[2:]]
        assert all(rows) and all(len(line) == 78 for line in lines[2:]), lines
        bounds = [(int(r[1]), int(r[2])) for r in rows]  # type: ignore[index]
        assert bounds[0] == (0, 1)
        assert all(high + 1 == low for (_, high), (low, _) in itertools.pairwise(bounds))
        assert sum(int(r[3]) for r in rows) == calls  # type: ignore[index]
        assert max(len(r[4]) for r in rows) == 40  # type: ignore[index]
    assert "calls: 78, lost: 0" in err


# ---- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tool", "args", "words"),
    [
        ("latency", ["getppid", "no_such_call"], ["SYSCALL", "no_such_call"]),
        ("latency", ["4096"], ["SYSCALL", "4096"]),
        ("latency", [], ["SYSCALL"]),
        ("latency", ["read", "-i", "-1"], ["--interval"]),
        ("syscalls", ["-i", "-0.5"], ["--interval"]),
        ("syscalls", ["-i", "inf"], ["--interval"]),
        ("syscalls", ["-i", "soon"], ["--interval"]),
        ("syscalls", ["--sort", "name"], ["--sort"]),
        ("syscalls", ["--top", "-1"], ["--top"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tool: str, args: list[str], words: list[str]) -> None:
    """(The options every tool shares are checked in test_trace_options.py.)"""
    user_error(run_trace(tool, *args), *words)
