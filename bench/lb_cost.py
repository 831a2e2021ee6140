"""Per-packet cost of the `membrane lb` XDP program against an empty XDP program, the
cost of building Maglev tables and changing a backend, and Maglev's disruption when a
backend goes, against modulo hashing.

Per-packet cost: BPF_PROG_TEST_RUN of one packet per call (repeat=1), the kernel's
duration of each call, median over --calls calls per case and round, the cases
interleaved in --rounds rounds; each case is reported next to the empty XDP program timed
the same way (ratio, and difference in ns, per round, then the median). A repeated run
(repeat > 1) cannot time a forwarded packet: each repetition sees the packet the previous
one encapsulated (1 of 5 repetitions forwarded, 4 passed as not for a VIP), so repeat is
used only for the pass path, as a cross-check of the single-packet timing.
Cases, with 1 VIP and with 1,000 VIPs (3 backends each, Maglev M = 16381): established
flows (1,000 known to conntrack, one per call in turn, spread over the VIPs), new flows (a
fresh 5-tuple per call: conntrack miss, Maglev slot, conntrack insert), and a packet not
for any VIP (pass). Single-packet runs are colder than a device's busy loop (every call
sets up its packet and the caches see one packet between calls): read the absolute
numbers as an upper bound and compare cases by their difference to the empty program.

    python -m bench.lb_cost [--calls 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bench._common import emit, exit_on_sigterm, machine, median, packet
from bench._trace import bpf_run_time_stats
from membrane.bpf import BpfObject, Program, test_run
from membrane.bpf.links import attach_xdp
from membrane.lb.flowhash import flow_hash
from membrane.lb.frontend import Vip
from membrane.lb.maglev import build_table, modulo_choice
from membrane.lb.tables import LbTables
from membrane.netns import Topology
from membrane.netns.namespace import inside
from membrane.testing.lb import LbTestbed, lb_testbed

XDP_PASS, XDP_TX = 2, 3
LB_IP = "198.18.250.1"
BACKENDS = [f"198.18.250.{i}" for i in range(10, 13)]
SIZE = 16381
MANY_VIPS = 1000


def vip_of(i: int) -> Vip:
    """VIP number i: 198.19.128.0/17 (the ClusterIP range), port 80."""
    return Vip(ipaddress.ip_address(0xC6138000 + i), 80, 6)  # 198.19.128.0 + i


@dataclass
class Case:
    name: str
    prog: Program
    frames: Callable[[int], bytes]  # call number -> the frame of that call
    expect: int
    kernel_ns: list[float] = field(default_factory=list)  # median per round
    calls: int = 0

    def measure(self, bed: LbTestbed, calls: int) -> None:
        durations = []
        # built first: building a frame between runs (scapy) would cool the caches for
        # some cases (new flows) and not others
        frames = [self.frames(self.calls + k) for k in range(calls)]
        self.calls += calls
        for frame in frames:
            result = bed.run(self.prog, frame)
            if result.retval != self.expect:
                raise RuntimeError(f"{self.name}: verdict {result.retval}, not {self.expect}")
            durations.append(result.duration_ns)
        self.kernel_ns.append(median(durations))


def _lb(bed: LbTestbed, vips: int) -> tuple[BpfObject, LbTables]:
    obj = BpfObject.open("lb_xdp").load()
    tables = LbTables(obj.map)
    tables.set_sources(ipaddress.ip_address(LB_IP), None, ifindex=bed.ifindex)
    for i in range(vips):
        tables.add_vip(vip_of(i), SIZE)
        tables.set_backends(vip_of(i), [(ipaddress.ip_address(b), 1) for b in BACKENDS])
    return obj, tables


def _flow(i: int, vip: Vip) -> bytes:
    """Flow number i to `vip`: distinct client address and port for every i."""
    client = ipaddress.ip_address(0xC6120000 + (i // 50_000))  # 198.18.0.0 + ...
    return packet(client, vip.addr, sport=10_000 + i % 50_000, dport=vip.port)


def build_cases(stack: list[BpfObject], bed: LbTestbed, calls: int, rounds: int) -> list[Case]:
    empty = BpfObject.open("bench_empty").load()
    stack.append(empty)
    one, _ = _lb(bed, 1)
    many, _ = _lb(bed, MANY_VIPS)
    stack += [one, many]
    established_many = [_flow(i, vip_of(i % MANY_VIPS)) for i in range(MANY_VIPS)]
    for frame in established_many:  # now known to conntrack
        bed.run(many.program("lb_xdp"), frame)
    # as many established flows to the one VIP, cycled the same way: the two cases
    # differ only in how many VIPs (and tables) the flows spread over
    established_one = [_flow(i, vip_of(0)) for i in range(MANY_VIPS)]
    for frame in established_one:
        bed.run(one.program("lb_xdp"), frame)
    rng = random.Random(4)
    new_vips = [vip_of(rng.randrange(MANY_VIPS)) for _ in range(calls * rounds)]
    other = packet("198.18.7.7", "198.19.0.99", dport=80)
    return [
        Case("empty XDP", empty.program("empty_xdp"), lambda i: established_one[0], XDP_PASS),
        Case("lb, not for a VIP", one.program("lb_xdp"), lambda i: other, XDP_PASS),
        Case(
            "lb 1 VIP, established",
            one.program("lb_xdp"),
            lambda i: established_one[i % MANY_VIPS],
            XDP_TX,
        ),
        Case(
            "lb 1 VIP, new flow",
            one.program("lb_xdp"),
            lambda i: _flow(100_000 + i, vip_of(0)),
            XDP_TX,
        ),
        Case(
            f"lb {MANY_VIPS} VIPs, established",
            many.program("lb_xdp"),
            lambda i: established_many[i % MANY_VIPS],
            XDP_TX,
        ),
        Case(
            f"lb {MANY_VIPS} VIPs, new flow",
            many.program("lb_xdp"),
            lambda i: _flow(100_000 + i, new_vips[i % len(new_vips)]),
            XDP_TX,
        ),
    ]


@dataclass
class TrafficCase:
    """A program attached (generic XDP, as `membrane lb attach` does on a veth) to the LB's
    eth0 while the peer namespace sends it frames through an AF_PACKET socket; its cost is
    the kernel's own accounting of the program (BPF_ENABLE_STATS: run_time_ns / run_cnt)
    over those packets: a warm loop of real packets, unlike single-packet test runs."""

    name: str
    prog: Program
    frames: Callable[[int], bytes]
    ns_per_packet: list[float] = field(default_factory=list)
    sent: int = 0

    def measure(self, bed: LbTestbed, sender: socket.socket, packets: int) -> None:
        frames = [self.frames(self.sent + k) for k in range(packets)]  # built first
        self.sent += packets
        with inside(bed.ns):
            link, _ = attach_xdp(self.prog, bed.ifindex, "generic")
        try:
            before = _run_stats(self.prog.fd)
            for frame in frames:
                sender.send(frame)
            after = _run_stats(self.prog.fd)
        finally:
            link.detach()
            link.close()
        runs = after[1] - before[1]
        if runs < packets * 0.99:  # the program must have seen (nearly) every packet
            raise RuntimeError(f"{self.name}: {runs} runs for {packets} packets sent")
        self.ns_per_packet.append((after[0] - before[0]) / runs)


def _run_stats(prog_fd: int) -> tuple[int, int]:
    """run_time_ns and run_cnt of a program we hold an fd of (its fdinfo)."""
    with open(f"/proc/self/fdinfo/{prog_fd}") as f:
        info = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    return int(info["run_time_ns"]), int(info["run_cnt"])


def traffic_cases(cases: list[Case]) -> list[TrafficCase]:
    """The same programs and frames as the single-packet cases (their frames continue
    where those left off, so new flows stay new)."""
    return [
        TrafficCase(c.name, c.prog, lambda i, c=c: c.frames(c.calls + 1_000_000 + i)) for c in cases
    ]


def measure_traffic(
    bed: LbTestbed, peer: str, cases: list[TrafficCase], packets: int, rounds: int
) -> dict[str, dict[str, float]]:
    with inside(peer):
        sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sender.bind(("eth0", 0))
    try:
        with bpf_run_time_stats():
            for case in cases:  # warm up (and attach once each)
                case.measure(bed, sender, 1000)
                case.ns_per_packet.clear()
            for _ in range(rounds):
                for case in cases:
                    case.measure(bed, sender, packets)
    finally:
        sender.close()
    base = cases[0].ns_per_packet
    return {
        c.name: {
            "ns_per_packet": round(median(c.ns_per_packet), 1),
            "ratio_to_empty": round(
                median([a / b for a, b in zip(c.ns_per_packet, base, strict=True)]), 2
            ),
            "ns_over_empty": round(
                median([a - b for a, b in zip(c.ns_per_packet, base, strict=True)]), 1
            ),
            "rounds_ns": [round(v, 1) for v in c.ns_per_packet],
        }
        for c in cases
    }


def repeated_pass(cases: list[Case], repeat: int, rounds: int) -> dict[str, float]:
    """The pass path timed with repeat (valid there: the packet is not changed)."""
    empty, lb_pass = cases[0], cases[1]
    ratios, lb_ns, empty_ns = [], [], []
    for _ in range(rounds):
        e = test_run(empty.prog, empty.frames(0), repeat=repeat).duration_ns
        p = test_run(lb_pass.prog, lb_pass.frames(0), repeat=repeat).duration_ns
        ratios.append(p / e)
        lb_ns.append(p)
        empty_ns.append(e)
    return {
        "repeat": repeat,
        "empty_ns_per_packet": median(empty_ns),
        "lb_pass_ns_per_packet": median(lb_ns),
        "ratio_to_empty": round(median(ratios), 2),
    }


def time_builds() -> dict[str, float]:
    out = {}
    for n, size in ((3, SIZE), (10, SIZE), (100, SIZE), (1000, SIZE), (100, 65537)):
        names = [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(n)]
        times = []
        for _ in range(3):
            start = time.perf_counter()
            build_table(names, size)
            times.append((time.perf_counter() - start) * 1e3)
        out[f"{n} backends, M={size}"] = round(min(times), 2)
    return out


def time_backend_changes(bed: LbTestbed, changes: int) -> dict[str, float]:
    """A backend added and removed on a live LB (10 backends, M=16381): build, a new
    inner map filled, the switch, the records; median and max of `changes` of each."""
    obj, tables = _lb(bed, 1)
    try:
        vip = vip_of(0)
        tables.set_backends(
            vip, [(ipaddress.ip_address(f"198.18.251.{i}"), 1) for i in range(1, 8)]
        )
        add, remove = [], []
        extra = ipaddress.ip_address("198.18.251.200")
        for _ in range(changes):
            start = time.perf_counter()
            tables.set_backend(vip, extra, 1)
            add.append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            tables.remove_backend(vip, extra)
            remove.append((time.perf_counter() - start) * 1e3)
        return {
            "add_median_ms": round(median(add), 2),
            "add_max_ms": round(max(add), 2),
            "remove_median_ms": round(median(remove), 2),
            "remove_max_ms": round(max(remove), 2),
        }
    finally:
        obj.close()


def disruption(flows: int) -> list[dict[str, float]]:
    """Remove one of N backends: the share of slots and of random flows (hashed as the
    datapath hashes them) that change backend, against hash % N."""
    rng = random.Random(11)
    src = [ipaddress.IPv4Address(rng.randrange(0xC6120000, 0xC6140000)) for _ in range(flows)]
    dst = [ipaddress.IPv4Address("198.19.128.1")] * flows
    hashes = flow_hash(
        src, dst, [rng.randrange(1024, 65536) for _ in range(flows)], [80] * flows, [6] * flows
    )
    out = []
    for n, size in ((3, SIZE), (10, SIZE), (30, SIZE), (100, SIZE), (100, 65537), (1000, 65537)):
        names = [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(n)]
        gone = names[n // 2]
        rest = [x for x in names if x != gone]
        before = np.array(names)[build_table(names, size)]
        after = np.array(rest)[build_table(rest, size)]
        slots = hashes % np.uint32(size)
        modulo = modulo_choice(hashes, n) != modulo_choice(hashes, n - 1)
        moved = float((before[slots] != after[slots]).mean())
        out.append(
            {
                "backends": n,
                "maglev_size": size,
                "slots_moved": round(float((before != after).mean()), 4),
                "flows_moved": round(moved, 4),
                "minimum": round(1 / n, 4),
                "bound_1_over_n_plus_1pct": round(1 / n + 0.01, 4),
                "met": moved <= 1 / n + 0.01,
                "modulo_flows_moved": round(float(modulo.mean()), 4),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--calls", type=int, default=20_000, help="single-packet runs per case and round"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the cases")
    parser.add_argument(
        "--repeat", type=int, default=2_000_000, help="repeat of the pass-path cross-check"
    )
    parser.add_argument(
        "--packets", type=int, default=20_000, help="real packets per traffic case and round"
    )
    parser.add_argument(
        "--flows", type=int, default=100_000, help="random flows of the disruption test"
    )
    args = parser.parse_args()
    exit_on_sigterm()
    host = machine()
    objects: list[BpfObject] = []
    with Topology("mlbbench") as topo:
        bed = lb_testbed(topo, [f"{LB_IP}/24"], BACKENDS)
        try:
            cases = build_cases(objects, bed, args.calls, args.rounds)
            for case in cases:  # warm up
                case.measure(bed, 1000)
                case.kernel_ns.clear()
            for _ in range(args.rounds):
                for case in cases:
                    case.measure(bed, args.calls)
            with_repeat = repeated_pass(cases, args.repeat, args.rounds)
            traffic = measure_traffic(
                bed, f"{topo.tag}-peer", traffic_cases(cases), args.packets, args.rounds
            )
            changes = time_backend_changes(bed, 20)
        finally:
            for obj in objects:
                obj.close()
    base = cases[0]
    per_packet = {
        c.name: {
            "ns_per_packet": round(median(c.kernel_ns), 1),
            "ratio_to_empty": round(
                median([a / b for a, b in zip(c.kernel_ns, base.kernel_ns, strict=True)]), 2
            ),
            "ns_over_empty": round(
                median([a - b for a, b in zip(c.kernel_ns, base.kernel_ns, strict=True)]), 1
            ),
            "rounds_ns": c.kernel_ns,
        }
        for c in cases
    }
    result = {
        "machine": host,
        "method": f"test-run, repeat=1, median of {args.calls} calls x {args.rounds} rounds",
        "per_packet": per_packet,
        "pass_path_with_repeat": with_repeat,
        "traffic_method": "generic XDP on the LB's veth, frames sent by the peer through "
        f"AF_PACKET, BPF_ENABLE_STATS run time per run, {args.packets} packets x "
        f"{args.rounds} rounds",
        "per_packet_traffic": traffic,
        "maglev_build_ms": time_builds(),
        "backend_change": changes,
        "disruption": disruption(args.flows),
    }
    summary = [
        f"{name}: {v['ns_per_packet']} ns, {v['ratio_to_empty']}x empty, +{v['ns_over_empty']} ns"
        for name, v in per_packet.items()
    ]
    summary.append(f"pass path (repeat): {with_repeat['ratio_to_empty']}x empty")
    summary += [
        f"traffic {name}: {v['ns_per_packet']} ns, {v['ratio_to_empty']}x empty, "
        f"+{v['ns_over_empty']} ns"
        for name, v in traffic.items()
    ]
    summary += [f"maglev build {k}: {v} ms" for k, v in result["maglev_build_ms"].items()]
    summary.append(f"backend change: {changes}")
    summary += [
        f"disruption N={d['backends']} M={d['maglev_size']}: maglev {d['flows_moved']} "
        f"(bound {d['bound_1_over_n_plus_1pct']}, met {d['met']}), modulo {d['modulo_flows_moved']}"
        for d in result["disruption"]
    ]
    emit(result, summary)


if __name__ == "__main__":
    main()
