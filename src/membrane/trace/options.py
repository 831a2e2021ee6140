"""The options every trace tool shares, validated once (pid, comm, uid, duration, output)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import typer

from membrane.choices import check_choice
from membrane.errors import UserError

COMM_MAX = 15  # the kernel keeps 16 bytes with the NUL

PID = typer.Option(None, "--pid", "-p", help="Only this process (tgid).")
COMM = typer.Option(None, "--comm", "-c", help="Only processes with this command name.")
UID = typer.Option(None, "--uid", "-u", help="Only this user id.")
DURATION = typer.Option(None, "--duration", "-d", help="Stop after this many seconds.")
OUTPUT = typer.Option("table", "-o", "--output", help="table or json (one object per line).")
TIMESTAMP = typer.Option(False, "--timestamp", "-T", help="Show a time column.")

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_RING_MIN, _RING_MAX = 1 << 16, 1 << 30


def buffer_size_option(default: int, holds: str) -> Any:
    """--buffer-size of a per-event tool; `holds` says what the default holds."""
    return typer.Option(
        None,
        "--buffer-size",
        "-b",
        help=f"Ring buffer between the kernel and this tool, e.g. 16M: kernel memory (that "
        f"much, charged to this tool's memory cgroup), a power of two from 64K to 1G. "
        f"Default {format_size(default)}: {holds}. Events that find it full are counted "
        f"as lost.",
        show_default=False,
    )


def format_size(size: int) -> str:
    for unit in ("G", "M", "K"):
        if size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


def parse_size(text: str) -> int:
    """A ring buffer size: 64K, 16M, 1G or bytes; a power of two in [64K, 1G]."""
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (raw[:-1], raw[-1]) if raw[-1:] in _SIZE_UNITS else (raw, "")
    if not number.isdigit():
        raise UserError("--buffer-size", f"{text!r}: a size such as 64K, 16M or 1G")
    size = int(number) * _SIZE_UNITS[unit]
    if size & (size - 1) or not _RING_MIN <= size <= _RING_MAX:
        raise UserError("--buffer-size", f"{text!r}: a power of two from 64K to 1G")
    return size


@dataclass(frozen=True)
class TraceOptions:
    pid: int | None = None
    comm: str | None = None
    uid: int | None = None
    duration: float | None = None
    output: str = "table"
    buffer_size: int | None = None  # ring bytes; None: the tool's default

    @classmethod
    def parse(
        cls,
        pid: int | None,
        comm: str | None,
        uid: int | None,
        duration: float | None,
        output: str,
        buffer_size: str | None = None,
    ) -> TraceOptions:
        output = check_choice(output, ("table", "json"), "--output")
        if pid is not None:
            if pid <= 0:
                raise UserError("--pid", f"{pid} is not a process id")
            if not os.path.exists(f"/proc/{pid}"):
                raise UserError("--pid", f"no process with pid {pid}")
        if comm is not None and not 0 < len(comm.encode()) <= COMM_MAX:
            raise UserError("--comm", f"{comm!r}: a command name has 1 to {COMM_MAX} bytes")
        if uid is not None and not 0 <= uid < 2**32 - 1:
            raise UserError("--uid", f"{uid} is not a user id")
        if duration is not None and duration <= 0:
            raise UserError("--duration", f"{duration} is not a positive number of seconds")
        size = None if buffer_size is None else parse_size(buffer_size)
        return cls(pid, comm, uid, duration, output, size)

    def bpf_config(self) -> dict[str, object]:
        """Load-time constants of bpf/lib/trace_filter.h."""
        config: dict[str, object] = {"self_pid": os.getpid()}
        if self.pid is not None:
            config["filter_pid"] = self.pid
        if self.uid is not None:
            config["filter_uid"] = self.uid
        if self.comm is not None:
            config["filter_comm_set"] = True
            config["filter_comm"] = self.comm.encode().ljust(16, b"\0")
        return config
