"""`membrane trace open` sees exactly the opens of a workload the test runs."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from trace_support import run_trace, stop_tracer

from membrane.testing.tracer import start_tracer, stop_tracer_text

pytestmark = pytest.mark.root
OPEN_FIELDS = {
    "time",
    "pid",
    "tid",
    "uid",
    "comm",
    "ret",
    "fd",
    "error",
    "flags",
    "flags_text",
    "syscall",
    "path",
}

# The workload names itself (prctl PR_SET_NAME) so --comm can select it, waits for a line
# on stdin (so the tracer is attached first), opens every path given, tries one missing
# path, and does one openat2 through syscall(2).
WORKLOAD = textwrap.dedent("""
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, sys.argv[1].encode(), 0, 0, 0)
    sys.stdin.readline()
    for path in sys.argv[3:]:
        os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    try:
        os.open(sys.argv[2], os.O_RDONLY)
    except FileNotFoundError:
        pass
    class OpenHow(ctypes.Structure):
        _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                    ("resolve", ctypes.c_uint64)]
    how = OpenHow(os.O_RDONLY, 0, 0)
    fd = libc.syscall(437, -100, sys.argv[3].encode(), ctypes.byref(how), ctypes.sizeof(how))
    os.close(fd)
""")


def run_workload(comm: str, missing: Path, paths: list[Path]) -> int:
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKLOAD, comm, str(missing), *map(str, paths)],
        stdin=subprocess.PIPE,
        text=True,
    )
    proc.communicate("go\n", timeout=30)
    assert proc.returncode == 0
    return proc.pid


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / f"file-{i:03d}-{secrets.token_hex(4)}" for i in range(60)]
    for p in paths:
        p.write_text("x")
    return paths


def test_sees_exactly_the_workloads_opens(files: list[Path], tmp_path: Path) -> None:
    comm = f"mbt-{secrets.token_hex(3)}"
    missing = tmp_path / "does-not-exist"
    tracer = start_tracer("open", "--comm", comm, "-o", "json")
    pid = run_workload(comm, missing, files)
    records, summary = stop_tracer(tracer)

    assert summary["lost"] == 0 and summary["events"] == len(records)
    assert all(set(r) == OPEN_FIELDS for r in records)
    assert {r["comm"] for r in records} == {comm}  # the kernel filter let nothing else in
    assert {r["pid"] for r in records} == {pid}

    ours = [r for r in records if r["path"].startswith(str(tmp_path))]
    opened = [r for r in ours if r["syscall"] == "openat" and r["ret"] >= 0]
    assert [r["path"] for r in opened] == [str(p) for p in files]  # in order, each once
    assert all(r["fd"] == r["ret"] and r["error"] is None for r in opened)
    assert all(r["flags"] == os.O_RDONLY | os.O_CLOEXEC for r in opened)
    assert all(r["flags_text"] == "O_RDONLY|O_CLOEXEC" for r in opened)

    failed = [r for r in ours if r["ret"] < 0]
    assert [(r["path"], r["error"], r["fd"]) for r in failed] == [(str(missing), "ENOENT", None)]
    via_openat2 = [r for r in ours if r["syscall"] == "openat2"]
    assert [(r["path"], r["ret"] >= 0) for r in via_openat2] == [(str(files[0]), True)]
    assert len(ours) == len(files) + 2


def test_pid_filter_and_failed_only(files: list[Path], tmp_path: Path) -> None:
    comm = f"mbt-{secrets.token_hex(3)}"
    missing = tmp_path / "missing"
    waiting = subprocess.Popen(
        [sys.executable, "-c", WORKLOAD, comm, str(missing), *map(str, files[:5])],
        stdin=subprocess.PIPE,
        text=True,
    )
    try:
        tracer = start_tracer("open", "--pid", str(waiting.pid), "--failed", "-o", "json")
        run_workload(comm, missing, files[5:10])  # same comm, other pid: filtered out
        waiting.communicate("go\n", timeout=30)
    finally:
        waiting.kill()
    records, _ = stop_tracer(tracer)
    assert [
        (r["pid"], r["path"], r["error"]) for r in records if r["path"].startswith(str(tmp_path))
    ] == [(waiting.pid, str(missing), "ENOENT")]
    assert all(r["ret"] < 0 for r in records)


def test_table_output_has_bcc_columns(files: list[Path], tmp_path: Path) -> None:
    comm = f"mbt-{secrets.token_hex(3)}"
    tracer = start_tracer("open", "--comm", comm)
    run_workload(comm, tmp_path / "missing", files[:3])
    out, err = stop_tracer_text(tracer)
    lines = out.splitlines()
    assert lines[0].split() == ["PID", "COMM", "FD", "ERR", "FLAGS", "PATH"]
    assert any(line.endswith(str(files[0])) and comm in line for line in lines[1:])
    assert "lost: 0" in err


def test_duration_stops_by_itself() -> None:
    result = run_trace("open", "--duration", "0.5", "--comm", "nothing-here", "-o", "json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])["summary"]
    assert summary["events"] == 0 and summary["lost"] == 0 and summary["seconds"] >= 0.5
