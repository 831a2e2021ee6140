"""`python -m bench.control_plane`: the command line, the phases in order, the JSON."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench import control_plane
from bench._common import emit, exit_on_sigterm, machine
from bench.control_plane.harness import TEARDOWN
from bench.control_plane.measure import Profiler, source_digest
from bench.control_plane.phase_endpoints import phase_endpoints
from bench.control_plane.phase_policy import phase_policy
from bench.control_plane.phase_scale import phase_scale
from bench.control_plane.report import summary

TARGETS = {
    "policy_1_rule_ms": 100.0,
    "policy_10000_rules_ms": 2000.0,
    "endpoint_add_ms": 150.0,
}

# --quick: every phase at its smallest (options given explicitly still win)
QUICK = {
    "sizes": "20",
    "reps": 1,
    "bulk_reps": 1,
    "singles": 1,
    "row": 5,
    "endpoints": 20,
    "no_tests": True,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.control_plane",
        description=(control_plane.__doc__ or "").split("\n\n")[0],
    )
    parser.add_argument("--phases", default="policy,endpoints,scale")
    parser.add_argument("--sizes", default="1000,2000,5000,10000", help="bulk rule counts")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of 1-rule changes")
    parser.add_argument("--bulk-reps", type=int, default=2, help="repetitions of bulk imports")
    parser.add_argument(
        "--max-wait",
        type=float,
        default=300.0,
        help="skip a bulk size whose import is predicted to take longer (s; 0: never skip)",
    )
    parser.add_argument("--singles", type=int, default=5, help="single endpoint adds")
    parser.add_argument("--row", type=int, default=100, help="endpoints added in a row")
    parser.add_argument("--endpoints", type=int, default=500, help="endpoints of the scale phase")
    parser.add_argument("--no-tests", action="store_true", help="skip the pytest run in scale")
    parser.add_argument("--profile", type=Path, help="py-spy folded stacks into this directory")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: every phase at its smallest (20 rules, 1 rep, 5 endpoints in a "
        "row, 20 in scale, no pytest); options given explicitly still apply",
    )
    args = parser.parse_args()
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    return args


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        print("control_plane: needs root (netns, BPF)", file=sys.stderr)
        return 2
    exit_on_sigterm()
    phases = args.phases.split(",")
    profile = Profiler(args.profile)
    result: dict[str, Any] = {
        "benchmark": "control_plane",
        "machine": machine(),
        "targets": TARGETS,
        "profiled": args.profile is not None,
        "quick": args.quick,
        "source": source_digest(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    started = time.perf_counter()
    if "policy" in phases:
        print("== policy", file=sys.stderr)
        sizes = [int(s) for s in args.sizes.split(",")]
        result["policy"] = phase_policy(sizes, args.reps, args.bulk_reps, args.max_wait, profile)
    if "endpoints" in phases:
        print("== endpoints", file=sys.stderr)
        result["endpoints"] = phase_endpoints(args.singles, args.row, profile)
    if "scale" in phases:
        print("== scale", file=sys.stderr)
        result["scale"] = phase_scale(args.endpoints, max(1, args.reps // 2), not args.no_tests,
                                      profile)  # fmt: skip
    result["teardown"] = TEARDOWN
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["loadavg_1m_at_end"] = os.getloadavg()[0]
    if profile.results:
        result["profile"] = profile.results
    emit(result, summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
