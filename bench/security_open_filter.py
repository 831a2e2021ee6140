"""What a TracingPolicy on openat costs the opens it does not match: a tight open/close
loop (bench.trace_open's C workload) alone, with the bare tracepoint program (one that
only returns: bpf/bench_trace_empty.bpf.c), and with a kill-on-/etc/shadow policy hook
(bpf/security_policy.bpf.c) whose selectors run in the kernel on every open.

The policy is the integration test's: matchBinaries NotIn [head] (the workload is not
head, so the binary filter passes) AND matchArgs Equal /etc/shadow, so every open pays
the whole evaluation (the inode lookup, the path read from user memory, the LPM lookup)
and then does nothing: the worst case of a non-matching open.

Reported side by side from the same rounds (order rotated): ns per open+close of the
workload, and ns per program run from the kernel's BPF run-time statistics. Target: a
non-matching open with the policy costs <= 1.5x the open with the bare program.

    python -m bench.security_open_filter [--opens 200000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench._common import emit, exit_on_sigterm, machine, median
from bench._trace import Workload, bpf_run_time, bpf_run_time_stats, compile_workload
from bench.trace_open import FILES, OPEN_LOOP_C
from membrane.bpf import BpfObject
from membrane.bpf.fs import PIN_ROOT
from membrane.bpf.links import attach_auto
from membrane.bpf.probe import supports
from membrane.security.policy.compile import compile_policy
from membrane.security.policy.loader import Loader
from membrane.security.policy.parse import parse_policies

TARGET_RATIO = 1.5  # policy <= 1.5x the bare program, per non-matching open

POLICY = textwrap.dedent(
    """\
    apiVersion: cilium.io/v1alpha1
    kind: TracingPolicy
    metadata:
      name: shadow-readers
    spec:
      tracepoints:
      - subsystem: syscalls
        event: sys_enter_openat
        args:
        - index: 6
          type: string
        selectors:
        - matchBinaries:
          - operator: NotIn
            values: ["/usr/bin/head"]
          matchArgs:
          - index: 6
            operator: Equal
            values: ["/etc/shadow"]
          matchActions:
          - action: Sigkill
    """
)


@contextlib.contextmanager
def no_program() -> Iterator[None]:
    yield


@contextlib.contextmanager
def bare_program() -> Iterator[None]:
    with BpfObject.open("bench_trace_empty") as obj:
        obj.program("exit_openat").autoload = False
        obj.load()
        link = attach_auto(obj.program("enter_openat"))
        try:
            yield
        finally:
            link.detach()


@contextlib.contextmanager
def policy_program() -> Iterator[None]:
    [(policy, _)] = parse_policies(POLICY)
    [plan] = compile_policy(policy, "bench", supports)
    pins = f"{PIN_ROOT}/bench-security-{os.getpid()}"
    hook = Loader(pins).load(plan, 1, "1")
    try:
        yield
    finally:
        hook.close(detach=True)
        shutil.rmtree(pins, ignore_errors=True)


SCENARIOS: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "no-program": no_program,
    "bare-program": bare_program,
    "policy": policy_program,
}


def run_round(binary: Path, files: Path, opens: int, order: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in order:
        with SCENARIOS[name]():
            before = bpf_run_time(os.getpid())
            workload = Workload([str(binary), str(opens), str(files)])
            wall, _, done = workload.run()
            after = bpf_run_time(os.getpid())
        runs = after[1] - before[1]
        out[name] = {
            "ns_per_open": wall / done,
            "prog_ns_per_run": (after[0] - before[0]) / runs if runs else None,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--opens", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    exit_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="membrane-bench-sp-"))
    try:
        binary = compile_workload(work, "open_loop", OPEN_LOOP_C, f"-DFILES={FILES}")
        files = work / "files"
        files.mkdir()
        for i in range(FILES):
            (files / f"f{i}").touch()
        names = list(SCENARIOS)
        rounds = []
        with bpf_run_time_stats():
            for r in range(args.rounds):
                order = names[r % len(names) :] + names[: r % len(names)]
                rounds.append(run_round(binary, files, args.opens, order))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(name: str, key: str) -> float:
        return median([r[name][key] for r in rounds])

    none, bare, policy = (med(n, "ns_per_open") for n in names)
    ratio = policy / bare
    added = (policy - none) / (bare - none) if bare > none else None
    prog_ratio = med("policy", "prog_ns_per_run") / med("bare-program", "prog_ns_per_run")
    ratios = [r["policy"]["ns_per_open"] / r["bare-program"]["ns_per_open"] for r in rounds]
    result = {
        "benchmark": "security_open_filter",
        "machine": machine(),
        "workload": f"C loop: open(O_RDONLY|O_CLOEXEC)+close over {FILES} files, "
        f"{args.opens} opens per run, {args.rounds} rounds (order rotated)",
        "rounds": rounds,
        "median_ns_per_open": {"no-program": none, "bare-program": bare, "policy": policy},
        "median_prog_ns_per_run": {
            "bare-program": med("bare-program", "prog_ns_per_run"),
            "policy": med("policy", "prog_ns_per_run"),
        },
        "policy_vs_bare": ratio,
        "policy_vs_bare_range": [min(ratios), max(ratios)],
        "added_cost_vs_bare": added,
        "program_run_vs_bare": prog_ratio,
        "target": TARGET_RATIO,
        "met": ratio <= TARGET_RATIO,
    }
    emit(
        result,
        [
            f"ns per open+close: none {none:.0f}, bare program {bare:.0f}, policy {policy:.0f}",
            f"policy / bare: {ratio:.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f}); "
            f"target <= {TARGET_RATIO}: {'met' if ratio <= TARGET_RATIO else 'MISSED'}",
            f"program run: bare {med('bare-program', 'prog_ns_per_run'):.0f} ns, policy "
            f"{med('policy', 'prog_ns_per_run'):.0f} ns ({prog_ratio:.1f}x)",
        ],
    )


if __name__ == "__main__":
    main()
