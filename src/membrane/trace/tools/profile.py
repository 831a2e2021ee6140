"""`membrane trace profile`: on-CPU profiler, like bcc's profile. Samples every CPU at a fixed
frequency and counts kernel + user stacks in the kernel; prints the stacks at the end, and
can write folded stacks and an SVG flame graph."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from pathlib import Path

import numpy as np
import typer

from membrane.abi import PROFILE_PROBE_BITS
from membrane.bpf.links import attach_auto, attach_cpu_sampler
from membrane.errors import UserError
from membrane.trace import flamegraph
from membrane.trace.options import COMM, DURATION, OUTPUT, PID, UID, TraceOptions
from membrane.trace.output import Printer
from membrane.trace.profile_stacks import TOTALS, collect
from membrane.trace.session import TraceSession
from membrane.trace.symbols import Symbolizer
from membrane.trace.tools import Tool

_MAX_SAMPLE_RATE = "/proc/sys/kernel/perf_event_max_sample_rate"
_STACK_STORAGE_MAX = 1 << 20  # each stack slot costs ~1 KiB of kernel memory
_HASH_BITS = 64 - PROFILE_PROBE_BITS - 1  # what an id keeps of a stack's hash


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


def _raise_open_files_limit() -> None:
    """The symbolizer keeps each mapped file open until the end (a process may be gone by
    then): allow as many files as the hard limit does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


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


def _remember_processes(batch: np.ndarray, symbolizer: Symbolizer) -> None:
    """Read the mappings of newly sampled processes now, while they still run."""
    images = batch["image"]
    for pid, exec_id in zip(images["pid"].tolist(), images["exec_id"].tolist(), strict=True):
        symbolizer.snapshot(pid, exec_id)


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
        help="Distinct stacks the kernel can keep (1 KiB each); raise it when stacks "
        "go missing with E2BIG (counted in the summary's *_stack_other).",
    ),
    stack_hash_bits: int = typer.Option(
        0,
        "--stack-hash-bits",
        hidden=True,
        help="For tests: keep only N bits of each stack's hash, so that distinct stacks "
        "collide (0: all of them).",
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
    if not 0 <= stack_hash_bits <= _HASH_BITS:
        raise UserError("--stack-hash-bits", f"{stack_hash_bits}: must be 0 to {_HASH_BITS}")
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
    if stack_hash_bits:
        config["stack_hash_mask"] = (1 << stack_hash_bits) - 1
    sizes = {"stacks": stack_storage, "counts": stack_storage}
    cpus = online_cpus()
    _raise_open_files_limit()
    with (
        Symbolizer() as symbolizer,
        TraceSession("trace_profile", opts, config, sizes, attach=False) as session,
    ):
        prog = session.obj.program("profile_sample")
        for cpu in cpus:
            session.attach(lambda cpu=cpu: attach_cpu_sampler(prog, cpu, frequency))
        if not kernel_only:  # user stacks: mappings change (libraries loaded)
            session.attach(lambda: attach_auto(session.obj.program("profile_mmap")))
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
        **{name: totals[name] for name in TOTALS[2:]},
        hz=frequency,
        cpus=len(cpus),
        seconds=round(seconds, 3),
    )


TOOL = Tool(
    name="profile",
    summary="on-CPU profiler: kernel + user stacks sampled at -F Hz; text, folded, SVG",
    requires=("perf_event", "helper_get_stack"),
    command=command,
)
