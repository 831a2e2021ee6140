"""The DDoS guards of `membrane filter` (drop-src, rate-limit, syn-guard): what a
legitimate client keeps while a flood 10x its rate hits the server, how much of the flood
the guard drops, and what each guard costs per packet against an empty XDP program.

Traffic (membrane.testing.ddos): a legitimate client sends UDP at --legit-pps from its
namespace; a flooder sends --flood-ratio times that from another, raw IPv4 with sources
cycling through 198.19.0.0/16 (spoofed; 4,096 distinct), UDP to the same port or TCP SYNs
to a listening port; both reach the server's eth0 through a router, and the guard is
attached there by FilterManager as `membrane filter` attaches it (generic XDP on a veth).
Per scenario and round, --seconds of traffic: the legitimate rate delivered (datagrams the
server's socket received / seconds) against its no-flood rate in the same round, and the
fraction of what the client sent that arrived (a sender short of CPU sends less: that
lowers the first, not the second), the
flood's packets that reached the server's socket (UDP) or the guard's drop counter (SYN).
Target: legitimate >= 95 % of its no-flood rate while the flood is dropped.

Per-packet cost: BPF_PROG_TEST_RUN with repeat (the kernel's mean per run; the packet is
not changed by these programs, so every repetition sees the same one), median over rounds,
against bench_empty's empty XDP program timed the same way. Drop events are off in these
runs (a repeated drop would fill the ring buffer; the event's cost is the drop-dst
bench's). The "single runs" cases run one packet per call with a new source each time
(every packet inserts an LRU bucket, as under a spoofed flood), median of the calls; a
single run costs more than a repetition of a batch, so compare them with the empty
program's single runs.

    flock /tmp/membrane-bench.lock python -m bench.ddos_guard [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import ipaddress
import time
from collections.abc import Callable
from typing import Any

from bench._common import emit, exit_on_sigterm, machine, median, packet
from membrane.abi import FILTER_GUARD_RATE, FILTER_GUARD_SYN
from membrane.bpf import BpfObject, test_run
from membrane.filter.keys import DropDstTables
from membrane.filter.manager import FilterManager, map_memory
from membrane.netns import Topology
from membrane.testing import ddos
from membrane.testing.traffic import drain, listen

SINK, SYN_PORT = 9000, 7100
SCENARIOS = (
    "no flood",
    "flood, no guard",
    "flood + drop-src",
    "flood + rate-limit",
    "SYN flood + syn-guard",
)


def _sender(topo: Topology, bed: ddos.Bed, kind: str, pps: int, seconds: float) -> Any:
    if kind == "udp":
        return ddos.start_sender(
            topo, bed.legit.ns, kind="udp", dst=bed.server.ip, port=SINK, pps=pps, seconds=seconds
        )
    port = SYN_PORT if kind == "syn" else SINK
    return ddos.start_sender(
        topo, bed.flood.ns, kind=kind, dst=bed.server.ip, port=port, pps=pps,
        seconds=seconds, sources=ddos.SPOOFED,
    )  # fmt: skip


def run_scenario(
    topo: Topology, bed: ddos.Bed, mgr: FilterManager, name: str, args: argparse.Namespace
) -> dict[str, Any]:
    ns = bed.server.ns
    flood_pps = args.legit_pps * args.flood_ratio
    if name == "flood + drop-src":
        mgr.add_prefixes(ns, "eth0", [ipaddress.ip_network(ddos.SPOOFED)], "src")
    elif name == "flood + rate-limit":
        # the spoofed sources share a /16 (one bucket) the client is not in; the limit is
        # the client's own rate x 2, so a client keeps its traffic and a /16 gets no more
        mgr.set_guard(ns, "eth0", "rate-limit", args.legit_pps * 2, args.legit_pps, 16, 64)
    elif name == "SYN flood + syn-guard":
        mgr.set_guard(ns, "eth0", "syn-guard", args.legit_pps, args.legit_pps // 10)
    flood_kind = "syn" if name.startswith("SYN") else "spoof-udp"
    try:
        with ddos.UdpCounter(ns, bed.server.ip, SINK) as counter:
            legit = _sender(topo, bed, "udp", args.legit_pps, args.seconds)
            flood = (
                None
                if name == "no flood"
                else _sender(topo, bed, flood_kind, flood_pps, args.seconds)
            )
            sent_legit = ddos.finish(legit)
            sent_flood = ddos.finish(flood) if flood else {"sent": 0, "failed": 0, "seconds": 0}
            time.sleep(0.3)  # the last datagrams in flight (the counter reads a socket)
            got_legit = counter.counts[bed.legit.ip]
            got_flood = sum(n for src, n in counter.counts.items() if src != bed.legit.ip)
        dropped = 0
        for att in mgr.attachments(netns=ns, device="eth0"):
            dropped = mgr.totals(att)["dropped"]["packets"]
        return {
            "legit_sent": sent_legit["sent"],
            "legit_received": got_legit,
            "legit_pps_delivered": round(got_legit / sent_legit["seconds"], 1),
            "flood_sent": sent_flood["sent"],
            "flood_send_failed": sent_flood["failed"],
            "flood_pps_sent": round(sent_flood["sent"] / sent_flood["seconds"], 1)
            if sent_flood["seconds"]
            else 0,
            "flood_udp_received": got_flood,
            "xdp_dropped": dropped,
        }
    finally:
        for att in mgr.attachments(netns=ns, device="eth0"):
            mgr.detach(att)


def measure_traffic(args: argparse.Namespace) -> dict[str, Any]:
    mgr = FilterManager()
    rounds: dict[str, list[dict[str, Any]]] = {s: [] for s in SCENARIOS}
    with Topology("mddos") as topo:
        bed = ddos.build(topo)
        listener = listen(bed.server.ns, bed.server.ip, SYN_PORT, backlog=128)
        try:
            for _ in range(args.rounds):
                for name in SCENARIOS:
                    rounds[name].append(run_scenario(topo, bed, mgr, name, args))
                    drain([listener])
        finally:
            listener.close()
    out = {}
    for name, runs in rounds.items():
        base = [r["legit_pps_delivered"] for r in rounds["no flood"]]
        kept = [r["legit_pps_delivered"] / b for r, b in zip(runs, base, strict=True)]
        flood_dropped = [
            r["xdp_dropped"] / r["flood_sent"] if r["flood_sent"] else None for r in runs
        ]
        delivered = [r["legit_received"] / r["legit_sent"] for r in runs]
        out[name] = {
            "legit_kept_of_no_flood_median": round(median(kept), 4),
            "legit_delivered_of_sent_median": round(median(delivered), 4),
            "legit_delivered_of_sent_min": round(min(delivered), 4),
            "legit_kept_min": round(min(kept), 4),
            "flood_dropped_fraction_median": round(median(flood_dropped), 4)
            if runs[0]["flood_sent"]
            else None,
            "rounds": runs,
        }
    return out


# ---- per-packet cost --------------------------------------------------------------------
def _guard(obj: BpfObject, index: int, pps: int, burst: int, prefix4: int = 32) -> None:
    config = obj.map("guard_config")
    config.update(
        index,
        config.value_type(rule_id=100 + index, pps=pps, burst=burst, prefix_len4=prefix4,
                          prefix_len6=128),
    )  # fmt: skip


def _filter(**enable: bool) -> BpfObject:
    obj = BpfObject.open("filter_xdp")
    obj.set_config(emit_events=False, **enable)
    return obj.load()


def cost_cases(objects: list[BpfObject]) -> dict[str, Callable[[], float]]:
    """Case -> a function that returns the kernel's ns per packet for one measurement."""
    empty = BpfObject.open("bench_empty").load()
    drop_src = _filter(enable_drop_src=True)
    tables = DropDstTables.of(drop_src.map, "src")
    listed = [ipaddress.ip_network(f"198.19.{i // 256}.{i % 256}/32") for i in range(1000)]
    tables.add((n, i) for i, n in enumerate(listed, 1))
    rate_pass, rate_drop = _filter(enable_rate_limit=True), _filter(enable_rate_limit=True)
    _guard(rate_pass, FILTER_GUARD_RATE, 2**32 - 1, 2**32 - 1)
    _guard(rate_drop, FILTER_GUARD_RATE, 1, 1)
    syn_pass, syn_drop = _filter(enable_syn_guard=True), _filter(enable_syn_guard=True)
    _guard(syn_pass, FILTER_GUARD_SYN, 2**32 - 1, 2**32 - 1)
    _guard(syn_drop, FILTER_GUARD_SYN, 1, 1)
    objects += [rate_pass, empty, drop_src, rate_drop, syn_pass, syn_drop]

    udp = packet("198.18.7.7", "198.18.9.9", proto="udp")
    listed_udp = packet("198.19.0.5", "198.18.9.9", proto="udp")
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    syn = bytes(Ether() / IP(src="198.18.7.7", dst="198.18.9.9") / TCP(dport=80, flags="S"))
    fresh = [
        packet(str(ipaddress.ip_address(0xC6130000 + i)), "198.18.9.9", proto="udp")
        for i in range(20000)
    ]
    counter = iter(range(1 << 40))

    def repeated(obj: BpfObject, name: str, data: bytes) -> Callable[[], float]:
        return lambda: test_run(obj.program(name), data, repeat=200_000).duration_ns

    def single(obj: BpfObject, name: str) -> Callable[[], float]:
        """One packet per call, a fresh source each time: under the rate limit every packet
        inserts an LRU bucket, as under a spoofed flood; median of the calls."""

        def measure() -> float:
            start = next(counter) * 2000
            prog = obj.program(name)
            frames = [fresh[(start + i) % len(fresh)] for i in range(2000)]
            return median([test_run(prog, f).duration_ns for f in frames])

        return measure

    return {
        "empty XDP": repeated(empty, "empty_xdp", udp),
        "drop-src 1,000 /32, not listed (pass)": repeated(drop_src, "filter_xdp", udp),
        "drop-src 1,000 /32, listed (drop)": repeated(drop_src, "filter_xdp", listed_udp),
        "rate-limit, under the rate (pass)": repeated(rate_pass, "filter_xdp", udp),
        "rate-limit, over the rate (drop)": repeated(rate_drop, "filter_xdp", udp),
        "empty XDP, single runs": single(empty, "empty_xdp"),
        "rate-limit, a new source per packet (pass, single runs)": single(rate_pass, "filter_xdp"),
        "syn-guard, SYN under the rate (pass)": repeated(syn_pass, "filter_xdp", syn),
        "syn-guard, SYN over the rate (drop)": repeated(syn_drop, "filter_xdp", syn),
        "syn-guard, not a SYN (pass)": repeated(syn_pass, "filter_xdp", udp),
    }


def measure_costs(rounds: int) -> tuple[dict[str, Any], dict[str, int]]:
    objects: list[BpfObject] = []
    try:
        cases = cost_cases(objects)
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(rounds):
            for name, measure in cases.items():
                samples[name].append(measure())
        buckets = objects[0].map("rate_buckets")  # every filter_xdp has the default size
        memory = {f"rate_buckets ({buckets.max_entries} buckets)": map_memory(buckets)}
    finally:
        for obj in objects:
            obj.close()
    empty = median(samples["empty XDP"])
    return {
        name: {
            "ns_per_packet": round(median(values), 1),
            "over_empty_ns": round(median(values) - empty, 1),
            "rounds": [round(v, 1) for v in values],
        }
        for name, values in samples.items()
    }, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="traffic per scenario")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the scenarios")
    parser.add_argument("--legit-pps", type=int, default=2000, help="legitimate UDP rate")
    parser.add_argument("--flood-ratio", type=int, default=10, help="flood rate / legit rate")
    parser.add_argument("--cost-rounds", type=int, default=5, help="rounds of the cost cases")
    args = parser.parse_args()
    exit_on_sigterm()
    host = machine()
    costs, memory = measure_costs(args.cost_rounds)
    traffic = measure_traffic(args)
    result = {
        "benchmark": "ddos_guard",
        "machine": host,
        "parameters": vars(args),
        "traffic": traffic,
        "per_packet": costs,
        "bucket_map_kernel_bytes": memory,
    }
    summary = [
        f"{name}: legitimate {t['legit_kept_of_no_flood_median']:.1%} of its no-flood rate"
        + (
            f", flood dropped {t['flood_dropped_fraction_median']:.1%}"
            if t["flood_dropped_fraction_median"] is not None
            else ""
        )
        for name, t in traffic.items()
    ] + [f"{name}: {c['ns_per_packet']} ns/packet" for name, c in costs.items()]
    emit(result, summary)


if __name__ == "__main__":
    main()
