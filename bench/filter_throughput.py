"""Throughput between two namespaces over a veth, with and without a filter holding 10,000
non-matching IPv4 destination prefixes on the server side.

Scenarios (each round runs all of them, in this order, so drift hits all alike):
  none                  no filter
  xdp-empty-generic     bench_empty's XDP program, generic mode: what the mode itself costs
  drop-dst-generic      filter_xdp drop-dst, 10,000 prefixes, generic (skb) XDP
  xdp-empty-native      bench_empty's XDP program, native (driver) mode on the veth
  drop-dst-native       filter_xdp drop-dst, 10,000 prefixes, native XDP
  iptables              the same 10,000 prefixes as iptables (nft backend) DROP rules in the
                        raw table's PREROUTING chain of the server namespace: the first
                        netfilter hook a received packet meets (before conntrack and
                        routing), which is the closest netfilter gets to XDP's position

Measured with iperf3 from client to server: TCP (one stream, bits/s at the receiver) and
UDP with 64-byte payloads sent as fast as possible (-b 0; packets/s at the receiver).
Every scenario is compared with `none` of the same round; the ratios' medians are reported.

    python -m bench.filter_throughput [--duration S] [--rounds N] [--scenarios a,b,...]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network

from bench._common import (
    RULES,
    chosen_scenarios,
    drop_prefixes,
    emit,
    exit_on_sigterm,
    fill_drop_dst,
    machine,
    median,
    scenario_arguments,
)
from membrane import netns
from membrane.abi import FilterStat
from membrane.bpf import BpfObject, Link, Program
from membrane.bpf.links import attach_xdp
from membrane.netns import Pair, Topology
from membrane.testing.traffic import iperf

TARGET_VS_NONE = 0.95
TARGET_VS_IPTABLES = 5.0
SCENARIOS = (
    "none",
    "xdp-empty-generic",
    "drop-dst-generic",
    "xdp-empty-native",
    "drop-dst-native",
    "iptables",
)


@dataclass
class Scenario:
    """How to put a filter in place on the server and take it away again."""

    name: str
    setup: Callable[[], None]
    teardown: Callable[[], None]
    tcp_bps: list[float] = field(default_factory=list)
    udp_pps: list[float] = field(default_factory=list)
    detail: dict[str, object] = field(default_factory=dict)


def iptables_rules(prefixes: list[IPv4Network]) -> str:
    lines = ["*raw", ":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [f"-A PREROUTING -d {net} -j DROP" for net in prefixes]
    return "\n".join([*lines, "COMMIT", ""])


class ServerFilters:
    """The filters of the scenarios, on the server's eth0 (ingress of client traffic)."""

    def __init__(self, topo: Topology, pair: Pair, prefixes: list[IPv4Network]) -> None:
        self.pair, self.prefixes = pair, prefixes
        self.empty = BpfObject.open("bench_empty").load()
        topo.callback(self.empty.close)
        self.filter = BpfObject.open("filter_xdp")
        topo.callback(self.filter.close)
        self.filter.set_config(enable_drop_dst=True, enable_drop_proto=False, emit_events=False)
        self.filter.load()
        fill_drop_dst(self.filter, prefixes)
        self.link: Link | None = None

    def scenarios(self) -> dict[str, Scenario]:
        empty, filt = self.empty.program("empty_xdp"), self.filter.program("filter_xdp")
        return {
            "none": Scenario("none", lambda: None, lambda: None),
            "xdp-empty-generic": self._xdp("xdp-empty-generic", empty, "generic"),
            "drop-dst-generic": self._xdp("drop-dst-generic", filt, "generic"),
            "xdp-empty-native": self._xdp("xdp-empty-native", empty, "native"),
            "drop-dst-native": self._xdp("drop-dst-native", filt, "native"),
            "iptables": Scenario("iptables", self._iptables_on, self._iptables_off),
        }

    def _xdp(self, name: str, prog: Program, mode: str) -> Scenario:
        scenario = Scenario(name, lambda: None, lambda: None, detail={"xdp_mode": mode})
        counts = prog is self.filter.program("filter_xdp")
        if counts:
            scenario.detail["filter_passed_packets"] = 0
        start = 0

        def setup() -> None:
            nonlocal start
            start = self.passed_packets()
            with netns.inside(self.pair.server.ns):
                self.link, scenario.detail["xdp_mode"] = attach_xdp(
                    prog, self.pair.server.ifindex(), mode
                )

        def teardown() -> None:
            if self.link is not None:
                self.link.detach()
                self.link = None
            if counts:  # proof that the filter sat in the traffic's path in this mode
                scenario.detail["filter_passed_packets"] += self.passed_packets() - start

        scenario.setup, scenario.teardown = setup, teardown
        return scenario

    def passed_packets(self) -> int:
        """Packets filter_xdp has let through so far, over all CPUs."""
        per_cpu = self.filter.map("filter_stats").lookup(FilterStat.PASSED)
        return sum(c.packets for c in per_cpu)

    def _iptables_on(self) -> None:
        ns = self.pair.server.ns
        netns.run(ns, ["iptables-restore", "-w"], input=iptables_rules(self.prefixes))
        saved = netns.run(ns, ["iptables-save", "-t", "raw"]).stdout
        loaded = sum(1 for line in saved.splitlines() if line.startswith("-A PREROUTING"))
        if loaded != len(self.prefixes):
            raise RuntimeError(f"iptables holds {loaded} rules, expected {len(self.prefixes)}")

    def _iptables_off(self) -> None:
        netns.run(self.pair.server.ns, ["nft", "flush", "ruleset"])


def _ratios(values: list[float], base: list[float]) -> float:
    return median([v / b for v, b in zip(values, base, strict=True)])


def _summarize(scenarios: dict[str, Scenario]) -> dict[str, dict[str, object]]:
    none = scenarios.get("none")
    out: dict[str, dict[str, object]] = {}
    for s in scenarios.values():
        row: dict[str, object] = {
            "tcp_gbit_s": round(median(s.tcp_bps) / 1e9, 2),
            "udp_kpps": round(median(s.udp_pps) / 1e3, 1),
            "tcp_rounds_gbit_s": [round(v / 1e9, 2) for v in s.tcp_bps],
            "udp_rounds_kpps": [round(v / 1e3, 1) for v in s.udp_pps],
            **s.detail,
        }
        if none is not None:
            row["tcp_vs_none"] = round(_ratios(s.tcp_bps, none.tcp_bps), 3)
            row["udp_vs_none"] = round(_ratios(s.udp_pps, none.udp_pps), 3)
        out[s.name] = row
    return out


def _targets(
    scenarios: dict[str, Scenario], rows: dict[str, dict[str, object]]
) -> list[dict[str, object]]:
    targets: list[dict[str, object]] = []
    for mode in ("generic", "native"):
        dst = scenarios.get(f"drop-dst-{mode}")
        if dst is None:
            continue
        for proto, key in (("TCP", "tcp"), ("UDP", "udp")):
            if "none" in scenarios:
                value = rows[dst.name][f"{key}_vs_none"]
                targets.append(
                    {
                        "name": f"drop-dst ({mode} XDP) {proto} >= "
                        f"{TARGET_VS_NONE:.0%} of no filter",
                        "value": value,
                        "limit": TARGET_VS_NONE,
                        "met": value >= TARGET_VS_NONE,
                    }
                )
            if "iptables" in scenarios:
                series = "tcp_bps" if key == "tcp" else "udp_pps"
                value = round(
                    _ratios(getattr(dst, series), getattr(scenarios["iptables"], series)), 2
                )
                targets.append(
                    {
                        "name": f"drop-dst ({mode} XDP) {proto} >= "
                        f"{TARGET_VS_IPTABLES:g}x iptables",
                        "value": value,
                        "limit": TARGET_VS_IPTABLES,
                        "met": value >= TARGET_VS_IPTABLES,
                    }
                )
    return targets


def main() -> None:
    parser = scenario_arguments(__doc__, SCENARIOS, duration=5.0, rounds=5)
    args = parser.parse_args()
    chosen = chosen_scenarios(parser, args, SCENARIOS)
    exit_on_sigterm()
    host = machine()

    started = time.monotonic()
    with Topology() as topo:
        pair = topo.pair()
        print(f"namespaces {pair.client.ns} -> {pair.server.ns}", file=sys.stderr, flush=True)
        prefixes = drop_prefixes(RULES, avoid=pair.server.address.network)
        filters = ServerFilters(topo, pair, prefixes)
        scenarios = {name: s for name, s in filters.scenarios().items() if name in chosen}
        path = (pair.client.ns, pair.server.ns, pair.server.ip)  # client, server, server address
        for _ in range(args.rounds):
            for s in scenarios.values():
                s.setup()
                try:
                    s.tcp_bps.append(iperf(*path, args.duration, udp=False))
                    s.udp_pps.append(iperf(*path, args.duration, udp=True))
                finally:
                    s.teardown()
    for s in scenarios.values():
        if s.detail.get("filter_passed_packets") == 0:
            raise RuntimeError(f"{s.name}: filter_xdp saw no packet: it was not in the path")

    rows = _summarize(scenarios)
    out = {
        "bench": "filter_throughput",
        "machine": host,
        "method": {
            "path": "client netns -> veth -> server netns (filters on the server's eth0)",
            "tool": "iperf3, one TCP stream; UDP -l 64 -b 0; receiver-side figures",
            "duration_s": args.duration,
            "rounds": args.rounds,
            "statistic": "median over rounds; ratios are per round against `none` of that "
            "round, then the median",
            "rules": RULES,
            "iptables": "iptables-nft, table raw, chain PREROUTING: the earliest netfilter "
            "hook for received packets (before conntrack and routing), the "
            "closest to XDP; one `-d PREFIX -j DROP` rule per prefix",
            "seconds": round(time.monotonic() - started),
        },
        "scenarios": rows,
        "targets": _targets(scenarios, rows),
    }
    summary = [f"{'scenario':20} {'TCP Gbit/s':>10} {'vs none':>8} {'UDP kpps':>9} {'vs none':>8}"]
    for name, r in rows.items():
        summary.append(
            f"{name:20} {r['tcp_gbit_s']:10.2f} {r.get('tcp_vs_none', 1):8.2f} "
            f"{r['udp_kpps']:9.1f} {r.get('udp_vs_none', 1):8.2f}"
        )
    for t in out["targets"]:
        summary.append(f"target: {t['name']}: {t['value']} -> {'met' if t['met'] else 'MISSED'}")
    emit(out, summary)


if __name__ == "__main__":
    main()
