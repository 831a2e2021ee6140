"""What trace events cost a node taking many short connections: new TCP connections per
second between two pods of one agent, and the agent's CPU time per connection, with the
monitor aggregation at medium (the default: a handful of trace events per connection) and
at maximum (no trace events), switched at run time in the node's `monitor_config` map
between measurements of the same agent, pods and client (so only the level differs).

Each round measures maximum, medium, maximum (the order alternates by round) for
--duration seconds each and compares medium with the mean of the two around it, which
cancels the drift of a shared machine. Medians over rounds. Flow events per connection are
read from the agent's hubble_flows_processed_total (--hubble-metrics-server).

    python -m bench.trace_conn_rate [--duration S] [--rounds N] [--inflight N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from bench._common import emit, exit_on_sigterm, machine
from bench._common import median as _median
from membrane import netns
from membrane.bpf import Map
from membrane.datapath.monitor import set_monitor_aggregation
from membrane.testing.agent import running_agent
from membrane.testing.pods import add_pod, start_echo_server
from membrane.testing.traffic import connection_rate

PORT = 7000
NAMESPACE = "bench"
METRICS_PORT = 19965  # the agent's hubble metrics, on the loopback of the root namespace


@dataclass
class Sample:
    per_s: float
    agent_cpu_us_per_conn: float
    events_per_conn: float
    lost_per_conn: float


def agent_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid`, all threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def flow_counts() -> tuple[float, float]:
    """(flows processed, events lost) so far, from the agent's hubble metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5) as r:
        text = r.read().decode()
    totals = {
        family.name: sum(s.value for s in family.samples if s.name.endswith("_total"))
        for family in text_string_to_metric_families(text)
    }
    return totals.get("hubble_flows_processed", 0.0), totals.get("hubble_lost_events", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--inflight", type=int, default=64, help="connections under way")
    args = parser.parse_args()
    exit_on_sigterm()
    host = machine()
    tag = f"tcr{os.getpid()}"
    options = {"extra_args": ["--hubble-metrics-server", f"127.0.0.1:{METRICS_PORT}"]}
    with (
        running_agent(tag, log_level="warning", memory_limit=None, **options) as agent,
        ExitStack() as stack,
    ):
        api = agent.client(timeout=120.0)
        client = add_pod(api, NAMESPACE, "client", {"app": "client"})[0]
        server = add_pod(api, NAMESPACE, "server", {"app": "server"})[0]
        stack.callback(netns.stop, start_echo_server(server.netns, (PORT,)))
        config = stack.enter_context(Map.from_pin(str(agent.bpf_dir / "monitor_config")))
        assert agent.proc is not None
        pid = agent.proc.pid

        def measure(level: str) -> Sample:
            set_monitor_aggregation(config, level)
            cpu, (flows, lost) = agent_cpu_s(pid), flow_counts()
            rate = connection_rate(
                client.netns, server.ip, PORT, args.duration, args.clients, args.inflight
            )
            conns = max(rate.connections, 1)
            time.sleep(1.0)  # the reader's backlog: flows of this measurement still coming
            flows_after, lost_after = flow_counts()
            return Sample(
                per_s=rate.per_s,
                agent_cpu_us_per_conn=(agent_cpu_s(pid) - cpu) * 1e6 / conns,
                events_per_conn=(flows_after - flows) / conns,
                lost_per_conn=(lost_after - lost) / conns,
            )

        measure("medium")  # warm up
        samples: dict[str, list[Sample]] = {"medium": [], "maximum": []}
        ratios = []
        for rnd in range(args.rounds):
            outer, inner = ("maximum", "medium") if rnd % 2 == 0 else ("medium", "maximum")
            got = {outer: [measure(outer)], inner: [measure(inner)]}
            got[outer].append(measure(outer))
            for level, runs in got.items():
                samples[level] += runs
            mean = {level: sum(x.per_s for x in runs) / len(runs) for level, runs in got.items()}
            ratios.append(mean["medium"] / mean["maximum"])
            print(f"round {rnd}: medium/maximum {ratios[-1]:.3f}", file=sys.stderr)

    def summary_of(runs: list[Sample]) -> dict[str, float]:
        return {
            "per_s": _median([x.per_s for x in runs]),
            "agent_cpu_us_per_conn": _median([x.agent_cpu_us_per_conn for x in runs]),
            "flow_events_per_conn": _median([x.events_per_conn for x in runs]),
            "lost_events_per_conn": _median([x.lost_per_conn for x in runs]),
        }

    out = {
        "bench": "trace_conn_rate",
        "machine": host,
        "method": {
            "duration_s": args.duration,
            "rounds": args.rounds,
            "clients": args.clients,
            "inflight": args.inflight,
            "statistic": "per round: the mean rate of medium's runs over maximum's (one "
            "level measured between two runs of the other, alternating); median over rounds",
        },
        "medium_over_maximum_rate": _median(ratios),
        "medium": summary_of(samples["medium"]),
        "maximum": summary_of(samples["maximum"]),
    }
    summary = []
    for level in ("maximum", "medium"):
        r = out[level]
        summary.append(
            f"{level:8} {r['per_s']:8.0f} conn/s  agent {r['agent_cpu_us_per_conn']:6.1f} us "
            f"CPU/conn  {r['flow_events_per_conn']:4.1f} flows/conn  "
            f"{r['lost_events_per_conn']:4.1f} lost/conn"
        )
    summary.append(f"medium / maximum connection rate: {out['medium_over_maximum_rate']:.3f}")
    emit(out, summary)


if __name__ == "__main__":
    main()
