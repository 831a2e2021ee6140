"""`membrane trace profile` attributes a busy loop's samples to its function, and its text,
JSON, folded and SVG outputs agree with the kernel's sample count."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from trace_support import run_trace, stop_tracer

from membrane.testing.cli import user_error
from membrane.testing.tracer import start_tracer, stop_tracer_text
from membrane.trace.tools.profile import max_sample_rate

pytestmark = pytest.mark.root
STACK_FIELDS = {
    "pid",
    "comm",
    "samples",
    "kernel_stack",
    "user_stack",
    "kernel_stack_error",
    "user_stack_error",
}
SUMMARY_FIELDS = {
    "samples",
    "stacks",
    "lost",
    "lost_process_events",
    "kernel_stack_eexist",
    "kernel_stack_efault",
    "kernel_stack_other",
    "user_stack_eexist",
    "user_stack_efault",
    "user_stack_other",
    "hz",
    "cpus",
    "seconds",
}
BUSY_MS = 700

# Starts on a line from stdin (so the profiler is attached first), spins in
# membrane_busy_loop for argv[1] ms, says "done", and with argv[2] == "stay" lives on until
# its stdin closes, so the test decides when it goes.
WORKLOAD = r"""
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

static volatile sig_atomic_t stop;
volatile unsigned long sink;

static void on_alarm(int sig) { (void)sig; stop = 1; }

void membrane_busy_loop(void)
{
	while (!stop)
		sink++;
}

int main(int argc, char **argv)
{
	char line[16];
	long ms = atol(argv[1]);
	struct itimerval timer = { .it_value = { ms / 1000, (ms % 1000) * 1000 } };

	if (!fgets(line, sizeof(line), stdin))
		return 1;
	signal(SIGALRM, on_alarm);
	setitimer(ITIMER_REAL, &timer, NULL);
	membrane_busy_loop();
	puts("done");
	fflush(stdout);
	if (argc > 2 && !strcmp(argv[2], "stay"))
		while (fgets(line, sizeof(line), stdin))
			;
	return 0;
}
"""


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workload, compiled with frame pointers under a unique name (its comm)."""
    tmp = tmp_path_factory.mktemp("profile")
    (tmp / "busy.c").write_text(WORKLOAD)
    binary = tmp / f"mbp-{secrets.token_hex(4)}"
    subprocess.run(
        ["clang", "-O0", "-fno-omit-frame-pointer", "-o", str(binary), str(tmp / "busy.c")],
        check=True,
    )
    return binary


class Workload:
    def __init__(self, binary: Path, stay: bool) -> None:
        self.proc = subprocess.Popen(
            [str(binary), str(BUSY_MS), "stay" if stay else "exit"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid

    def run(self) -> None:
        """Spin now; returns when the busy loop has ended."""
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "done\n"

    def cpu_seconds(self) -> float:
        """User + system CPU time so far (/proc/PID/stat), to compare the samples with."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def workloads(busy: Path) -> Iterator[list[Workload]]:
    """Start workloads with `workloads.append(Workload(busy, stay))`; all end afterwards."""
    started: list[Workload] = []
    yield started
    for w in started:
        w.end()


def test_busy_loop_samples_land_in_its_function(
    busy: Path, workloads: list[Workload], tmp_path: Path
) -> None:
    folded_path, svg_path = tmp_path / "cpu.folded", tmp_path / "cpu.svg"
    profiler = start_tracer(
        "profile",
        "--comm",
        busy.name,
        "-F",
        "99",
        "-o",
        "json",
        "--folded",
        str(folded_path),
        "--svg",
        str(svg_path),
    )
    try:
        workloads.append(w := Workload(busy, stay=True))
        w.run()
        cpu = w.cpu_seconds()
    finally:
        stacks, summary = stop_tracer(profiler)

    assert set(summary) == SUMMARY_FIELDS and all(set(s) == STACK_FIELDS for s in stacks)
    assert summary["lost"] == summary["lost_process_events"] == 0 and summary["hz"] == 99
    assert summary["user_stack_eexist"] == summary["kernel_stack_eexist"] == 0
    # cpu-clock sampling: 99 samples per second of CPU the process had (clock ticks are
    # 10 ms, and the kernel tunes the period to the frequency as it goes)
    assert summary["samples"] >= 10
    assert abs(summary["samples"] - 99 * cpu) <= 0.2 * 99 * cpu + 5, (summary, cpu)
    assert sum(s["samples"] for s in stacks) == summary["samples"]
    assert {(s["pid"], s["comm"]) for s in stacks} == {(w.pid, busy.name)}  # the filter

    in_loop = sum(
        s["samples"] for s in stacks if s["user_stack"][:2] == ["membrane_busy_loop", "main"]
    )
    assert in_loop >= 0.9 * summary["samples"], stacks

    folded = {}
    for line in folded_path.read_text().splitlines():
        path, count = line.rsplit(" ", 1)
        folded[path] = int(count)
    assert sum(folded.values()) == summary["samples"]
    assert all(path.startswith(busy.name + ";") for path in folded)
    assert sum(c for p, c in folded.items() if ";main;membrane_busy_loop" in p) == in_loop

    svg = ET.parse(svg_path).getroot()  # well-formed
    titles = [t.text or "" for t in svg.iter("{http://www.w3.org/2000/svg}title")]
    assert f"all ({summary['samples']} samples, 100.00%)" in titles
    assert any(t.startswith(f"membrane_busy_loop ({in_loop} samples") for t in titles)


def test_pid_filter_keeps_other_processes_out(busy: Path, workloads: list[Workload]) -> None:
    workloads.append(ours := Workload(busy, stay=True))
    workloads.append(other := Workload(busy, stay=True))  # same binary, same comm
    profiler = start_tracer("profile", "--pid", str(ours.pid), "-F", "99", "-U", "-o", "json")
    try:
        other.run()
        ours.run()
    finally:
        stacks, summary = stop_tracer(profiler)
    assert stacks and {s["pid"] for s in stacks} == {ours.pid}
    assert all(s["kernel_stack"] == [] for s in stacks)  # -U: no kernel frames
    assert sum(s["samples"] for s in stacks) == summary["samples"] >= 10


def test_text_output_of_a_process_that_already_exited(
    busy: Path, workloads: list[Workload]
) -> None:
    """Symbols come from mappings read while the process ran, not at the end."""
    profiler = start_tracer("profile", "--comm", busy.name, "-F", "99")
    try:
        workloads.append(w := Workload(busy, stay=False))
        w.run()
        w.proc.communicate(timeout=10)  # gone before the profiler stops
    finally:
        out, err = stop_tracer_text(profiler)
    blocks = [b.splitlines() for b in out.strip().split("\n\n")]
    hottest = blocks[-1]  # like bcc: hottest last
    assert [line.strip() for line in hottest[:2]] == ["membrane_busy_loop", "main"]
    assert hottest[-2].split() == ["-", busy.name, f"({w.pid})"]
    assert int(hottest[-1]) >= 10
    assert "lost: 0" in err and "samples:" in err


# Spins in Python for a while, then execs the C workload in the same process.
EXEC_WRAPPER = textwrap.dedent("""
    import os, sys, time
    os.read(0, 3)
    end = time.monotonic() + 0.4
    while time.monotonic() < end:
        sum(range(1000))
    os.execv(sys.argv[1], [sys.argv[1], sys.argv[2], "stay"])
""")


def test_each_program_of_a_process_that_execs_keeps_its_own_symbols(busy: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", EXEC_WRAPPER, str(busy), str(BUSY_MS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        profiler = start_tracer("profile", "--pid", str(proc.pid), "-F", "99", "-U", "-o", "json")
        try:
            assert proc.stdin and proc.stdout
            proc.stdin.write("go\ngo\n")  # one for the wrapper, one for the busy loop
            proc.stdin.flush()
            assert proc.stdout.readline() == "done\n"
        finally:
            stacks, _ = stop_tracer(profiler)
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    before = [s for s in stacks if s["comm"] != busy.name]
    after = [s for s in stacks if s["comm"] == busy.name]
    assert before and after
    frames_before = {f for s in before for f in s["user_stack"]}
    assert "membrane_busy_loop" not in frames_before
    assert any(not f.startswith("[") for f in frames_before)  # the interpreter's symbols
    in_loop = sum(s["samples"] for s in after if s["user_stack"][:1] == ["membrane_busy_loop"])
    assert in_loop >= 0.9 * sum(s["samples"] for s in after)


def test_folded_to_stdout_and_duration() -> None:
    result = run_trace("profile", "-d", "0.5", "--comm", "nothing-here", "--folded", "-")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and "samples: 0," in result.stderr


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["-F", "0"], "--frequency"),
        (["-F", "-5"], "--frequency"),
        (["-F", str(max_sample_rate() + 1)], "--frequency"),
        (["-F", "fast"], "--frequency"),
        (["-U", "-K"], "--user-stacks-only"),
        (["--top", "-1"], "--top"),
        (["--stack-storage-size", "0"], "--stack-storage-size"),
        (["--svg", "/nonexistent-dir/cpu.svg"], "--svg"),
        (["--folded", "-", "-o", "json"], "--folded"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], field: str) -> None:
    """(The options every tool shares are checked in test_trace_options.py.)"""
    user_error(run_trace("profile", *args), field)
