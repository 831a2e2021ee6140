"""The options every trace tool shares, validated once (pid, comm, uid, duration, output)."""

from __future__ import annotations

import os
from dataclasses import dataclass

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


@dataclass(frozen=True)
class TraceOptions:
    pid: int | None = None
    comm: str | None = None
    uid: int | None = None
    duration: float | None = None
    output: str = "table"

    @classmethod
    def parse(
        cls, pid: int | None, comm: str | None, uid: int | None, duration: float | None, output: str
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
        return cls(pid, comm, uid, duration, output)

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
