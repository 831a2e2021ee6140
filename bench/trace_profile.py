"""`membrane trace profile -F 99`: how much a CPU-bound program slows down while it is
being profiled.

The workload is a small C program (compiled here with gcc, with frame pointers so user
stacks can be walked) that does a fixed amount of arithmetic in a few nested functions
and times itself. Each round runs it alone, under the profiler filtered to its pid, and
under the profiler sampling the whole machine (order rotated per round).

With --churn N, N short processes per second start beside the workload in every variant
(Python, ls and shell runs, as others' test suites start them): a profiler of the whole
machine has to read each one that it samples, so this is its cost on a busy machine,
made the same for every round instead of left to whoever else uses it.

    python -m bench.trace_profile [--seconds 3] [--rounds 7] [--frequency 99] [--churn 20]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import emit, exit_on_sigterm, machine, median
from bench._trace import (
    Workload,
    bpf_run_time,
    bpf_run_time_stats,
    compile_workload,
    cpu_ticks,
    kill,
    stop,
    ticks_to_ns,
)
from membrane.testing.tracer import start_tracer

TARGET_SLOWDOWN = 0.02  # < 2 % slower under the profiler
VARIANTS = ("alone", "profile-pid", "profile-all")

# argv: N: N rounds of integer mixing spread over three nested calls, so every sample has
# a real user stack to walk. The result is printed so the compiler cannot drop the work.
BUSY_LOOP_C = r"""
__attribute__((noinline)) static unsigned long mix(unsigned long x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdUL;
    x ^= x >> 33;
    return x;
}

__attribute__((noinline)) static unsigned long inner(unsigned long x, long n)
{
    for (long i = 0; i < n; i++)
        x = mix(x + i);
    return x;
}

__attribute__((noinline)) static unsigned long outer(long n)
{
    unsigned long x = 1;
    for (long i = 0; i < n / 1000; i++)
        x = inner(x, 1000);
    return x;
}

static long long work(int argc, char **argv)
{
    return (long long)(outer(atol(argv[1])) & 0x7fffffff);
}
"""


# What --churn starts, in turn: each a few ms to tens of ms of CPU in a fresh process.
CHURN_COMMANDS = (
    [sys.executable, "-S", "-c", "sum(range(200000))"],
    ["ls", "-l", "/usr/bin"],
    ["sh", "-c", "i=0; while [ $i -lt 3000 ]; do i=$((i + 1)); done"],
)


@contextlib.contextmanager
def process_churn(rate: float) -> Iterator[None]:
    """CHURN_COMMANDS started at `rate` per second (without waiting for each to end) for
    as long as the block runs."""
    if not rate:
        yield
        return
    stop = threading.Event()

    def start_them() -> None:
        running: list[subprocess.Popen[bytes]] = []
        due = time.monotonic()
        for i in itertools.count():
            if stop.is_set():
                break
            running = [p for p in running if p.poll() is None]
            running.append(
                subprocess.Popen(
                    CHURN_COMMANDS[i % len(CHURN_COMMANDS)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            due += 1 / rate
            stop.wait(max(due - time.monotonic(), 0))
        for p in running:
            p.wait()

    thread = threading.Thread(target=start_them, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@dataclass
class Run:
    wall_ns: int
    cpu_ns: int
    profiler_cpu_ns: int = 0  # while the workload ran
    report_s: float = 0.0  # from the stop signal until the profile was written
    workload_samples: int = 0  # samples the profile attributes to the workload
    samples: int = 0  # all samples in the profile
    lost: int = 0
    stacks_missing: int = 0  # samples whose kernel or user stack the profiler could not keep
    stack_collisions: int = 0  # stacks told apart from another with the same hash
    bpf_ns: int = 0  # with --bpf-stats: run time of the sampling program
    bpf_runs: int = 0


@dataclass
class Variant:
    name: str
    runs: list[Run] = field(default_factory=list)


def calibrate(binary: Path, seconds: float) -> int:
    """Iterations that take the workload about `seconds` alone."""
    trial = 20_000_000
    wall_ns, _, _ = Workload([str(binary), str(trial)]).run()
    return max(int(trial * seconds * 1e9 / wall_ns) // 1000 * 1000, 1000)


_MISSING = ("kernel_stack_eexist", "kernel_stack_other", "user_stack_eexist", "user_stack_other")


def run_once(
    variant: str,
    binary: Path,
    iterations: int,
    frequency: int,
    work: Path,
    bpf_stats: bool,
    churn: float,
) -> Run:
    workload = Workload([str(binary), str(iterations)])
    out = work / f"{variant}.json"
    profiler: subprocess.Popen[str] | None = None
    try:
        with open(out, "w") as sink:
            if variant == "alone":
                with process_churn(churn):
                    wall_ns, cpu_ns, _ = workload.run()
                return Run(wall_ns, cpu_ns)
            only = ["--pid", str(workload.pid)] if variant == "profile-pid" else []
            profiler = start_tracer(
                "profile", "-F", str(frequency), "-o", "json", *only, stdout=sink
            )
            ticks = cpu_ticks(profiler.pid)
            bpf_before = bpf_run_time(profiler.pid) if bpf_stats else (0, 0)
            with process_churn(churn):
                wall_ns, cpu_ns, _ = workload.run()
            run = Run(wall_ns, cpu_ns)
            run.profiler_cpu_ns = ticks_to_ns(cpu_ticks(profiler.pid) - ticks)
            if bpf_stats:
                ns, runs = bpf_run_time(profiler.pid)
                run.bpf_ns, run.bpf_runs = ns - bpf_before[0], runs - bpf_before[1]
            stopped = time.monotonic()
            stop(profiler, signal.SIGTERM, variant)
            run.report_s = round(time.monotonic() - stopped, 3)
        records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
        summary = next(r["summary"] for r in records if "summary" in r)
        run.workload_samples = sum(r["samples"] for r in records if r.get("pid") == workload.pid)
        run.samples, run.lost = summary["samples"], summary["lost"]
        run.stacks_missing = sum(summary[name] for name in _MISSING)
        run.stack_collisions = summary.get("stack_collisions", 0)  # (older builds: none)
        return run
    finally:
        kill(profiler)
        workload.kill()
        out.unlink(missing_ok=True)


def spread(values: list[int]) -> float:
    return round((max(values) - min(values)) / median(values), 4)


def summarize(variants: dict[str, Variant], frequency: int) -> dict[str, Any]:
    alone = variants["alone"].runs
    result: dict[str, Any] = {}
    for name, v in variants.items():
        r: dict[str, Any] = {
            "workload_wall_s": round(median([x.wall_ns for x in v.runs]) / 1e9, 4),
            "workload_cpu_s": round(median([x.cpu_ns for x in v.runs]) / 1e9, 4),
            "rounds_wall_s": [round(x.wall_ns / 1e9, 4) for x in v.runs],
        }
        if name == "alone":
            # how far apart runs of the same thing land: the resolution of this machine
            r["spread_of_rounds"] = spread([x.wall_ns for x in v.runs])
            r["cpu_spread_of_rounds"] = spread([x.cpu_ns for x in v.runs])
        else:
            pairs = list(zip(v.runs, alone, strict=True))
            r["slowdown"] = round(median([x.wall_ns / a.wall_ns - 1 for x, a in pairs]), 4)
            r["cpu_slowdown"] = round(median([x.cpu_ns / a.cpu_ns - 1 for x, a in pairs]), 4)
            r["rounds_slowdown"] = [round(x.wall_ns / a.wall_ns - 1, 4) for x, a in pairs]
            r["profiler_cpu_share"] = round(
                median([x.profiler_cpu_ns / x.wall_ns for x in v.runs]),
                4,
            )
            r["report_s"] = median([x.report_s for x in v.runs])
            # a profiler that samples nothing costs nothing: show it saw the workload
            r["workload_samples"] = [x.workload_samples for x in v.runs]
            r["expected_samples"] = [round(frequency * x.cpu_ns / 1e9) for x in v.runs]
            r["samples"] = [x.samples for x in v.runs]
            r["lost"] = [x.lost for x in v.runs]
            r["stacks_missing"] = [x.stacks_missing for x in v.runs]
            r["stack_collisions"] = [x.stack_collisions for x in v.runs]
            if any(x.bpf_runs for x in v.runs):
                r["bpf_ns_per_sample"] = round(
                    median([x.bpf_ns / max(x.bpf_runs, 1) for x in v.runs])
                )
        result[name] = r
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds",
        type=float,
        default=3.0,
        help="the workload's length alone (calibrated at start)",
    )
    parser.add_argument("--rounds", type=int, default=7, help="rounds (each runs every variant)")
    parser.add_argument("--frequency", type=int, default=99, help="samples per second per CPU")
    parser.add_argument(
        "--churn",
        type=float,
        default=0,
        help="short processes started per second beside the workload, in every variant",
    )
    parser.add_argument(
        "--bpf-stats",
        action="store_true",
        help="also measure the sampling program's run time (kernel stats; "
        "adds two clock reads per sample)",
    )
    args = parser.parse_args()
    if args.seconds < 1:
        parser.error("--seconds must be at least 1 (a few samples say nothing)")
    exit_on_sigterm()
    host = machine()
    variants = {name: Variant(name) for name in VARIANTS}
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mbench-prof-")))
        if args.bpf_stats:
            stack.enter_context(bpf_run_time_stats())
        binary = compile_workload(work, "busy_loop", BUSY_LOOP_C, "-fno-omit-frame-pointer")
        iterations = calibrate(binary, args.seconds)
        for i in range(args.rounds):
            order = VARIANTS[i % len(VARIANTS) :] + VARIANTS[: i % len(VARIANTS)]
            for name in order:
                variants[name].runs.append(
                    run_once(
                        name, binary, iterations, args.frequency, work, args.bpf_stats, args.churn
                    )
                )
                print(f"round {i + 1} {name}: {variants[name].runs[-1]}", file=sys.stderr)
    host["loadavg_1m_at_end"] = os.getloadavg()[0]
    results = summarize(variants, args.frequency)
    # Judged on the workload's CPU time: the kernel charges the sampling interrupt (and
    # the BPF program in it) to the task it interrupts (tick accounting, no
    # IRQ_TIME_ACCOUNTING here), while its wall time on this shared 2-CPU VM moves with
    # other people's load far more than 2 % (spread_of_rounds). Wall is reported beside.
    targets = [
        {
            "name": f"{name}: workload cpu time slowdown < {TARGET_SLOWDOWN:.0%}",
            "value": results[name]["cpu_slowdown"],
            "limit": TARGET_SLOWDOWN,
            "met": results[name]["cpu_slowdown"] < TARGET_SLOWDOWN,
            "wall_slowdown": results[name]["slowdown"],
        }
        for name in VARIANTS[1:]
    ]
    out = {
        "bench": "trace_profile",
        "machine": host,
        "method": {
            "rounds": args.rounds,
            "seconds": args.seconds,
            "frequency_hz": args.frequency,
            "churn_per_s": args.churn,
            "iterations": iterations,
            "workload": "C busy loop (integer mixing in three nested noinline functions, "
            "-O2 -fno-omit-frame-pointer), a fixed number of iterations, timed by itself "
            "(CLOCK_MONOTONIC; cpu = its own user+sys)",
            "profile-pid": f"membrane trace profile -F {args.frequency} -o json --pid PID",
            "profile-all": f"membrane trace profile -F {args.frequency} -o json (every "
            "process on every CPU)",
            "slowdown": "median over rounds of (wall under the profiler / wall alone in the "
            "same round) - 1",
            "cpu_slowdown": "the same with the workload's own cpu time (user+sys, which "
            "includes the sampling interrupts that hit it); the targets use this",
            "spread_of_rounds": "(max - min) / median of the workload's wall alone: "
            "differences below this are noise on this machine (cpu_spread_of_rounds: of its "
            "cpu time)",
            "profiler_cpu_share": "the profiler process's utime+stime while the workload ran "
            "/ the workload's wall time (in-kernel sampling is charged to the sampled task)",
            "report_s": "from SIGTERM until the profiler exited (symbolization and output)",
            "stacks_missing": "samples whose kernel or user stack was not kept (a full or "
            "clashing stack store: *_stack_eexist + *_stack_other), per round",
            "stack_collisions": "stacks stored apart from another with the same hash, per round",
            "bpf_stats": args.bpf_stats,
        },
        "variants": results,
        "targets": targets,
    }
    summary = [
        f"{'variant':12} {'wall s':>7} {'slowdown':>9} {'cpu slowdown':>12} "
        f"{'samples (workload/expected)':>28} {'report s':>8}"
    ]
    for name, r in results.items():
        if name == "alone":
            summary.append(
                f"{name:12} {r['workload_wall_s']:7.3f} (rounds spread {r['spread_of_rounds']:.1%})"
            )
            continue
        samples = f"{median(r['workload_samples']):g}/{median(r['expected_samples']):g}"
        summary.append(
            f"{name:12} {r['workload_wall_s']:7.3f} {r['slowdown']:9.2%} "
            f"{r['cpu_slowdown']:12.2%} {samples:>28} {r['report_s']:8.2f}"
        )
    for t in targets:
        summary.append(
            f"target: {t['name']}: {t['value']:.2%} -> {'met' if t['met'] else 'MISSED'}"
        )
    emit(out, summary)


if __name__ == "__main__":
    main()
