"""`membrane trace open` at the edges of its records and its capacity: paths of any length
and bytes, a burst reported whole, a full `starts` map counted as lost (task storage has
none to fill), and open(2) traced
where the kernel has that syscall."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from trace_support import run_trace, stop_tracer

from membrane.bpf.probe import supports
from membrane.testing.tracer import start_tracer, stop_tracer_text
from membrane.trace.options import TraceOptions
from membrane.trace.session import TraceSession
from membrane.trace.syscall_table import table
from membrane.trace.tools.open import Starts, has_open_syscall

pytestmark = pytest.mark.root

# argv: COMM PATH...: names itself, waits for a line, tries to open each path (most fail).
TRY_OPEN = textwrap.dedent("""
    import ctypes, os, sys
    ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
    sys.stdin.readline()
    for path in sys.argv[2:]:
        try:
            os.close(os.open(os.fsencode(path), os.O_RDONLY))
        except OSError:
            pass
""")


def _run(script: str, *args: str) -> int:
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE, text=True)
    proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0
    return proc.pid


def _table_text(path: str) -> str:
    """How the table writes a path: control bytes as \\xNN, the backslash doubled."""
    out = []
    for byte in os.fsencode(path):
        if byte < 0x20 or byte == 0x7F:
            out.append(f"\\x{byte:02x}".encode())
        elif byte == 0x5C:
            out.append(b"\\\\")
        else:
            out.append(bytes([byte]))
    return b"".join(out).decode()


def _odd_paths(base: Path) -> list[str]:
    deep = "/".join(["d" * 250] * 17)  # cut to PATH_MAX - 1 below; every part legal
    return [
        "/x",
        str(base / 'quote"back\\slash'),
        str(base / "new\nline\ttab\x01ctl\x7f"),
        str(base / "caf\u00e9 \u2603 \U0001f600"),
        f"{base}/{deep}"[:4095],
    ]


@pytest.mark.parametrize("output", ["json", "table"])
def test_short_long_and_odd_paths_come_through_whole(tmp_path: Path, output: str) -> None:
    comm = f"mbv-{secrets.token_hex(3)}"
    paths = _odd_paths(tmp_path)
    assert len(os.fsencode(paths[-1])) == 4095  # the longest a path can be, NUL aside
    args = ["open", "--comm", comm] + (["-o", "json"] if output == "json" else [])
    tracer = start_tracer(*args)
    _run(TRY_OPEN, comm, *paths)
    if output == "json":
        records, summary = stop_tracer(tracer)
        assert summary["lost"] == 0
        seen = [r["path"] for r in records if r["path"] in paths]
        assert seen == paths
        assert all(r["comm"] == comm for r in records)
    else:
        out, err = stop_tracer_text(tracer)
        assert "lost: 0" in err
        lines = out.splitlines()
        for path in paths:
            assert sum(line.endswith(" " + _table_text(path)) for line in lines) == 1, path


def test_a_burst_is_reported_whole(tmp_path: Path) -> None:
    """Tens of thousands of opens as fast as Python makes them: every one arrives, and
    the summary counts exactly that many, none lost."""
    count = 50_000
    comm = f"mbb-{secrets.token_hex(3)}"
    target = tmp_path / "target"
    target.write_text("x")
    burst = textwrap.dedent("""
        import ctypes, os, sys
        ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
        path, n = os.fsencode(sys.argv[2]), int(sys.argv[3])
        sys.stdin.readline()
        for _ in range(n):
            os.close(os.open(path, os.O_RDONLY))
    """)
    tracer = start_tracer("open", "--comm", comm, "-o", "json")
    _run(burst, comm, str(target), str(count))
    records, summary = stop_tracer(tracer)
    assert summary["lost"] == 0
    assert sum(r["path"] == str(target) for r in records) == count
    assert summary["events"] == len(records)


def _blocked_in_open(pid: int, threads: int, open_nrs: set[int]) -> bool:
    blocked = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            nr = (task / "syscall").read_text().split()[0]
        except OSError:
            continue
        blocked += nr.isdigit() and int(nr) in open_nrs
    return blocked >= threads


def _blocked_opens(tmp_path: Path, starts: Starts, map_sizes: dict[str, int]) -> tuple[int, int]:
    """Five threads block inside open() of a FIFO, then return: how many of their opens
    were reported, and how many counted as lost."""
    fifos = [tmp_path / f"fifo{i}" for i in range(5)]
    for f in fifos:
        os.mkfifo(f)
    readers = textwrap.dedent("""
        import os, sys, threading
        sys.stdin.readline()
        threads = [threading.Thread(target=lambda p=p: os.close(os.open(p, os.O_RDONLY)))
                   for p in sys.argv[1:]]
        for t in threads: t.start()
        for t in threads: t.join()
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", readers, *map(str, fifos)], stdin=subprocess.PIPE, text=True
    )
    nrs = {table().number("openat")} | ({table().number("open")} if has_open_syscall() else set())
    try:
        opts = TraceOptions(pid=proc.pid)
        with TraceSession(
            "trace_open",
            opts,
            map_sizes={**starts.map_sizes, **map_sizes},
            programs=starts.programs,
            unused_maps=starts.unused_maps,
        ) as session:
            ring = session.ring(None)
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            deadline = time.monotonic() + 30
            while not _blocked_in_open(proc.pid, len(fifos), nrs):
                assert time.monotonic() < deadline, "the readers never blocked in open"
                time.sleep(0.02)
            writers = [os.open(f, os.O_WRONLY | os.O_NONBLOCK) for f in fifos]
            proc.wait(timeout=30)
            for fd in writers:
                os.close(fd)
            records = ring.drain()
            lost = ring.lost
    finally:
        proc.kill()
        proc.wait()
    paths = {str(f).encode() for f in fifos}
    spans = zip(records.offsets.tolist(), records.lengths.tolist(), strict=True)
    raw = [bytes(records.block[o : o + n]) for o, n in spans]
    return len([r for r in raw if any(p in r for p in paths)]), lost


def test_a_full_starts_map_is_counted_as_lost(tmp_path: Path) -> None:
    """The hash fallback (kernels without task storage from tracepoints): with room for
    two, the two are reported when they return, the other three counted as lost."""
    starts = Starts(task_storage=False, with_open=has_open_syscall())
    assert _blocked_opens(tmp_path, starts, {"starts": 2}) == (2, 3)


def test_task_storage_keeps_every_thread_in_flight(tmp_path: Path) -> None:
    """With task-local storage (what this kernel's probe chooses where it allows it)
    nothing fills up: all five are reported, none lost."""
    if not supports("helper_task_storage"):
        pytest.skip("this kernel refuses task-local storage from tracepoint programs")
    starts = Starts.for_this_kernel()
    assert starts.task_storage
    assert _blocked_opens(tmp_path, starts, {}) == (5, 0)


def test_open_syscall_is_traced_where_the_kernel_has_it(tmp_path: Path) -> None:
    """open(2) itself (not openat), called through syscall(2) as a libc without openat
    would; expected only where tracefs lists sys_enter_open."""
    present = Path("/sys/kernel/tracing/events/syscalls/sys_enter_open").exists()
    assert has_open_syscall() == present
    comm = f"mbo-{secrets.token_hex(3)}"
    target = tmp_path / "via-open"
    target.write_text("x")
    nr = table().number("open") if present else -1
    script = textwrap.dedent("""
        import ctypes, os, sys
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, sys.argv[1].encode(), 0, 0, 0)
        sys.stdin.readline()
        nr = int(sys.argv[3])
        if nr >= 0:
            fd = libc.syscall(nr, sys.argv[2].encode(), os.O_RDONLY)
            assert fd >= 0
            os.close(fd)
        os.close(os.open(sys.argv[2], os.O_RDONLY))
    """)
    tracer = start_tracer("open", "--comm", comm, "-o", "json")
    _run(script, comm, str(target), str(nr))
    records, summary = stop_tracer(tracer)
    ours = [r["syscall"] for r in records if r["path"] == str(target)]
    assert ours == (["open", "openat"] if present else ["openat"])
    assert summary["lost"] == 0


def test_buffer_size_is_checked() -> None:
    result = run_trace("open", "--buffer-size", "3M", "--duration", "0.1")
    assert result.returncode == 2 and "--buffer-size" in result.stderr
