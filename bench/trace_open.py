"""`membrane trace open` against a bpftrace opensnoop one-liner: what tracing every open
costs the traced program, and whether every event arrives.

The workload is a small C program (compiled here with gcc) that opens and closes files in
a tight loop and times its own loop. Each round runs it alone, under our tool and under
bpftrace (order rotated per round), both tracers filtered to the workload's pid and
writing one line per event into a file on the same filesystem. A round in which our tool
loses or misses any event fails (the exit status says so after the JSON).

The consumer's own rate (ring buffer to file) is measured apart: our tool is stopped
(SIGSTOP) while the workload fills its ring, then let go; its rate is the events over the
time until its output stopped growing, and over the CPU time it used for them. The
workload's time in that run is our kernel side alone (`membrane-stopped`).

The floor: `empty-programs` runs the workload with programs that only return on the same
two tracepoints (bpf/bench_trace_empty.bpf.c), what any tracer of these tracepoints pays
before it does anything.

    python -m bench.trace_open [--events 300000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
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
from membrane.bpf import BpfObject
from membrane.bpf.links import attach_auto
from membrane.testing.tracer import start_tracer

TARGET_COST_RATIO = 0.05  # ours <= 5 % of bpftrace's added cost per event
TARGET_CONSUMER_RATE = 1_500_000  # events/s from ring buffer to file, table and JSON
DRAIN_POLL_S = 0.002  # how often the drain measurement looks at the output's size
FILES = 1000  # distinct paths the workload cycles through
QUIET_S = 1.0  # a tracer is done when it has been idle this long (see wait_quiet)

# argv: N DIR: open and close DIR/f<i % FILES> N times.
OPEN_LOOP_C = r"""
#include <fcntl.h>
#include <unistd.h>

static long long work(int argc, char **argv)
{
    long n = atol(argv[1]);
    char path[4096];

    for (long i = 0; i < n; i++) {
        snprintf(path, sizeof(path), "%s/f%ld", argv[2], i % FILES);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return -1;
        close(fd);
    }
    return n;
}
"""

# opensnoop.bt's shape: stash the path pointer at entry, print at exit.
# BEGIN runs once every probe is attached ("Attaching N probes..." comes before that).
BPFTRACE_READY = "bpftrace ready"
BPFTRACE_SCRIPT = r"""
BEGIN { printf("%(ready)s\n"); }
tracepoint:syscalls:sys_enter_openat /pid == %(pid)s/ { @filename[tid] = args->filename; }
tracepoint:syscalls:sys_exit_openat /@filename[tid]/ {
  printf("%%-7d %%-16s %%4d %%s\n", pid, comm, args->ret, str(@filename[tid]));
  delete(@filename[tid]);
}
"""


@dataclass
class Run:
    """One workload run: its own timing, and what the tracer (if any) made of it."""

    wall_ns: int
    cpu_ns: int
    tracer_cpu_ns: int = 0
    delivered: int = 0
    lost: int = 0
    lag_s: float = 0.0  # from the workload's end until the tracer's last output
    bpf_ns: int = 0  # with --bpf-stats: run time of the tracer's BPF programs
    bpf_runs: int = 0


@dataclass
class Variant:
    name: str
    runs: list[Run] = field(default_factory=list)


def ensure_bpftrace() -> str:
    """bpftrace from Debian's archive: install it if missing (update the lists only if the
    plain install fails, as on a fresh machine)."""
    found = shutil.which("bpftrace")
    if found:
        return found
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "bpftrace"]
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(install, env=env, stdout=subprocess.DEVNULL, check=True)
    found = shutil.which("bpftrace")
    if not found:
        raise SystemExit("bpftrace is not installed and could not be installed")
    return found


def build_workload(work: Path) -> tuple[Path, Path]:
    binary = compile_workload(work, "open_loop", OPEN_LOOP_C, f"-DFILES={FILES}")
    files = work / "files"
    files.mkdir()
    for i in range(FILES):
        (files / f"f{i}").touch()
    return binary, files


def wait_quiet(out: Path, proc: subprocess.Popen[Any]) -> float:
    """Wait until the tracer has been idle for QUIET_S: its output did not grow and it
    used no CPU (a tracer starved on a busy machine is not done). Return when the output
    last grew (monotonic). Reading only sizes and counters keeps us off its CPU."""
    size, ticks = -1, -1
    last_growth = last_change = time.monotonic()
    while time.monotonic() - last_change < QUIET_S and proc.poll() is None:
        now_size, now_ticks = out.stat().st_size, cpu_ticks(proc.pid)
        if now_size != size:
            last_growth = time.monotonic()
        if (now_size, now_ticks) != (size, ticks):
            size, ticks, last_change = now_size, now_ticks, time.monotonic()
        time.sleep(0.05)
    return last_growth


@dataclass
class Drain:
    """One consumer measurement: a full ring emptied into a file."""

    delivered: int
    lost: int
    wall_s: float  # from SIGCONT until the output stopped growing
    cpu_ns: int  # the tracer's CPU time meanwhile
    workload: Run  # the workload's own times, with the consumer stopped

    @property
    def rate(self) -> float:
        return self.delivered / self.wall_s if self.wall_s else 0.0

    @property
    def cpu_rate(self) -> float:
        return self.delivered / (self.cpu_ns / 1e9) if self.cpu_ns else 0.0


def cpu_ns_precise(pid: int) -> int:
    """Run time of every thread of `pid` in ns (schedstat), where clock ticks are too
    coarse for a run of a few hundred milliseconds."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def wait_drained(out: Path, proc: subprocess.Popen[Any]) -> float:
    """When (monotonic) the output last grew, once it has not grown for QUIET_S. Only the
    size counts: an idle tracer still uses a little CPU for its polls."""
    size = -1
    last_growth = time.monotonic()
    while time.monotonic() - last_growth < QUIET_S and proc.poll() is None:
        now_size = out.stat().st_size
        if now_size != size:
            size, last_growth = now_size, time.monotonic()
        time.sleep(DRAIN_POLL_S)
    return last_growth


def drain_once(variant: str, binary: Path, files: Path, events: int, work: Path) -> Drain:
    """Our tool stopped while the workload fills its ring, then let go (see the module
    docstring)."""
    workload = Workload([str(binary), str(events), str(files)])
    out = work / f"{variant}-drain.out"
    tracer: subprocess.Popen[str] | None = None
    try:
        with open(out, "w") as sink:
            json_out = ["-o", "json"] if variant == "membrane-json" else []
            tracer = start_tracer("open", "--pid", str(workload.pid), *json_out, stdout=sink)
            tracer.send_signal(signal.SIGSTOP)
            wall_ns, workload_cpu_ns, _ = workload.run()
            cpu_before = cpu_ns_precise(tracer.pid)
            start = time.monotonic()
            tracer.send_signal(signal.SIGCONT)
            last = wait_drained(out, tracer)
            cpu_ns = cpu_ns_precise(tracer.pid) - cpu_before  # includes ~10 idle polls
            err = stop(tracer, signal.SIGTERM, variant)
        delivered, lost = count_output(variant, out, err, str(files))
        stopped = Run(wall_ns, workload_cpu_ns, delivered=delivered, lost=lost)
        return Drain(delivered, lost, round(last - start, 4), cpu_ns, stopped)
    finally:
        kill(tracer)
        workload.kill()
        out.unlink(missing_ok=True)


def run_once(
    variant: str,
    binary: Path,
    files: Path,
    events: int,
    work: Path,
    bpftrace: str,
    bpf_stats: bool = False,
) -> Run:
    workload = Workload([str(binary), str(events), str(files)])
    out = work / f"{variant}.out"
    tracer: subprocess.Popen[str] | None = None
    try:
        with open(out, "w") as sink:
            if variant == "alone":
                wall_ns, cpu_ns, _ = workload.run()
                return Run(wall_ns, cpu_ns)
            if variant == "empty-programs":
                return run_with_empty_programs(workload, events)
            if variant.startswith("membrane"):
                json_out = ["-o", "json"] if variant == "membrane-json" else []
                tracer = start_tracer("open", "--pid", str(workload.pid), *json_out, stdout=sink)
            else:
                script = BPFTRACE_SCRIPT % {"pid": workload.pid, "ready": BPFTRACE_READY}
                tracer = subprocess.Popen(
                    [bpftrace, "-e", script], stdout=sink, stderr=subprocess.PIPE, text=True
                )
                wait_attached_file(tracer, out)
            ticks = cpu_ticks(tracer.pid)
            bpf_before = bpf_run_time(tracer.pid) if bpf_stats else (0, 0)
            wall_ns, cpu_ns, _ = workload.run()
            run = Run(wall_ns, cpu_ns)
            workload_end = time.monotonic()
            last = wait_quiet(out, tracer)
            run.tracer_cpu_ns = ticks_to_ns(cpu_ticks(tracer.pid) - ticks)
            run.lag_s = round(max(last - workload_end, 0.0), 3)
            if bpf_stats:
                ns, runs = bpf_run_time(tracer.pid)
                run.bpf_ns, run.bpf_runs = ns - bpf_before[0], runs - bpf_before[1]
            # ours ends on SIGTERM like on Ctrl-C; bpftrace wants SIGINT
            err = stop(
                tracer, signal.SIGTERM if variant.startswith("membrane") else signal.SIGINT, variant
            )
        run.delivered, run.lost = count_output(variant, out, err, str(files))
        return run
    finally:
        kill(tracer)
        workload.kill()
        out.unlink(missing_ok=True)


def run_with_empty_programs(workload: Workload, events: int) -> Run:
    """The workload with programs that only return on our tracepoints (the floor)."""
    with BpfObject.open("bench_trace_empty") as obj:
        obj.load()
        links = [attach_auto(prog) for prog in obj.programs.values()]
        try:
            wall_ns, cpu_ns, _ = workload.run()
        finally:
            for link in links:
                link.close()
    return Run(wall_ns, cpu_ns, delivered=events)


def wait_attached_file(proc: subprocess.Popen[str], out: Path) -> None:
    """Wait for the script's BEGIN line in bpftrace's output."""
    while BPFTRACE_READY.encode() not in out.read_bytes():
        if proc.poll() is not None:
            assert proc.stderr is not None
            raise SystemExit(f"bpftrace did not start: {proc.stderr.read()}")
        time.sleep(0.02)


def count_output(variant: str, out: Path, err: str, files: str) -> tuple[int, int]:
    """Events delivered (output lines for the workload's files) and events the tracer
    says it lost."""
    text = out.read_text()
    if variant == "membrane-json":
        delivered = text.count(f'"path": "{files}/f')
        summary = re.search(r'"lost": (\d+)', text)
    else:
        delivered = text.count(f" {files}/f")
        summary = re.search(r"lost: (\d+)", err)
    if variant == "bpftrace":
        lost = sum(int(n) for n in re.findall(r"Lost (\d+) events", text + err))
    else:
        if summary is None:
            raise SystemExit(f"{variant}: no summary with lost events in its output")
        lost = int(summary.group(1))
    return delivered, lost


def summarize(variants: dict[str, Variant], events: int) -> dict[str, Any]:
    alone = variants["alone"].runs
    result: dict[str, Any] = {}
    for name, v in variants.items():
        r: dict[str, Any] = {
            "workload_wall_s": round(median([x.wall_ns for x in v.runs]) / 1e9, 3),
            "workload_cpu_s": round(median([x.cpu_ns for x in v.runs]) / 1e9, 3),
            "rounds_wall_s": [round(x.wall_ns / 1e9, 3) for x in v.runs],
        }
        if name != "alone" and v.runs:
            # per round against the workload alone in the same round, then the median
            r["added_ns_per_event"] = round(
                median(
                    [(x.wall_ns - a.wall_ns) / events for x, a in zip(v.runs, alone, strict=True)]
                )
            )
            r["added_workload_cpu_ns_per_event"] = round(
                median([(x.cpu_ns - a.cpu_ns) / events for x, a in zip(v.runs, alone, strict=True)])
            )
            r["tracer_cpu_ns_per_event"] = round(median([x.tracer_cpu_ns / events for x in v.runs]))
            r["delivered"] = [x.delivered for x in v.runs]
            r["lost_reported"] = [x.lost for x in v.runs]
            r["missing"] = [events - x.delivered for x in v.runs]
            r["lag_s"] = [x.lag_s for x in v.runs]
            if any(x.bpf_runs for x in v.runs):
                r["bpf_ns_per_event"] = round(median([x.bpf_ns / events for x in v.runs]))
                r["bpf_ns_per_run"] = round(median([x.bpf_ns / max(x.bpf_runs, 1) for x in v.runs]))
        result[name] = r
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=300_000, help="open+close pairs per run")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (each runs every variant)")
    parser.add_argument(
        "--variants",
        default="alone,empty-programs,membrane,membrane-json,bpftrace",
        help="comma list of alone, empty-programs, membrane, membrane-json, bpftrace",
    )
    parser.add_argument(
        "--no-drain",
        action="store_true",
        help="skip the consumer measurement (ring buffer to file)",
    )
    parser.add_argument(
        "--bpf-stats",
        action="store_true",
        help="also measure the tracers' BPF program run time (kernel stats; "
        "adds two clock reads per program run to both tracers)",
    )
    args = parser.parse_args()
    if args.events < 300_000:
        parser.error("--events must be at least 300,000 (shorter runs measure startup noise)")
    chosen = args.variants.split(",")
    known = ("alone", "empty-programs", "membrane", "membrane-json", "bpftrace")
    if unknown := [v for v in chosen if v not in known]:
        parser.error(f"--variants: unknown {', '.join(unknown)} (have: {', '.join(known)})")
    if "alone" not in chosen:
        parser.error("--variants must include alone (the baseline)")
    exit_on_sigterm()
    host = machine()
    bpftrace = ensure_bpftrace()
    bpftrace_version = subprocess.run(
        [bpftrace, "--version"], capture_output=True, text=True
    ).stdout.strip()
    variants = {name: Variant(name) for name in chosen}
    drains: dict[str, list[Drain]] = {
        name: [] for name in chosen if name.startswith("membrane") and not args.no_drain
    }
    failed_rounds: list[str] = []
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mbench-open-")))
        if args.bpf_stats:
            stack.enter_context(bpf_run_time_stats())
        binary, files = build_workload(work)
        run_once("alone", binary, files, 20_000, work, bpftrace)  # warm the dentry cache
        for i in range(args.rounds):
            order = chosen[i % len(chosen) :] + chosen[: i % len(chosen)]
            for name in order:
                run = run_once(name, binary, files, args.events, work, bpftrace, args.bpf_stats)
                variants[name].runs.append(run)
                print(f"round {i + 1} {name}: {run}", file=sys.stderr)
                if name.startswith("membrane") and (run.lost or run.delivered != args.events):
                    failed_rounds.append(
                        f"round {i + 1} {name}: lost {run.lost}, "
                        f"delivered {run.delivered} of {args.events}"
                    )
                    print(f"FAILED {failed_rounds[-1]}", file=sys.stderr)
            for name, done in drains.items():
                done.append(drain_once(name, binary, files, args.events, work))
                print(f"round {i + 1} {name} drain: {done[-1]}", file=sys.stderr)
    host["loadavg_1m_at_end"] = os.getloadavg()[0]
    if "membrane" in drains:  # our kernel side: the workload while our consumer is stopped
        variants["membrane-stopped"] = Variant(
            "membrane-stopped", [d.workload for d in drains["membrane"]]
        )
    results = summarize(variants, args.events)
    targets = []
    if "membrane" in results and "bpftrace" in results:
        ours, theirs = variants["membrane"].runs, variants["bpftrace"].runs
        alone = variants["alone"].runs
        ratio = round(
            median(
                [
                    (o.wall_ns - a.wall_ns) / (t.wall_ns - a.wall_ns)
                    for o, t, a in zip(ours, theirs, alone, strict=True)
                ]
            ),
            3,
        )
        results["membrane"]["ratio_to_bpftrace"] = ratio

        def ratio_of(name: str, cpu: bool) -> float:
            def added(run: Run, base: Run) -> int:
                if cpu:  # the workload's added cpu + the tracer's own (0 for these)
                    return run.cpu_ns - base.cpu_ns + run.tracer_cpu_ns
                return run.wall_ns - base.wall_ns

            runs = variants[name].runs
            return round(
                median(
                    [added(o, a) / added(t, a) for o, t, a in zip(runs, theirs, alone, strict=True)]
                ),
                3,
            )

        # What is not ours to save: programs that only return on the same tracepoints
        # cost this share of bpftrace's added time already; and our kernel side alone.
        for name in ("empty-programs", "membrane-stopped"):
            if name in variants and len(variants[name].runs) == len(theirs):
                results[name]["ratio_to_bpftrace"] = ratio_of(name, cpu=False)
                results[name]["cpu_ratio_to_bpftrace"] = ratio_of(name, cpu=True)
        # the same from cpu time alone (the workload's added cpu + the tracer's): what the
        # machine pays, whatever the scheduler did with the wall time
        results["membrane"]["cpu_ratio_to_bpftrace"] = round(
            median(
                [
                    (o.cpu_ns - a.cpu_ns + o.tracer_cpu_ns)
                    / (t.cpu_ns - a.cpu_ns + t.tracer_cpu_ns)
                    for o, t, a in zip(ours, theirs, alone, strict=True)
                ]
            ),
            3,
        )
        targets = [
            {
                "name": f"{name}: zero lost events in every round",
                "value": max(results[name]["missing"] + results[name]["lost_reported"]),
                "limit": 0,
                "met": max(results[name]["missing"] + results[name]["lost_reported"]) == 0,
            }
            for name in ("membrane", "membrane-json")
            if name in results
        ]
        targets += [
            {
                "name": f"added cost per event <= {TARGET_COST_RATIO:.0%} of bpftrace's",
                "value": ratio,
                "limit": TARGET_COST_RATIO,
                # Below 0 the workload ran faster traced than alone: the machine's noise
                # was larger than the cost, and the round measured nothing.
                "met": 0 <= ratio <= TARGET_COST_RATIO,
                **({"note": "negative: noise larger than the cost"} if ratio < 0 else {}),
            },
        ]
    out = {
        "bench": "trace_open",
        "machine": host,
        "method": {
            "events": args.events,
            "rounds": args.rounds,
            "workload": f"C loop: open(O_RDONLY|O_CLOEXEC)+close over {FILES} files, timed "
            "by itself (CLOCK_MONOTONIC; cpu = its own user+sys)",
            "filter": "both tracers: the workload's pid",
            "sink": "a file in the same temporary directory for both",
            "bpftrace": bpftrace_version,
            "bpftrace_script": (BPFTRACE_SCRIPT % {"pid": "PID", "ready": BPFTRACE_READY}).strip(),
            "added_ns_per_event": "median over rounds of (workload wall under the tracer - "
            "alone, same round) / events",
            "tracer_cpu_ns_per_event": "the tracer process's utime+stime from the start of "
            "the workload until its output stopped growing, / events",
            "delivered": "output lines naming the workload's files",
            "empty-programs": "the floor: programs that only return on sys_enter_openat and "
            "sys_exit_openat (bpf/bench_trace_empty.bpf.c), loaded by the benchmark",
            "membrane-stopped": "our kernel side alone: the workload's times in the consumer "
            "measurement, while our tool is stopped (its ring holds every record)",
            "lag_s": "from the workload's end until the tracer's output stopped growing",
            "ratio_to_bpftrace": "median over rounds of ours/bpftrace added wall per event",
            "cpu_ratio_to_bpftrace": "median over rounds of ours/bpftrace (added workload cpu "
            "+ tracer cpu)",
            "bpf_stats": args.bpf_stats,
            "bpf_ns_per_event": "with --bpf-stats: run time of the tracer's programs (all "
            "their runs, also for other processes' opens) / events",
            "floor": "ratio to bpftrace's added cost per event (median over rounds; wall, and "
            "cpu as in cpu_ratio_to_bpftrace) of the empty programs (what no tracer of these "
            "tracepoints can go below) and of our kernel side alone",
            "consumer": "ours stopped (SIGSTOP) while the workload fills its ring, then let "
            "go: events delivered / seconds from SIGCONT until the output stopped growing "
            f"(sampled every {DRAIN_POLL_S * 1000:g} ms), and / the tracer's CPU seconds "
            "meanwhile (schedstat); median over rounds",
        },
        "variants": results,
        "consumer": {
            name: {
                "events_per_s": round(median([d.rate for d in done])),
                "events_per_cpu_s": round(median([d.cpu_rate for d in done])),
                "rounds_events_per_s": [round(d.rate) for d in done],
                "delivered": [d.delivered for d in done],
                "lost_reported": [d.lost for d in done],
            }
            for name, done in drains.items()
        },
        "floor": {
            f"{name} {view}": results[name].get(key)
            for name in ("empty-programs", "membrane-stopped")
            if name in results
            for view, key in (("wall", "ratio_to_bpftrace"), ("cpu", "cpu_ratio_to_bpftrace"))
        },
        "failed_rounds": failed_rounds,
        "targets": targets,
    }
    for name, done in drains.items():
        rate = median([d.rate for d in done])
        out["targets"].append(
            {
                "name": f"{name}: consumer >= {TARGET_CONSUMER_RATE:,} events/s ring -> file",
                "value": round(rate),
                "limit": TARGET_CONSUMER_RATE,
                "met": rate >= TARGET_CONSUMER_RATE,
            }
        )
    summary = [
        f"{'variant':14} {'wall s':>7} {'added ns/ev':>11} {'+cpu ns/ev':>10} "
        f"{'tracer cpu ns/ev':>16} {'missing':>7} {'lost':>6} {'lag s':>6}"
    ]
    for name, r in results.items():
        if name == "alone" or "tracer_cpu_ns_per_event" not in r:
            summary.append(f"{name:14} {r['workload_wall_s']:7.3f}")
            continue
        if name in ("empty-programs", "membrane-stopped"):
            share, cpu_share = r.get("ratio_to_bpftrace"), r.get("cpu_ratio_to_bpftrace")
            summary.append(
                f"{name:14} {r['workload_wall_s']:7.3f} {r['added_ns_per_event']:11} "
                f"{r['added_workload_cpu_ns_per_event']:10}"
                + (f"  ({share} of bpftrace's, cpu {cpu_share})" if share is not None else "")
            )
            continue
        summary.append(
            f"{name:14} {r['workload_wall_s']:7.3f} {r['added_ns_per_event']:11} "
            f"{r['added_workload_cpu_ns_per_event']:10} {r['tracer_cpu_ns_per_event']:16} "
            f"{max(r['missing']):7} {max(r['lost_reported']):6} {max(r['lag_s']):6.2f}"
        )
    summary.append("(missing, lost: worst round; +cpu: the workload's own added cpu time)")
    for name, c in out["consumer"].items():
        summary.append(
            f"consumer {name}: {c['events_per_s']:,} events/s, {c['events_per_cpu_s']:,} per cpu s"
        )
    for t in out["targets"]:
        verdict = ("met" if t["met"] else "MISSED") + (f" ({t['note']})" if "note" in t else "")
        summary.append(f"target: {t['name']}: {t['value']} -> {verdict}")
    summary += [f"FAILED {f}" for f in failed_rounds]
    emit(out, summary)
    if failed_rounds:
        sys.exit(1)


if __name__ == "__main__":
    main()
