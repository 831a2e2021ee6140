"""`membrane trace profile`: on-CPU profiler, like bcc's profile. Samples every CPU at a fixed
frequency and counts kernel + user stacks in the kernel; prints the stacks at the end, and
can write folded stacks and an SVG flame graph."""

from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import typer

from membrane.abi import PROFILE_NO_STACK
from membrane.bpf.links import attach_cpu_sampler
from membrane.errors import UserError
from membrane.trace import flamegraph
from membrane.trace.options import COMM, DURATION, OUTPUT, PID, UID, TraceOptions
from membrane.trace.output import Printer, text
from membrane.trace.session import TraceSession
from membrane.trace.symbols import Symbolizer, demangle
from membrane.trace.tools import Tool

_MAX_SAMPLE_RATE = "/proc/sys/kernel/perf_event_max_sample_rate"
_STACK_STORAGE_MAX = 1 << 20  # each stack slot costs ~1 KiB of kernel memory
_ERROR_FIELDS = (
    "kernel_stack_eexist",
    "kernel_stack_efault",
    "kernel_stack_other",
    "user_stack_eexist",
    "user_stack_efault",
    "user_stack_other",
)


@dataclass(frozen=True)
class Stack:
    """One counted stack; frames innermost first, as the kernel records them."""

    pid: int
    comm: str
    samples: int
    kernel: list[str]
    user: list[str]
    kernel_error: str | None  # errno name when the kernel stack id was an error
    user_error: str | None

    def record(self) -> dict[str, Any]:
        """The JSON form; field names are a stable contract."""
        return {
            "pid": self.pid,
            "comm": self.comm,
            "samples": self.samples,
            "kernel_stack": self.kernel,
            "user_stack": self.user,
            "kernel_stack_error": self.kernel_error,
            "user_stack_error": self.user_error,
        }

    def folded_frames(self) -> list[str]:
        """Root first: the command, the user frames, then the kernel frames marked _[k]."""
        user = ["[missing user stack]"] if self.user_error else self.user
        kernel = ["[missing kernel stack]"] if self.kernel_error else self.kernel
        return [
            self.comm,
            *reversed(user),
            *(f + flamegraph.KERNEL_SUFFIX for f in reversed(kernel)),
        ]

    def text(self) -> str:
        """bcc profile's layout: kernel frames, `--`, user frames, `- comm (pid)`, count."""
        lines = []
        if self.kernel_error:
            lines.append("[missing kernel stack]")
        lines += self.kernel
        if lines and (self.user or self.user_error):
            lines.append("--")
        if self.user_error:
            lines.append("[missing user stack]")
        lines += self.user
        lines.append(f"{'-':<16} {self.comm} ({self.pid})")
        return "".join(f"    {line}\n" for line in lines) + f"        {self.samples}\n"


def max_sample_rate() -> int:
    """The kernel's limit for perf sampling frequencies (it lowers it by itself when
    sampling interrupts take too long)."""
    try:
        return int(Path(_MAX_SAMPLE_RATE).read_text())
    except (OSError, ValueError):
        return 100_000


def online_cpus() -> list[int]:
    """CPUs to sample: /sys/devices/system/cpu/online ("0-3,6")."""
    cpus: list[int] = []
    for part in Path("/sys/devices/system/cpu/online").read_text().strip().split(","):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def _check_output_file(path: str | None, field: str) -> None:
    """Refuse an unwritable destination before profiling, not after."""
    if path is None or path == "-":
        return
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(field, f"{path} is a directory")
    if not os.path.isdir(parent):
        raise UserError(field, f"directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(field, f"cannot write into {parent}")


def _errno_name(stack_id: int) -> str | None:
    if stack_id >= 0 or stack_id == PROFILE_NO_STACK:
        return None
    return errno.errorcode.get(-stack_id, str(-stack_id))


def _remember_processes(batch: np.ndarray, symbolizer: Symbolizer) -> None:
    """Read the mappings of newly sampled processes now, while they still run."""
    images = batch["image"]
    for pid, exec_id in zip(images["pid"].tolist(), images["exec_id"].tolist(), strict=True):
        symbolizer.snapshot(pid, exec_id)


def collect(
    session: TraceSession, symbolizer: Symbolizer, kernel_stacks: bool
) -> tuple[list[Stack], dict[str, int]]:
    """The counted stacks, symbolized, and the kernel's totals (call after detach)."""
    per_cpu = session.map("stats").lookup(0)
    totals = {
        name: sum(getattr(s, name) for s in per_cpu) for name in ("samples", "lost", *_ERROR_FIELDS)
    }
    entries = session.map("counts").lookup_batch()
    latest: dict[int, int] = {}  # pid -> the last program it was seen running (exec_id)
    for key, _ in entries:
        latest[key.image.pid] = max(key.image.exec_id, latest.get(key.image.pid, 0))
    for pid, exec_id in latest.items():
        symbolizer.refresh(pid, exec_id)  # libraries loaded since it was first seen
    stack_map = session.map("stacks")
    addresses: dict[int, list[int]] = {}

    def frames(stack_id: int) -> list[int]:
        if stack_id < 0:
            return []
        if stack_id not in addresses:
            raw = stack_map.lookup(stack_id)
            ips = np.frombuffer(raw, dtype="<u8") if raw else np.zeros(0, np.uint64)
            end = np.flatnonzero(ips == 0)
            addresses[stack_id] = ips[: end[0] if len(end) else len(ips)].tolist()
        return addresses[stack_id]

    # Stack ids differ by every return address; stacks equal once symbolized are one.
    merged: dict[tuple, int] = {}
    for key, count in entries:
        kernel = tuple(symbolizer.kernel(frames(key.kernel_stack_id)))
        pid = key.image.pid
        user = tuple(symbolizer.user(pid, frames(key.user_stack_id), key.image.exec_id))
        errors = (_errno_name(key.kernel_stack_id), _errno_name(key.user_stack_id))
        if not kernel and not user and errors == (None, None):
            # Only one kind of stack was taken (-K or -U) and this sample has none of it.
            kernel, user = (("[user mode]",), ()) if kernel_stacks else ((), ("[kernel thread]",))
        ident = (pid, text(key.comm), kernel, user, *errors)
        merged[ident] = merged.get(ident, 0) + count
    readable = demangle(name for _, _, _, user, *_ in merged for name in user)
    stacks = [
        Stack(
            pid=pid,
            comm=comm,
            samples=count,
            kernel=list(kernel),
            user=[readable.get(name, name) for name in user],
            kernel_error=kernel_error,
            user_error=user_error,
        )
        for (pid, comm, kernel, user, kernel_error, user_error), count in merged.items()
    ]
    stacks.sort(key=lambda s: (-s.samples, s.pid, s.comm))
    return stacks, totals


def _write(path: str, content: str, field: str) -> None:
    if path == "-":
        sys.stdout.write(content)
        return
    try:
        Path(path).write_text(content)
    except OSError as err:
        raise UserError(field, f"cannot write {path}: {err.strerror}") from None


def command(
    pid: int = PID,
    comm: str = COMM,
    uid: int = UID,
    duration: float = DURATION,
    output: str = OUTPUT,
    frequency: int = typer.Option(49, "--frequency", "-F", help="Samples per second per CPU."),
    user_only: bool = typer.Option(
        False, "--user-stacks-only", "-U", help="Only user stacks (no kernel frames)."
    ),
    kernel_only: bool = typer.Option(
        False, "--kernel-stacks-only", "-K", help="Only kernel stacks (no user frames)."
    ),
    idle: bool = typer.Option(
        False, "--include-idle", "-I", help="Count the idle task too (the CPUs' idle time)."
    ),
    folded: str = typer.Option(
        None,
        "--folded",
        metavar="FILE",
        help="Write folded stacks (comm;frame;...;leaf count) to "
        "FILE; '-' prints them instead of the stacks.",
    ),
    svg: str = typer.Option(
        None, "--svg", metavar="FILE", help="Write an SVG flame graph to FILE."
    ),
    top: int = typer.Option(
        0, "--top", "-n", help="Show only the N hottest stacks (0: all; files always get all)."
    ),
    stack_storage: int = typer.Option(
        16384,
        "--stack-storage-size",
        help="Distinct stacks the kernel can keep; raise it "
        "when the summary reports eexist errors.",
    ),
) -> None:
    """Profile CPU usage: sample kernel and user stacks on every CPU at -F Hz, count them in
    the kernel, and print the stacks with their sample counts at the end (hottest last,
    like bcc's profile). JSON output has one object per stack, hottest first, frames
    innermost first.

    Examples:

      membrane trace profile -d 10                   # the whole machine for 10 s

      membrane trace profile -p 1234 -F 99 -U        # user stacks of process 1234

      membrane trace profile -d 30 --svg cpu.svg     # a flame graph to open in a browser

      membrane trace profile -c nginx --folded - -d 5 > nginx.folded
    """
    opts = TraceOptions.parse(pid, comm, uid, duration, output)
    limit = max_sample_rate()
    if not 0 < frequency <= limit:
        raise UserError(
            "--frequency",
            f"{frequency} Hz: the sampling frequency must be 1 to "
            f"{limit} (kernel.perf_event_max_sample_rate)",
        )
    if user_only and kernel_only:
        raise UserError("--user-stacks-only", "cannot be combined with --kernel-stacks-only")
    if top < 0:
        raise UserError("--top", f"{top} is not a number of stacks")
    if not 0 < stack_storage <= _STACK_STORAGE_MAX:
        raise UserError(
            "--stack-storage-size", f"{stack_storage}: must be 1 to {_STACK_STORAGE_MAX}"
        )
    if folded == "-" and opts.output == "json":
        raise UserError("--folded", "'-' (stdout) cannot be combined with -o json")
    if svg == "-":
        raise UserError("--svg", "needs a file name")
    _check_output_file(folded, "--folded")
    _check_output_file(svg, "--svg")

    printer = Printer([], opts.output)
    config = {
        "include_idle": idle,
        "kernel_stacks": not user_only,
        "user_stacks": not kernel_only,
        "events_wakeup_bytes": 1,
    }  # wake for every new process: its mappings may go
    sizes = {"stacks": stack_storage, "counts": stack_storage}
    cpus = online_cpus()
    symbolizer = Symbolizer()
    with TraceSession("trace_profile", opts, config, sizes, attach=False) as session:
        prog = session.obj.program("profile_sample")
        for cpu in cpus:
            session.attach(lambda cpu=cpu: attach_cpu_sampler(prog, cpu, frequency))
        ring = session.ring("profile_process_event")
        seconds = session.run(ring, lambda batch: _remember_processes(batch, symbolizer))
        session.detach()  # no sample may land between the reads below
        stacks, totals = collect(session, symbolizer, kernel_stacks=not user_only)
        lost_process_events = ring.lost

    shown = stacks[:top] if top else stacks
    if printer.json:
        for stack in shown:
            printer.record(stack.record())
    elif folded != "-":
        sys.stdout.write("\n".join(s.text() for s in reversed(shown)))
    folded_stacks = flamegraph.fold((s.folded_frames(), s.samples) for s in stacks)
    if folded:
        lines = flamegraph.folded_lines(folded_stacks)
        _write(folded, "".join(f"{line}\n" for line in lines), "--folded")
    if svg:
        where = f"pid {pid}" if pid else f"comm {comm}" if comm else "all processes"
        subtitle = (
            f"{totals['samples']} samples at {frequency} Hz on {len(cpus)} CPUs "
            f"over {seconds:.1f} s, {where}"
        )
        _write(svg, flamegraph.render_svg(folded_stacks, "CPU profile", subtitle), "--svg")
    printer.flush()
    printer.summary(
        samples=totals["samples"],
        stacks=len(stacks),
        lost=totals["lost"],
        lost_process_events=lost_process_events,
        **{name: totals[name] for name in _ERROR_FIELDS},
        hz=frequency,
        cpus=len(cpus),
        seconds=round(seconds, 3),
    )


TOOL = Tool(
    name="profile",
    summary="on-CPU profiler: kernel + user stacks sampled at -F Hz; text, folded, SVG",
    requires=("perf_event", "helper_get_stackid"),
    command=command,
)
