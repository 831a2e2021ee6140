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

    python -m bench.filter_cost [--repeat N] [--rounds N]
"""

from __future__ import annotations

import argparse
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_address

from bench._common import (
    RULES,
    TC_ACT_SHOT,
    TC_ACT_UNSPEC,
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
    args = parser.parse_args()
    if args.repeat < 1_000_000:
        parser.error("--repeat must be at least 1,000,000 (shorter runs measure the timer)")
    exit_on_sigterm()
    host = machine()

    prefixes = drop_prefixes(RULES, avoid=SUBNET)
    with ExitStack() as stack:
        cases = build_cases(stack, prefixes)
        for case in cases:  # warm up caches and the trie before timing anything
            test_run(case.prog, case.data, repeat=100_000)
        for _ in range(args.rounds):
            for case in cases:
                case.measure(args.repeat)

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
        },
        "cases": results,
        "targets": [
            {
                "name": f"drop-dst with {RULES} prefixes (miss) <= {TARGET_DROP_DST_RATIO:g}x "
                "the empty XDP program",
                "value": miss,
                "limit": TARGET_DROP_DST_RATIO,
                "met": miss <= TARGET_DROP_DST_RATIO,
            }
        ],
    }
    summary = [f"{'case':48} {'ns/pkt':>7} {'wall':>8} {'x empty':>8}"]
    for name, r in results.items():
        summary.append(
            f"{name:48} {r['ns_per_packet']:7} {r['wall_ns_per_packet']:8.2f} "
            f"{r['ratio_to_empty']:8.2f}"
        )
    t = out["targets"][0]
    summary.append(f"target: {t['name']}: {t['value']:.2f}x -> {'met' if t['met'] else 'MISSED'}")
    emit(out, summary)


if __name__ == "__main__":
    main()
