"""What the tracing benchmarks share: C workloads that time themselves, started before the
tracer so it can filter on their pid, and the tracer's CPU and BPF run time."""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")

# Every workload includes this: it waits for a line on stdin (the tracer attaches to its
# pid meanwhile), runs `work()` and prints the wall and cpu (user+sys) ns of that part only.
WORKLOAD_MAIN_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>

static long long work(int argc, char **argv);

static long long cpu_ns(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000000LL +
           (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000LL;
}

static long long wall_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

int main(int argc, char **argv)
{
    char go[8];
    long long wall, cpu, result;

    if (!fgets(go, sizeof(go), stdin))
        return 1;
    cpu = cpu_ns();
    wall = wall_ns();
    result = work(argc, argv);
    wall = wall_ns() - wall;
    cpu = cpu_ns() - cpu;
    if (result < 0)
        return 2;
    printf("%lld %lld %lld\n", wall, cpu, result);
    return 0;
}
"""


def compile_workload(work: Path, name: str, source: str, *flags: str) -> Path:
    """gcc -O2 the workload's `work()` together with WORKLOAD_MAIN_C."""
    src = work / f"{name}.c"
    src.write_text(WORKLOAD_MAIN_C + source)
    binary = work / name
    subprocess.run(["gcc", "-O2", "-Wall", *flags, "-o", str(binary), str(src)], check=True)
    return binary


class Workload:
    """A workload process, started blocked so a tracer can attach to its pid first."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.pid = self.proc.pid

    def run(self, timeout: float = 600) -> tuple[int, int, int]:
        """Let it go; its own wall ns, cpu ns and result."""
        out, _ = self.proc.communicate("go\n", timeout=timeout)
        if self.proc.returncode != 0:
            raise SystemExit(f"workload failed with exit code {self.proc.returncode}")
        wall, cpu, result = map(int, out.split())
        return wall, cpu, result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def stop(proc: subprocess.Popen[str], signum: int, name: str) -> str:
    """Stop a tracer the way a person does (Ctrl-C / SIGTERM); its stderr."""
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"{name} exited with {proc.returncode}: {err}")
    return err


def kill(proc: subprocess.Popen[str] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def cpu_ticks(pid: int) -> int:
    """utime + stime of a live process, in clock ticks (1/TICK s)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def ticks_to_ns(ticks: int) -> int:
    return ticks * 1_000_000_000 // TICK


@contextlib.contextmanager
def bpf_run_time_stats() -> Iterator[None]:
    """The kernel's per-program run time accounting (BPF_ENABLE_STATS), on while we hold
    the fd: it adds two clock reads to every program run, so benchmarks turn it on only
    when asked."""
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    fd = lib.bpf_enable_stats(0)  # BPF_STATS_RUN_TIME
    if fd < 0:
        raise SystemExit(f"BPF_ENABLE_STATS failed: {os.strerror(-fd)}")
    try:
        yield
    finally:
        os.close(fd)


def bpf_run_time(owner: int) -> tuple[int, int]:
    """Summed run_time_ns and run_cnt of the BPF programs process `owner` holds fds of
    (each program fd's fdinfo shows them)."""
    seen: dict[int, tuple[int, int]] = {}
    for entry in Path(f"/proc/{owner}/fdinfo").iterdir():
        try:
            info = dict(
                line.split(":", 1) for line in entry.read_text().splitlines() if ":" in line
            )
        except OSError:
            continue  # closed meanwhile
        if "prog_id" in info and "run_time_ns" in info:
            seen[int(info["prog_id"])] = (int(info["run_time_ns"]), int(info["run_cnt"]))
    return sum(ns for ns, _ in seen.values()), sum(runs for _, runs in seen.values())
