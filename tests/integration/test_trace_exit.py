"""`membrane trace exit` sees exactly the exits of processes the test starts: exit codes,
killing signals, core dumps, lifetimes, whole processes by default and threads on request.

The workloads carry a command name of their own (a symlink named after it, or
prctl(PR_SET_NAME)), and --comm selects them: exactly their exits must come out."""

from __future__ import annotations

import os
import resource
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from trace_support import run_trace, stop_tracer

from membrane.testing.cli import user_error
from membrane.testing.signals import with_default_signals
from membrane.testing.tracer import start_tracer, stop_tracer_text

pytestmark = pytest.mark.root

EXIT_FIELDS = {
    "time",
    "pid",
    "tid",
    "ppid",
    "uid",
    "comm",
    "status",
    "exit_code",
    "signal",
    "signal_name",
    "core_dumped",
    "exit",
    "lifetime_s",
    "ends_process",
}

# Names itself, starts two threads that end on their own (after which only the main thread
# is left in /proc/self/task), one that waits for ever, reads "go", then exit_group(7)
# from the waiting thread: the last thread out is any of the two left.
THREADS = textwrap.dedent("""
    import ctypes, os, sys, threading
    ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
    for t in [threading.Thread(target=lambda: None) for _ in range(2)]:
        t.start()
        t.join()
    while len(os.listdir("/proc/self/task")) > 1:
        pass
    go = threading.Event()
    threading.Thread(target=lambda: (go.wait(), os._exit(7))).start()
    sys.stdin.readline()
    go.set()
    threading.Event().wait()
""")


class Named:
    """Programs started under one command name: symlinks to them named `name`."""

    def __init__(self, directory: Path) -> None:
        self.name = f"mbx{secrets.token_hex(4)}"
        self.directory = directory
        self.procs: list[subprocess.Popen[str]] = []

    def path(self, program: str) -> str:
        link = self.directory / program.strip("/").replace("/", "-") / self.name
        if not link.exists():
            link.parent.mkdir()
            link.symlink_to(program)
        return str(link)

    def start(self, program: str, *args: str, **popen: Any) -> subprocess.Popen[str]:
        """Run `program` under our name, with SIGINT and SIGQUIT at their default action
        (the test run may have inherited them ignored, e.g. under nohup)."""
        argv = with_default_signals([self.path(program), *args])
        proc = subprocess.Popen(argv, text=True, **popen)
        self.procs.append(proc)
        return proc

    def wait_exec(self, proc: subprocess.Popen[str]) -> None:
        """Until proc runs under our name (its exec is done, it has a start time)."""
        deadline = time.monotonic() + 10
        while Path(f"/proc/{proc.pid}/comm").read_text().strip() != self.name:
            assert time.monotonic() < deadline, "workload did not start"

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def named(tmp_path: Path) -> Iterator[Named]:
    workload = Named(tmp_path)
    try:
        yield workload
    finally:
        workload.kill_all()


def by_pid(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    pids = [r["pid"] for r in records]
    assert len(pids) == len(set(pids)), records  # one record per process
    return {r["pid"]: r for r in records}


def allow_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def test_exit_codes_signals_and_lifetimes(named: Named, tmp_path: Path) -> None:
    tracer = start_tracer("exit", "--comm", named.name, "-o", "json")
    started = time.monotonic()
    code0 = named.start("/bin/sleep", "0.3")  # lives at least 0.3 s
    code3 = named.start("/bin/sh", "-c", "exit 3")
    killed = named.start("/bin/sleep", "60")
    termed = named.start("/bin/sleep", "60")
    quit_ = named.start("/bin/sleep", "60", cwd=tmp_path, preexec_fn=allow_core_dumps)
    for proc, sig in ((killed, signal.SIGKILL), (termed, signal.SIGTERM), (quit_, signal.SIGQUIT)):
        named.wait_exec(proc)
        proc.send_signal(sig)
    for proc in named.procs:
        proc.wait(timeout=30)
    elapsed = time.monotonic() - started
    records, summary = stop_tracer(tracer)

    assert summary["lost"] == 0 and summary["events"] == len(records) == 5
    assert all(set(r) == EXIT_FIELDS for r in records)
    seen = by_pid(records)
    assert set(seen) == {p.pid for p in named.procs}
    for r in records:
        assert (r["comm"], r["ppid"], r["uid"], r["tid"], r["ends_process"]) == (
            named.name,
            os.getpid(),
            0,
            r["pid"],
            True,
        )
        assert 0 < r["lifetime_s"] <= elapsed

    exits = {pid: (r["exit_code"], r["signal"], r["signal_name"]) for pid, r in seen.items()}
    assert exits == {
        code0.pid: (0, None, None),
        code3.pid: (3, None, None),
        killed.pid: (None, 9, "SIGKILL"),
        termed.pid: (None, 15, "SIGTERM"),
        quit_.pid: (None, 3, "SIGQUIT"),
    }
    assert seen[code0.pid]["lifetime_s"] >= 0.3
    assert (seen[code3.pid]["status"], seen[code3.pid]["exit"]) == (3 << 8, "code 3")
    assert seen[killed.pid]["exit"] == "signal 9 (SIGKILL)"
    # SIGQUIT dumps core where the kernel's core_pattern and the rlimit let it.
    dumped = any(p.name.startswith("core") for p in tmp_path.iterdir())
    assert seen[quit_.pid]["core_dumped"] is dumped
    assert seen[quit_.pid]["status"] == signal.SIGQUIT | (0x80 if dumped else 0)
    assert all(not r["core_dumped"] for r in records if r["pid"] != quit_.pid)


def test_whole_process_by_default_threads_on_request(named: Named) -> None:
    processes = start_tracer("exit", "--comm", named.name, "-o", "json")
    threads = start_tracer("exit", "--comm", named.name, "--per-thread", "-o", "json")
    proc = subprocess.Popen(
        [sys.executable, "-c", THREADS, named.name], stdin=subprocess.PIPE, text=True
    )
    named.procs.append(proc)
    proc.communicate("go\n", timeout=30)
    assert proc.returncode == 7
    whole, _ = stop_tracer(processes)
    each, _ = stop_tracer(threads)

    (process,) = whole  # the process once, however many threads it had
    assert (process["pid"], process["exit_code"], process["comm"], process["ends_process"]) == (
        proc.pid,
        7,
        named.name,
        True,
    )
    assert process["tid"] in {r["tid"] for r in each[2:]}  # the thread that went last

    assert len(each) == 4 and {r["pid"] for r in each} == {proc.pid}
    assert len({r["tid"] for r in each}) == 4 and proc.pid in {r["tid"] for r in each}
    ended, group = each[:2], each[2:]  # two threads returned, then the group exit
    assert [(r["exit_code"], r["ends_process"]) for r in ended] == [(0, False)] * 2
    assert all(r["tid"] != proc.pid for r in ended)
    assert sorted((r["exit_code"], r["ends_process"]) for r in group) == [(7, False), (7, True)]
    # A thread's age is its own: the ones that ended first were younger than the process.
    assert all(r["lifetime_s"] < process["lifetime_s"] for r in ended)


def test_pid_filter_and_failed_only(named: Named) -> None:
    waiting = named.start("/bin/sh", "-c", "read line; exit 4", stdin=subprocess.PIPE)
    named.wait_exec(waiting)
    by_pid_ = start_tracer("exit", "--pid", str(waiting.pid), "-o", "json")
    failed = start_tracer("exit", "--comm", named.name, "--failed", "-o", "json")
    named.start("/bin/sh", "-c", "exit 0").wait(timeout=30)
    other = named.start("/bin/sh", "-c", "exit 5")
    other.wait(timeout=30)
    waiting.communicate("go\n", timeout=30)
    only_waiting, _ = stop_tracer(by_pid_)
    failures, _ = stop_tracer(failed)
    assert [(r["pid"], r["exit_code"]) for r in only_waiting] == [(waiting.pid, 4)]
    assert sorted((r["pid"], r["exit_code"]) for r in failures) == sorted(
        [(other.pid, 5), (waiting.pid, 4)]
    )


def test_table_has_bcc_columns(named: Named) -> None:
    tracer = start_tracer("exit", "-T", "--comm", named.name)
    code = named.start("/bin/sh", "-c", "exit 2")
    code.wait(timeout=30)
    out, err = stop_tracer_text(tracer)
    header, *rows = out.splitlines()
    assert header.split() == ["TIME", "PCOMM", "PID", "PPID", "TID", "AGE(s)", "EXIT"]
    assert len(rows) == 1 and "events: 1, lost: 0" in err
    cells = rows[0].split()
    assert cells[1:5] == [named.name, str(code.pid), str(os.getpid()), str(code.pid)]
    assert cells[6:] == ["code", "2"] and float(cells[5]) < 30


def test_per_thread_takes_no_value() -> None:
    """A flag, not an option with a value. (The options every tool shares are checked in
    test_trace_options.py.)"""
    user_error(run_trace("exit", "--per-thread", "yes"), "yes")
