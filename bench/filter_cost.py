"""Per-packet cost of the filter programs, measured in the kernel with BPF_PROG_TEST_RUN.

Each case runs one program `--repeat` times on one packet (a 64-byte-payload TCP/IPv4
segment built with scapy); rounds interleave the cases so that drift on a shared machine
hits all of them alike, and each case reports the median over rounds. Costs are compared
as ratios to an empty program on the same hook, measured in the same run.

Cases: empty XDP and tc programs; filter_xdp drop-dst with 10,000 IPv4 prefixes (a miss,
and a hit) and with an empty map (the program's own cost, without the trie); filter_xdp
drop-proto (a miss, and a hit); filter_tc allow-only with a guarded port and 10,000
allowed flows (an allowed packet, and a denied one). Events are off (emit_events=false):
a test run has no consumer to drain the ring buffer.

The drop-dst miss above is the best case: its /24 holds no prefix, so the /24 summary
answers without the trie. Beside it, drop-dst is measured over uniform random samples of
destination addresses: --sample addresses drawn uniformly from those of 198.18.0.0/15 that
no prefix covers (misses), and as many from those one does (hits), and beside them 40
addresses of the free /24 (the best case, measured the same way); each address is one
test run of --sample-repeat packets in each of --sample-rounds rounds (the addresses
shuffled every round), its cost the median over rounds; reported as p50/p99 over the
addresses.

    python -m bench.filter_cost [--repeat N] [--rounds N] [--sample N]
        [--sample-repeat N] [--sample-rounds N]
"""

from __future__ import annotations

import argparse
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_address
from typing import Any

import numpy as np

from bench._common import (
    RULES,
    TC_ACT_SHOT,
    TC_ACT_UNSPEC,
    TEST_RANGE,
    XDP_DROP,
    XDP_PASS,
    drop_prefixes,
    emit,
    exit_on_sigterm,
    fill_drop_dst,
    machine,
    median,
    packet,
)
from membrane.bpf import BpfObject, Program, test_run
from membrane.filter.keys import flow_key
from membrane.filter.rules import AllowedFlow

SUBNET = IPv4Network("198.18.200.0/24")  # the measured packets' addresses; no rule covers it
CLIENT, SERVER, STRANGER = SUBNET[1], SUBNET[2], SUBNET[3]
TARGET_DROP_DST_RATIO = 3.0
BEST_CASE_SAMPLE = 40  # addresses of SUBNET measured like the uniform samples
IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, IPPROTO_GRE = 6, 17, 132, 47
HOOK_TC_INGRESS = 2


@dataclass
class Case:
    name: str
    hook: str  # xdp or tc: which empty program it is compared with
    prog: Program
    data: bytes
    expect: int  # the verdict the program must return, or the measurement means nothing
    kernel_ns: list[int] = field(default_factory=list)  # the kernel's mean, per round
    wall_ns: list[float] = field(default_factory=list)  # syscall wall time / repeat

    def measure(self, repeat: int) -> None:
        start = time.perf_counter_ns()
        result = test_run(self.prog, self.data, repeat=repeat)
        elapsed = time.perf_counter_ns() - start
        if result.retval != self.expect:
            raise RuntimeError(f"{self.name}: verdict {result.retval}, expected {self.expect}")
        self.kernel_ns.append(result.duration_ns)
        self.wall_ns.append(elapsed / repeat)


def _open(stack: ExitStack, name: str, **config: object) -> BpfObject:
    obj = stack.enter_context(BpfObject.open(name))
    if config:
        obj.set_config(**config)
    return obj.load()


def _drop_dst(stack: ExitStack, prefixes: list[IPv4Network]) -> Program:
    obj = _open(
        stack, "filter_xdp", enable_drop_dst=True, enable_drop_proto=False, emit_events=False
    )
    fill_drop_dst(obj, prefixes)
    return obj.program("filter_xdp")


def _uncovered_neighbour(prefixes: list[IPv4Network]) -> IPv4Address:
    """An address no prefix covers whose /24 holds a listed /32: the summary says "maybe"
    and the lookup walks the whole trie to miss (the worst case for a non-matching packet)."""
    for net in prefixes:
        if net.prefixlen == 32:
            candidate = net.network_address + 1
            if not any(candidate in p for p in prefixes):
                return candidate
    raise RuntimeError("no /32 with an uncovered neighbour")


# ---- drop-dst over uniform random samples of destinations -----------------------------------
@dataclass
class Sample:
    """One drop-dst program on many destinations, one test run each."""

    name: str
    prog: Program
    addresses: list[IPv4Address]
    expect: int
    summary_no: float  # share of the addresses whose /24 holds no prefix (no trie walk)
    population: int  # how many addresses of the test range it was drawn from
    ns: dict[IPv4Address, list[int]] = field(default_factory=dict)  # per address, per round

    def measure(self, repeat: int, rng: random.Random) -> None:
        for address in rng.sample(self.addresses, len(self.addresses)):
            result = test_run(self.prog, packet(CLIENT, address), repeat=repeat)
            if result.retval != self.expect:
                raise RuntimeError(f"{self.name} {address}: verdict {result.retval}")
            self.ns.setdefault(address, []).append(result.duration_ns)

    def per_address(self) -> list[float]:
        return [median(v) for v in self.ns.values()]


def uniform_samples(
    prefixes: list[IPv4Network], count: int, seed: int = 3
) -> tuple[list[IPv4Address], list[IPv4Address], dict[str, Any]]:
    """`count` addresses drawn uniformly from the test range's addresses that no prefix
    covers (misses), as many from those that one covers (hits), and what the draw saw."""
    base, size = int(TEST_RANGE.network_address), TEST_RANGE.num_addresses
    covered = bytearray(size)
    for net in prefixes:
        start = int(net.network_address) - base
        covered[start : start + net.num_addresses] = b"\1" * net.num_addresses
    rng = random.Random(seed)
    found: dict[bool, set[int]] = {False: set(), True: set()}
    uncovered = size - sum(covered)
    wanted = {False: min(count, uncovered), True: min(count, size - uncovered)}
    while any(len(found[k]) < wanted[k] for k in found):
        offset = rng.randrange(size)
        if len(found[bool(covered[offset])]) < wanted[bool(covered[offset])]:
            found[bool(covered[offset])].add(offset)
    misses, hits = ([IPv4Address(base + i) for i in sorted(found[k])] for k in (False, True))
    return misses, hits, {"addresses_in_range": size, "uncovered": uncovered}


def _summary_no(prefixes: list[IPv4Network], addresses: list[IPv4Address]) -> float:
    touched = {int(n.network_address) >> 8 for n in prefixes if n.prefixlen >= 24}
    touched |= {
        (int(n.network_address) >> 8) + i for n in prefixes if n.prefixlen < 24
        for i in range(1 << (24 - n.prefixlen))
    }  # fmt: skip
    return round(sum(int(a) >> 8 not in touched for a in addresses) / len(addresses), 3)


def build_samples(stack: ExitStack, prefixes: list[IPv4Network], count: int) -> list[Sample]:
    """The uniform samples, and beside them the best case measured the same way: addresses
    of the /24 no prefix touches (the summary answers, no trie walk)."""
    dst = _drop_dst(stack, prefixes)
    misses, hits, seen = uniform_samples(prefixes, count)
    free = random.Random(4).sample(list(SUBNET.hosts()), min(count, BEST_CASE_SAMPLE))
    n = len(prefixes)
    return [
        Sample(f"drop-dst {n} prefixes, miss, uniform sample", dst, misses, XDP_PASS,
               _summary_no(prefixes, misses), seen["uncovered"]),
        Sample(f"drop-dst {n} prefixes, miss in the free /24 (best case)", dst, free, XDP_PASS,
               _summary_no(prefixes, free), SUBNET.num_addresses - 2),
        Sample(f"drop-dst {n} prefixes, hit, uniform sample", dst, hits, XDP_DROP,
               _summary_no(prefixes, hits), seen["addresses_in_range"] - seen["uncovered"]),
    ]  # fmt: skip


def build_cases(stack: ExitStack, prefixes: list[IPv4Network]) -> list[Case]:
    tcp = packet(CLIENT, SERVER)
    udp = packet(CLIENT, SERVER, proto="udp")
    empty = _open(stack, "bench_empty")
    dst, dst_unfilled = _drop_dst(stack, prefixes), _drop_dst(stack, [])
    hit = packet(CLIENT, prefixes[len(prefixes) // 2].network_address)
    near_miss = packet(CLIENT, _uncovered_neighbour(prefixes))

    proto = _open(
        stack, "filter_xdp", enable_drop_dst=False, enable_drop_proto=True, emit_events=False
    )
    proto.map("drop_proto").update_batch([(IPPROTO_UDP, 1), (IPPROTO_SCTP, 2), (IPPROTO_GRE, 3)])

    allow = _open(
        stack, "filter_tc", enable_allow_only=True, hook=HOOK_TC_INGRESS, emit_events=False
    )
    flows = allow.map("allow_flows")
    peers = [str(net.network_address) for net in prefixes[: RULES - 1]] + [str(CLIENT)]
    flows.update_batch(
        (flow_key(flows, AllowedFlow(ip_address(src), SERVER, 5201, IPPROTO_TCP)), i)
        for i, src in enumerate(peers, 2)
    )
    guards = allow.map("allow_guard")
    guards.update(guards.key_type(protocol=IPPROTO_TCP, port=5201), 1)
    denied = packet(STRANGER, SERVER)

    n, xdp, tc = len(prefixes), empty.program("empty_xdp"), empty.program("empty_tc")
    return [
        Case("empty XDP", "xdp", xdp, tcp, XDP_PASS),
        Case("drop-dst 0 prefixes, miss", "xdp", dst_unfilled, tcp, XDP_PASS),
        Case(f"drop-dst {n} prefixes, miss", "xdp", dst, tcp, XDP_PASS),
        Case(f"drop-dst {n} prefixes, miss in a listed /24", "xdp", dst, near_miss, XDP_PASS),
        Case(f"drop-dst {n} prefixes, hit", "xdp", dst, hit, XDP_DROP),
        Case("drop-proto, miss", "xdp", proto.program("filter_xdp"), tcp, XDP_PASS),
        Case("drop-proto, hit", "xdp", proto.program("filter_xdp"), udp, XDP_DROP),
        Case("empty tc", "tc", tc, tcp, TC_ACT_UNSPEC),
        Case(
            f"allow-only {len(peers)} flows, allowed",
            "tc",
            allow.program("filter_tc"),
            tcp,
            TC_ACT_UNSPEC,
        ),
        Case(
            f"allow-only {len(peers)} flows, denied",
            "tc",
            allow.program("filter_tc"),
            denied,
            TC_ACT_SHOT,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2_000_000, help="packets per test run")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved runs per case")
    parser.add_argument("--sample", type=int, default=400, help="addresses per uniform sample")
    parser.add_argument(
        "--sample-repeat", type=int, default=20_000, help="packets per test run of a sample"
    )
    parser.add_argument("--sample-rounds", type=int, default=3, help="runs per sampled address")
    args = parser.parse_args()
    if args.repeat < 1_000_000:
        parser.error("--repeat must be at least 1,000,000 (shorter runs measure the timer)")
    exit_on_sigterm()
    host = machine()

    prefixes = drop_prefixes(RULES, avoid=SUBNET)
    rng = random.Random(5)
    with ExitStack() as stack:
        cases = build_cases(stack, prefixes)
        samples = build_samples(stack, prefixes, args.sample)
        for case in cases:  # warm up caches and the trie before timing anything
            test_run(case.prog, case.data, repeat=100_000)
        for _ in range(args.rounds):
            for case in cases:
                case.measure(args.repeat)
        for _ in range(args.sample_rounds):
            for sample in samples:
                sample.measure(args.sample_repeat, rng)

    empty = {c.hook: c for c in cases if c.name.startswith("empty")}
    results = {}
    for c in cases:
        base = empty[c.hook]
        results[c.name] = {
            "hook": c.hook,
            "verdict": c.expect,
            "ns_per_packet": median(c.kernel_ns),
            "wall_ns_per_packet": round(median(c.wall_ns), 2),
            # per round against the empty program of the same round, then the median:
            # drift between rounds cancels out
            "ratio_to_empty": round(
                median([a / b for a, b in zip(c.kernel_ns, base.kernel_ns, strict=True)]), 2
            ),
            "rounds_ns": c.kernel_ns,
            "rounds_wall_ns": [round(v, 2) for v in c.wall_ns],
        }
    miss = results[f"drop-dst {RULES} prefixes, miss"]["ratio_to_empty"]
    empty_xdp = median(empty["xdp"].kernel_ns)
    sampled = {}
    for sample in samples:
        costs = sample.per_address()
        p50, p99 = (float(np.percentile(costs, q)) for q in (50, 99))
        sampled[sample.name] = {
            "hook": "xdp",
            "verdict": sample.expect,
            "addresses": len(sample.addresses),
            "drawn_from": sample.population,
            "summary_says_no": sample.summary_no,
            "p50_ns_per_packet": round(p50, 1),
            "p99_ns_per_packet": round(p99, 1),
            "min_ns_per_packet": min(costs),
            "max_ns_per_packet": max(costs),
            # against the empty XDP program's median over the rounds of the cases above
            "p50_x_empty": round(p50 / empty_xdp, 2),
            "p99_x_empty": round(p99 / empty_xdp, 2),
        }
    uniform_miss = sampled[f"drop-dst {RULES} prefixes, miss, uniform sample"]["p50_x_empty"]
    out = {
        "bench": "filter_cost",
        "machine": host,
        "method": {
            "tool": "BPF_PROG_TEST_RUN",
            "repeat": args.repeat,
            "rounds": args.rounds,
            "statistic": "median over rounds",
            "ns_per_packet": "the kernel's mean per repetition (whole ns; time the task "
            "spent scheduled out is excluded)",
            "wall_ns_per_packet": "wall time of the test-run syscall / repeat (includes time "
            "scheduled out: noisy on a shared machine, shown for reference)",
            "ratio_to_empty": "median over rounds of (case / empty program of that round)",
            "packet_bytes": len(packet(CLIENT, SERVER)),
            "rules": RULES,
            "samples": {
                "addresses": "uniform random draws (fixed seed) from the addresses of "
                f"{TEST_RANGE} that no prefix covers (miss) or that one covers (hit)",
                "repeat": args.sample_repeat,
                "rounds": args.sample_rounds,
                "statistic": "per address the median over rounds of the kernel's mean; "
                "p50/p99 over the addresses",
                "summary_says_no": "share of the sampled addresses whose /24 holds no "
                "prefix: answered by the summary without walking the trie",
            },
        },
        "cases": results,
        "sampled": sampled,
        "targets": [
            {
                "name": f"drop-dst with {RULES} prefixes (miss, best case: a /24 without "
                f"prefixes) <= {TARGET_DROP_DST_RATIO:g}x the empty XDP program",
                "value": miss,
                "limit": TARGET_DROP_DST_RATIO,
                "met": miss <= TARGET_DROP_DST_RATIO,
            },
            {
                "name": f"drop-dst with {RULES} prefixes (miss, p50 over a uniform sample of "
                f"missing destinations) <= {TARGET_DROP_DST_RATIO:g}x the empty XDP program",
                "value": uniform_miss,
                "limit": TARGET_DROP_DST_RATIO,
                "met": uniform_miss <= TARGET_DROP_DST_RATIO,
            },
        ],
    }
    w = max(map(len, [*results, *sampled]))
    summary = [f"{'case':{w}} {'ns/pkt':>7} {'wall':>8} {'x empty':>8}"]
    for name, r in results.items():
        summary.append(
            f"{name:{w}} {r['ns_per_packet']:7} {r['wall_ns_per_packet']:8.2f} "
            f"{r['ratio_to_empty']:8.2f}"
        )
    summary.append(f"{'uniform samples':{w}} {'p50':>7} {'p99':>8} {'p50 x':>8} {'p99 x':>6}")
    for name, r in sampled.items():
        summary.append(
            f"{name:{w}} {r['p50_ns_per_packet']:7} {r['p99_ns_per_packet']:8} "
            f"{r['p50_x_empty']:8.2f} {r['p99_x_empty']:6.2f}"
        )
    for t in out["targets"]:
        verdict = "met" if t["met"] else "MISSED"
        summary.append(f"target: {t['name']}: {t['value']:.2f}x -> {verdict}")
    emit(out, summary)


if __name__ == "__main__":
    main()
