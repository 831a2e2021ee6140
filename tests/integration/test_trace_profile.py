"""`membrane trace profile` attributes a busy loop's samples to its function, and its text,
JSON, folded and SVG outputs agree with the kernel's sample count."""

from __future__ import annotations

import os
import secrets
import shutil
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
from membrane.trace.symbols import UNKNOWN
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
    "stack_collisions",
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
    assert summary["stack_collisions"] == 0
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


# Walks one of 2**PATH_BITS call paths at a time, each a recursion through membrane_a and
# membrane_b chosen by the bits of the path's number, down to membrane_leaf, which spins:
# hundreds of distinct user stacks. Before each walk it names itself after the path
# (prctl, so the comm of every sample says which path ran), until argv[1] ms have passed.
PATHS = r"""
#include <signal.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/time.h>

#define PATH_BITS 9

static volatile sig_atomic_t stop;
volatile unsigned long sink;

static void on_alarm(int sig) { (void)sig; stop = 1; }

void membrane_leaf(void)
{
	for (int i = 0; i < 30000; i++)
		sink++;
}

void membrane_b(unsigned path, int left);

void membrane_a(unsigned path, int left)
{
	if (!left)
		membrane_leaf();
	else if (path & 1)
		membrane_b(path >> 1, left - 1);
	else
		membrane_a(path >> 1, left - 1);
	sink++;
}

void membrane_b(unsigned path, int left)
{
	if (!left)
		membrane_leaf();
	else if (path & 1)
		membrane_b(path >> 1, left - 1);
	else
		membrane_a(path >> 1, left - 1);
	sink++;
}

int main(int argc, char **argv)
{
	char line[16], name[16];
	long ms = atol(argv[1]);
	struct itimerval timer = { .it_value = { ms / 1000, (ms % 1000) * 1000 } };

	if (!fgets(line, sizeof(line), stdin))
		return 1;
	signal(SIGALRM, on_alarm);
	setitimer(ITIMER_REAL, &timer, NULL);
	while (!stop)
		for (unsigned path = 0; path < (1u << PATH_BITS) && !stop; path++) {
			snprintf(name, sizeof(name), "mbs-%x", path);
			prctl(PR_SET_NAME, name);
			membrane_a(path, PATH_BITS);
		}
	puts("done");
	fflush(stdout);
	return 0;
}
""".replace("#include <stdio.h>", "#include <stdio.h>\n#include <stdlib.h>")
PATH_BITS = 9


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("paths")
    (tmp / "paths.c").write_text(PATHS)
    binary = tmp / "paths"
    subprocess.run(
        ["clang", "-O0", "-fno-omit-frame-pointer", "-o", str(binary), str(tmp / "paths.c")],
        check=True,
    )
    return binary


def walked_path(user_stack: list[str]) -> tuple[int, int] | None:
    """The path number a stack shows, and the mask of the bits it shows, when it was taken
    in membrane_leaf: the frames between the leaf and main are the recursion, innermost
    first, the root last. A sample in the leaf's first or last instructions (its frame
    not set up yet, or torn down) misses the innermost frame of the walk, as any
    frame-pointer unwinder does: then the last bit is unknown."""
    if user_stack[:1] != ["membrane_leaf"] or "main" not in user_stack:
        return None
    walk = user_stack[1 : user_stack.index("main")]
    assert walk[-1] == "membrane_a" and set(walk) <= {"membrane_a", "membrane_b"}, user_stack
    assert len(walk) in (PATH_BITS, PATH_BITS + 1), user_stack
    known = len(walk) - 1  # bits 0 .. known - 1
    # the frame i + 1 levels below the root took bit i
    bits = [walk[len(walk) - 2 - i] == "membrane_b" for i in range(known)]
    return sum(1 << i for i, bit in enumerate(bits) if bit), (1 << known) - 1


def profile_paths(binary: Path, *args: str) -> tuple[list[dict], dict]:
    proc = subprocess.Popen(
        [str(binary), "2500"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        frequency = str(min(999, max_sample_rate()))
        profiler = start_tracer(
            "profile", "--pid", str(proc.pid), "-F", frequency, "-U", "-o", "json", *args
        )
        try:
            out, _ = proc.communicate("go\n", timeout=30)
            assert out == "done\n"
        finally:
            stacks, summary = stop_tracer(profiler)
    finally:
        proc.kill()
        proc.communicate()
    assert summary["lost"] == 0 and sum(s["samples"] for s in stacks) == summary["samples"]
    return stacks, summary


def check_attribution(stacks: list[dict]) -> set[int]:
    """Every stack taken in the leaf shows the path its comm names (the comm is read apart
    from the stack): a stack counted under another one's id would show another path.
    Returns the paths seen whole."""
    seen = set()
    for s in stacks:
        walked = walked_path(s["user_stack"])
        if walked is not None:
            path, known = walked
            assert s["comm"].startswith("mbs-"), s
            assert int(s["comm"][4:], 16) & known == path, s
            if known == (1 << PATH_BITS) - 1:
                seen.add(path)
    return seen


def test_hundreds_of_distinct_stacks_are_all_kept_apart(paths: Path) -> None:
    """A BPF_MAP_TYPE_STACK_TRACE map drops (-EEXIST) each stack whose hash bucket another
    one holds; here every stack is stored and counted under its own frames."""
    stacks, summary = profile_paths(paths)
    for kind in ("user_stack_eexist", "user_stack_efault", "user_stack_other"):
        assert summary[kind] == 0, summary
    assert all(s["user_stack_error"] is None for s in stacks)
    seen = check_attribution(stacks)
    in_leaf = sum(s["samples"] for s in stacks if walked_path(s["user_stack"]) is not None)
    assert in_leaf >= 0.8 * summary["samples"], summary
    # ~2 s of samples at up to 999 Hz over 512 paths: most of them were seen
    assert len(seen) >= min(300, in_leaf // 4), (len(seen), in_leaf)


def test_stacks_whose_hashes_collide_are_told_apart_and_counted(paths: Path) -> None:
    """With the hash cut to 8 bits (256 hashes for hundreds of stacks) distinct stacks share
    hashes all the time: each one still gets its own slot, or is reported missing."""
    stacks, summary = profile_paths(paths, "--stack-hash-bits", "8")
    assert summary["stack_collisions"] > 0, summary
    seen = check_attribution(stacks)
    assert len(seen) >= 100, len(seen)
    # stacks with no free slot are missing (EEXIST), counted, never someone else's
    missing = sum(s["samples"] for s in stacks if s["user_stack_error"] == "EEXIST")
    assert missing == summary["user_stack_eexist"]
    assert all(s["user_stack"] == [] for s in stacks if s["user_stack_error"])


def test_processes_gone_before_the_end_keep_their_symbols(busy: Path, tmp_path: Path) -> None:
    """Short-lived processes, whose program file is even replaced before the profile ends:
    their stacks are named from the very file they ran (kept open while they lived), or,
    for one the profiler could not read in time, unknown throughout, never half named."""
    binary = tmp_path / f"mbx-{secrets.token_hex(4)}"
    shutil.copy(busy, binary)
    frequency = str(min(999, max_sample_rate()))
    profiler = start_tracer("profile", "--comm", binary.name, "-F", frequency, "-U", "-o", "json")
    try:
        for _ in range(10):
            proc = subprocess.run(
                [str(binary), "60", "exit"], input="go\n", capture_output=True, text=True
            )
            assert proc.stdout == "done\n"
        binary.unlink()
        shutil.copy("/bin/true", binary)  # another program under the same name
    finally:
        stacks, summary = stop_tracer(profiler)
    assert summary["lost"] == summary["lost_process_events"] == 0
    per_pid: dict[int, list[dict]] = {}
    for s in stacks:
        per_pid.setdefault(s["pid"], []).append(s)
    assert len(per_pid) == 10, sorted(per_pid)
    named = []
    for pid, own in per_pid.items():
        samples = sum(s["samples"] for s in own)
        loop = [s for s in own if s["user_stack"][:2] == ["membrane_busy_loop", "main"]]
        if loop:
            # libraries too: they were mapped after the process's first sample
            assert all(UNKNOWN not in s["user_stack"] for s in loop), loop
            assert sum(s["samples"] for s in loop) >= 0.8 * samples, own
            named.append(pid)
        else:  # never read: nothing of it named
            assert all(set(s["user_stack"]) <= {UNKNOWN} for s in own), own
    assert len(named) >= 8, per_pid
