"""The syscall tools' parts that need no kernel: bcc's histogram layout, the syscall
table, and how successive reads of the counters become per-interval rows."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from membrane.errors import UserError
from membrane.trace.histogram import buckets, log2_lines
from membrane.trace.syscall_table import SyscallTable, parse_header, table, write_table
from membrane.trace.tools.syscalls import Reporter

# `biolatency -D` as bcc prints it (bcc's tools/biolatency_example.txt, disk xvdb).
BCC_XVDB = """\
     usecs               : count     distribution
         0 -> 1          : 0        |                                        |
         2 -> 3          : 0        |                                        |
         4 -> 7          : 0        |                                        |
         8 -> 15         : 0        |                                        |
        16 -> 31         : 0        |                                        |
        32 -> 63         : 0        |                                        |
        64 -> 127        : 0        |                                        |
       128 -> 255        : 1        |                                        |
       256 -> 511        : 33       |**********************                  |
       512 -> 1023       : 36       |************************                |
      1024 -> 2047       : 58       |****************************************|
      2048 -> 4095       : 51       |***********************************     |
      4096 -> 8191       : 21       |**************                          |
      8192 -> 16383      : 2        |*                                       |"""


def slots_of(counts: list[int]) -> list[int]:
    """Kernel slots (slot 0 unused) for bucket counts starting at `0 -> 1`."""
    return [0, *counts] + [0] * (64 - 1 - len(counts))


def test_histogram_prints_exactly_like_bcc() -> None:
    counts = [0, 0, 0, 0, 0, 0, 0, 1, 33, 36, 58, 51, 21, 2]
    assert "\n".join(log2_lines(slots_of(counts), "usecs")) == BCC_XVDB


def test_buckets_have_bccs_bounds_and_stop_at_the_last_count() -> None:
    rows = buckets(slots_of([5, 0, 7]))
    assert rows == [
        {"low": 0, "high": 1, "count": 5},
        {"low": 2, "high": 3, "count": 0},
        {"low": 4, "high": 7, "count": 7},
    ]
    assert buckets([0] * 64) == [] and log2_lines([0] * 64, "usecs") == []


def test_wide_histograms_switch_layout_like_bcc() -> None:
    slots = [0] * 64
    slots[1], slots[40] = 4, 2
    lines = log2_lines(slots, "nsecs")
    assert lines[0] == "               nsecs                         : count     distribution"
    assert lines[-1] == (f"{2**39:>20} -> {2**40 - 1:<20} : 2        |{'*' * 10:<20}|")


def test_syscall_table_from_the_uapi_header(tmp_path: Path) -> None:
    header = "#define __NR_read 0\n#define __NR_getppid 110\n#define __NR_io_uring_setup 425\n"
    assert parse_header(header) == {"read": 0, "getppid": 110, "io_uring_setup": 425}
    src, out = tmp_path / "unistd_64.h", tmp_path / "table.tsv"
    src.write_text(header)
    assert write_table(src, out) == 3
    assert out.read_text().splitlines() == ["0\tread", "110\tgetppid", "425\tio_uring_setup"]


def test_syscall_names_and_numbers() -> None:
    t = SyscallTable({"read": 0, "getppid": 110})
    assert (t.name(110), t.name(999), t.number("getppid"), t.number("463")) == (
        "getppid",
        "999",
        110,
        463,
    )
    with pytest.raises(UserError, match="'nosuch' is not an x86_64 syscall"):
        t.number("nosuch")


@pytest.mark.skipif(
    not Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h").exists(),
    reason="no UAPI header on this machine",
)
def test_the_real_table_knows_the_abi() -> None:
    t = table()
    assert (t.number("read"), t.number("getppid"), t.number("execve")) == (0, 110, 59)


class FakeMap:
    """Just what Reporter uses of a per-CPU hash map: batch read, delete, key type."""

    def __init__(self) -> None:
        self.entries: dict[Any, Any] = {}

    @staticmethod
    def key_type(*fields: int) -> tuple[int, ...]:
        return fields

    def lookup_batch(self) -> list[tuple[Any, Any]]:
        return [
            (SimpleNamespace(pid=k[0], nr=k[1]) if isinstance(k, tuple) else k, v)
            for k, v in self.entries.items()
        ]

    def delete(self, key: Any) -> bool:
        return self.entries.pop(key, None) is not None


def per_cpu(*counts: tuple[int, int, int]) -> list[SimpleNamespace]:
    return [SimpleNamespace(count=c, errors=e, total_ns=t) for c, e, t in counts]


def test_reports_are_differences_and_the_dead_are_dropped_after_their_last_report() -> None:
    dead = _exited_pid()
    alive = os.getpid()
    counters, comms = FakeMap(), FakeMap()
    counters.entries = {
        (alive, 110): per_cpu((3, 0, 300), (2, 1, 200)),
        (dead, 3): per_cpu((1, 1, 50), (0, 0, 0)),
    }
    comms.entries = {alive: SimpleNamespace(comm=b"me\0"), dead: SimpleNamespace(comm=b"gone")}
    reporter = Reporter(
        counters, comms, SyscallTable({"getppid": 110, "close": 3}), per_process=True
    )

    _, first = reporter.rows()
    assert sorted(
        (r["pid"], r["comm"], r["syscall"], r["count"], r["errors"], r["total_ns"]) for r in first
    ) == sorted([(alive, "me", "getppid", 5, 1, 500), (dead, "gone", "close", 1, 1, 50)])
    counters.entries[(alive, 110)] = per_cpu((6, 0, 600), (3, 1, 300))
    _, second = reporter.rows()
    assert [(r["syscall"], r["count"], r["errors"], r["avg_ns"]) for r in second] == [
        ("getppid", 4, 0, 100)
    ]
    assert set(counters.entries) == {(alive, 110)} and set(comms.entries) == {alive}
    assert reporter.calls == 10


def _exited_pid() -> int:
    """A pid no process has now (one that ran and was reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not os.path.exists(f"/proc/{proc.pid}")
    return proc.pid
