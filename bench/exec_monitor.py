"""What watching every exec and exit costs: fork+exec processes per second from a shell
loop (`/bin/true` N times), with the real agent running its process monitor
(--runtime-security=true) and without (--runtime-security=false), side by side, the two
agents alternating over several rounds so drift hits both alike. Target: <= 5 % fewer
processes/s with the monitor (Tetragon reports low single-digit percent).

Also the process cache's memory under churn: the agent's RSS while 100k processes come
and go (sampled every 20k), with the cache's counts (live, remembered, evicted) and the
ring's losses.

    python -m bench.exec_monitor [--processes N] [--rounds R] [--churn N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from typing import Any

from bench._common import emit, exit_on_sigterm, machine
from membrane.testing.agent import AgentProcess, running_agent
from membrane.testing.cluster import unique_tag


def storm(count: int) -> float:
    """Processes per second of a shell forking and executing /bin/true `count` times."""
    started = time.perf_counter()
    subprocess.run(
        ["/bin/bash", "-c", f"for ((i = 0; i < {count}; i++)); do /bin/true; done"], check=True
    )
    return count / (time.perf_counter() - started)


def rates(monitor: bool, count: int, repeats: int) -> dict[str, Any]:
    flag = f"--runtime-security={'true' if monitor else 'false'}"
    with running_agent(unique_tag("x"), extra_args=[flag]) as agent:
        storm(count // 4)  # warm the page cache and the agent alike
        cpu = agent.cpu_s()
        samples = [storm(count) for _ in range(repeats)]
        status = agent.cli_json("security", "status")
        return {
            "processes_per_s": samples,
            "agent_cpu_s": agent.cpu_s() - cpu,
            "lost_events": status.get("lost_events", 0),
        }


def churn(total: int, step: int) -> dict[str, Any]:
    with running_agent(unique_tag("x")) as agent:
        samples = [_sample(agent, 0)]
        done = 0
        while done < total:
            storm(step)
            done += step
            samples.append(_sample(agent, done))
        return {"samples": samples}


def _sample(agent: AgentProcess, processes: int) -> dict[str, Any]:
    status = agent.cli_json("security", "status")
    return {
        "processes": processes,
        **agent.memory_kib(),
        "cache_live": status["processes_live"],
        "cache_known": status["processes_known"],
        "cache_evicted": status["processes_evicted"],
        "events_kept": status["events_kept"],
        "lost_events": status["lost_events"],
    }


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, default=2000, help="per storm")
    parser.add_argument("--repeats", type=int, default=2, help="storms per agent")
    parser.add_argument("--rounds", type=int, default=3, help="off/on agent pairs")
    parser.add_argument("--churn", type=int, default=100_000, help="processes for the RSS run")
    args = parser.parse_args()
    rounds = []
    for _ in range(args.rounds):
        off = rates(False, args.processes, args.repeats)
        on = rates(True, args.processes, args.repeats)
        rounds.append({"off": off, "on": on})
    off_all = [r for rd in rounds for r in rd["off"]["processes_per_s"]]
    on_all = [r for rd in rounds for r in rd["on"]["processes_per_s"]]
    ratios = [
        statistics.median(rd["on"]["processes_per_s"])
        / statistics.median(rd["off"]["processes_per_s"])
        for rd in rounds
    ]
    overhead = 1 - statistics.median(on_all) / statistics.median(off_all)
    memory = churn(args.churn, max(args.churn // 5, 1))
    result = {
        "machine": machine(),
        "processes_per_storm": args.processes,
        "rounds": rounds,
        "median_processes_per_s": {
            "off": statistics.median(off_all),
            "on": statistics.median(on_all),
        },
        "on_over_off_per_round": ratios,
        "overhead": overhead,
        "target_overhead": 0.05,
        "met": overhead <= 0.05,
        "churn": memory,
    }
    first, last = memory["samples"][0], memory["samples"][-1]
    emit(
        result,
        [
            f"fork+exec/s: off {statistics.median(off_all):.0f}, on {statistics.median(on_all):.0f}"
            f" (overhead {overhead:.1%}; per round on/off {', '.join(f'{r:.3f}' for r in ratios)})",
            f"agent RSS {first['rss_kib']} KiB -> {last['rss_kib']} KiB after "
            f"{last['processes']} processes (cache: {last['cache_known']} known, "
            f"{last['cache_evicted']} evicted; lost {last['lost_events']})",
        ],
    )


if __name__ == "__main__":
    main()
