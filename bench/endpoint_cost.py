"""Per-packet cost of the endpoint (pod) programs, measured in the kernel with
BPF_PROG_TEST_RUN, on node maps holding what a busy node holds.

Maps: the ipcache holds 10,000 CIDR prefixes (each with a CIDR identity of its own), 1,000
pods and the measured endpoint; the endpoint's policy enforces both directions and allows
TCP port 5201 to and from every one of the 10,000 CIDR identities and the 1,000 pod
identities (22,000 policy entries: 11,000 identities in two directions). Events are on,
as in the product: new flows emit one event each, which the benchmark drains between
cases (and checks that none was lost, so no number comes from the ring-full path).

Cases, for from_container (the pod's egress) and to_container (the pod's ingress):
  established      a data segment of a connection tracked since its handshake (one
                   packet, run `--repeat` times): conntrack hit, no policy lookup
  reply            the other direction's data segment of a connection the other program
                   opened: conntrack miss on the packet's tuple, hit on the reversed one
  new flow, hot    a SYN+FIN, 10,000 times per test run: the FIN marks the connection
                   closing, so the next SYN on the tuple opens a new one and every
                   repetition takes the whole new-flow path (ipcache, policy, conntrack
                   insert, event) with the caches hot
  new flow, cold   SYNs of distinct connections (to/from pods, to/from CIDR peers), one
                   packet per test run: the same path with the caches as the Python loop
                   between runs leaves them
Baselines: the empty tc program of bench_empty.bpf.o, with `--repeat` runs of one packet,
and with one packet per run on the very frames of each cold new-flow case, alternating
frame by frame with the endpoint program (a run of one packet includes the kernel's timer
overhead, so cold new flows are compared with a run of one packet).

    python -m bench.endpoint_cost [--repeat N] [--rounds N] [--flows N]
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from bench._common import RULES, TC_ACT_UNSPEC, drop_prefixes, emit, exit_on_sigterm, machine
from bench._common import median as _median
from membrane.abi import Direction, IpProto
from membrane.bpf import BpfObject, Program, test_run
from membrane.bpf.fs import PIN_ROOT, ensure_bpffs
from membrane.bpf.ringbuf import RingBuffer
from membrane.datapath import EndpointPolicy, Identity, NodeMaps, PolicyWriter, load_endpoint
from membrane.datapath.abi import PROG_FROM_CONTAINER, PROG_TO_CONTAINER
from membrane.datapath.ipcache import sync_ipcache
from membrane.datapath.policy_entries import PolicyEntry

TC_ACT_OK = 0
PODS = 1_000
POD_NET = IPv4Network("198.18.0.0/22")  # the pods; no CIDR prefix covers it
EP_ID, EP_IP = 1, POD_NET[2]
PEER_IPS = [POD_NET[3 + i] for i in range(PODS)]
PEER_EP_IDS = range(2, 2 + PODS)
EP_IDENTITY = int(Identity.FIRST_ENDPOINT)
PEER_IDENTITIES = [EP_IDENTITY + 1 + i for i in range(PODS)]
CIDR_IDENTITY = int(Identity.FIRST_CIDR)
PORT = 5201
HOT_NEW_FLOW_REPEAT = 10_000  # flow events per test run; the 1 MiB ring holds ~14,500
NEW_FLOW_SPORT = 41000
TCP = IpProto.TCP
SYN, ACK, SYNACK, SYNFIN = "S", "A", "SA", "SF"
RULE_CIDR, RULE_PODS = 1, 2
TARGET_ESTABLISHED_RATIO = 10.0


def segment(
    src: IPv4Address, dst: IPv4Address, sport: int, dport: int, flags: str, payload: int = 0
) -> bytes:
    """Ethernet/IPv4/TCP with timestamps, as a Linux peer sends it."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    frame = (
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IP(src=str(src), dst=str(dst), ttl=64)
        / TCP(
            sport=sport,
            dport=dport,
            flags=flags,
            seq=1,
            ack=1 if "A" in flags else 0,
            options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 1))],
        )
        / (b"\xa5" * payload)
    )
    return bytes(frame)


@contextmanager
def node_maps() -> Iterator[NodeMaps]:
    """Fresh node maps pinned under /sys/fs/bpf/membrane/bench-<random>, removed after."""
    ensure_bpffs()
    pin_dir = os.path.join(PIN_ROOT, f"bench-{secrets.token_hex(4)}")
    try:
        with NodeMaps.open(pin_dir) as maps:
            yield maps
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)


def fill(maps: NodeMaps, prefixes: Sequence[IPv4Network]) -> int:
    """The ipcache and the endpoint's policy; returns the number of policy entries."""
    ipcache = {net: (CIDR_IDENTITY + i, 0) for i, net in enumerate(prefixes)}
    ipcache[IPv4Network(f"{EP_IP}/32")] = (EP_IDENTITY, EP_ID)
    for ip, ident, ep in zip(PEER_IPS, PEER_IDENTITIES, PEER_EP_IDS, strict=True):
        ipcache[IPv4Network(f"{ip}/32")] = (ident, ep)
    sync_ipcache(maps, ipcache)
    peers = [(CIDR_IDENTITY + i, RULE_CIDR) for i in range(len(prefixes))]
    peers += [(ident, RULE_PODS) for ident in PEER_IDENTITIES]
    entries = [
        PolicyEntry(d, ident, TCP, PORT, 16, False, rule)
        for d in Direction
        for ident, rule in peers
    ]
    PolicyWriter(maps).apply({EP_ID: EndpointPolicy(True, True, entries)}, {EP_ID: EP_IDENTITY})
    held = len(maps.policy)
    if held != len(entries):
        raise RuntimeError(f"the policy map holds {held} entries, expected {len(entries)}")
    return held


@dataclass
class Case:
    """One program on one packet, `repeat` times per test run (a case that opens a new
    flow on every packet runs `HOT_NEW_FLOW_REPEAT` times: one event each must fit in
    the ring)."""

    name: str
    prog: Program
    data: bytes
    expect: int
    new_flow_per_packet: bool = False
    kernel_ns: list[float] = field(default_factory=list)
    wall_ns: list[float] = field(default_factory=list)

    def measure(self, repeat: int) -> int:
        """Run and record; returns the repetitions run."""
        if self.new_flow_per_packet:
            repeat = min(repeat, HOT_NEW_FLOW_REPEAT)
        start = time.perf_counter_ns()
        result = test_run(self.prog, self.data, repeat=repeat)
        elapsed = time.perf_counter_ns() - start
        if result.retval != self.expect:
            raise RuntimeError(f"{self.name}: verdict {result.retval}, expected {self.expect}")
        self.kernel_ns.append(result.duration_ns)
        self.wall_ns.append(elapsed / repeat)
        return repeat


@dataclass
class NewFlows:
    """The first packets of `len(frames(round))` distinct connections, one per test run,
    each paired with the empty program on the same frame (run just before it)."""

    name: str
    prog: Program
    frames: list[bytes]
    kernel_ns: list[float] = field(default_factory=list)  # mean over the round's frames
    empty_ns: list[float] = field(default_factory=list)
    events: int = 0

    def measure(self, empty: Program) -> None:
        ours = base = 0
        for data in self.frames:
            base += test_run(empty, data, repeat=1).duration_ns
            result = test_run(self.prog, data, repeat=1)
            if result.retval != TC_ACT_OK:
                raise RuntimeError(f"{self.name}: verdict {result.retval}, expected pass")
            ours += result.duration_ns
        self.kernel_ns.append(ours / len(self.frames))
        self.empty_ns.append(base / len(self.frames))


class Bench:
    def __init__(self, stack: ExitStack, maps: NodeMaps, prefixes: list[IPv4Network]) -> None:
        self.maps = maps
        self.prefixes = prefixes
        self.entries = fill(maps, prefixes)
        obj = stack.enter_context(load_endpoint(maps.pin_dir, EP_ID, EP_IP))
        self.egress, self.ingress = obj.program(PROG_FROM_CONTAINER), obj.program(PROG_TO_CONTAINER)
        self.empty = stack.enter_context(BpfObject.open("bench_empty")).load().program("empty_tc")
        self.ring = stack.enter_context(
            RingBuffer(maps.events, dtype=maps.flow_event_dtype(), lost_map=maps.events_lost)
        )
        self.out_peer, self.in_peer = PEER_IPS[PODS // 2], PEER_IPS[PODS // 3]
        # source ports of the two tracked connections (new flows use NEW_FLOW_SPORT up)
        self.out_sport, self.in_sport = 40000, 40001

    # ---- the tracked connections ---------------------------------------------------------
    def handshakes(self) -> None:
        """Empty the conntrack table, then open one connection each way (SYN, SYN-ACK, ACK
        through both programs), so that every round starts from the same table and the
        established and reply cases find what a real connection leaves behind."""
        self.maps.ct.clear()
        for opener, answerer, client, server, sport in (
            (self.egress, self.ingress, EP_IP, self.out_peer, self.out_sport),
            (self.ingress, self.egress, self.in_peer, EP_IP, self.in_sport),
        ):
            for prog, src, dst, sp, dp, flags in (
                (opener, client, server, sport, PORT, SYN),
                (answerer, server, client, PORT, sport, SYNACK),
                (opener, client, server, sport, PORT, ACK),
            ):
                verdict = test_run(prog, segment(src, dst, sp, dp, flags), repeat=1).retval
                if verdict != TC_ACT_OK:
                    raise RuntimeError(f"handshake {src}->{dst} {flags}: verdict {verdict}")
        self.drain()

    def drain(self) -> int:
        events = len(self.ring.drain())
        if self.ring.lost:
            raise RuntimeError(f"{self.ring.lost} flow events lost: the ring was full")
        return events

    # ---- cases ---------------------------------------------------------------------------
    def cases(self) -> list[Case]:
        data = 64
        ep, out_peer, in_peer = EP_IP, self.out_peer, self.in_peer
        return [
            Case("empty tc", self.empty, segment(ep, out_peer, 1, PORT, ACK, data), TC_ACT_UNSPEC),
            Case(
                "from_container, established",
                self.egress,
                segment(ep, out_peer, self.out_sport, PORT, ACK, data),
                TC_ACT_OK,
            ),
            Case(
                "to_container, reply",
                self.ingress,
                segment(out_peer, ep, PORT, self.out_sport, ACK, data),
                TC_ACT_OK,
            ),
            Case(
                "to_container, established",
                self.ingress,
                segment(in_peer, ep, self.in_sport, PORT, ACK, data),
                TC_ACT_OK,
            ),
            Case(
                "from_container, reply",
                self.egress,
                segment(ep, in_peer, PORT, self.in_sport, ACK, data),
                TC_ACT_OK,
            ),
            # SYN+FIN: conntrack marks the connection closing at once, so the next SYN on
            # the tuple is a new connection again: every repetition takes the whole
            # new-flow path (verdict, conntrack insert, event) with hot caches.
            Case(
                "from_container, new flow, hot caches",
                self.egress,
                segment(ep, out_peer, NEW_FLOW_SPORT - 1, PORT, SYNFIN),
                TC_ACT_OK,
                new_flow_per_packet=True,
            ),
            Case(
                "to_container, new flow, hot caches",
                self.ingress,
                segment(in_peer, ep, NEW_FLOW_SPORT - 1, PORT, SYNFIN),
                TC_ACT_OK,
                new_flow_per_packet=True,
            ),
        ]

    def new_flows(self, count: int) -> list[NewFlows]:
        """SYNs of `count` new connections per case: to or from pods (a /32 in the
        ipcache, peers drawn at random) and CIDR peers (an address inside a listed prefix).
        The same frames serve every round: each round starts with an empty table."""
        rng = random.Random(11)
        cidr_ips = [net[net.num_addresses // 2] for net in self.prefixes]
        if NEW_FLOW_SPORT + count > 0xFFFF:
            raise ValueError(f"--flows must be at most {0xFFFF - NEW_FLOW_SPORT}")

        def syns(outbound: bool, peers: list[IPv4Address]) -> list[bytes]:
            out = []
            for i in range(count):
                peer, sport = rng.choice(peers), NEW_FLOW_SPORT + i
                src, dst = (EP_IP, peer) if outbound else (peer, EP_IP)
                out.append(segment(src, dst, sport, PORT, SYN))
            return out

        return [
            NewFlows("from_container, new flow to a pod, cold", self.egress, syns(True, PEER_IPS)),
            NewFlows(
                "to_container, new flow from a pod, cold", self.ingress, syns(False, PEER_IPS)
            ),
            NewFlows(
                "from_container, new flow to a CIDR peer, cold", self.egress, syns(True, cidr_ips)
            ),
            NewFlows(
                "to_container, new flow from a CIDR peer, cold", self.ingress, syns(False, cidr_ips)
            ),
        ]


def ratio(values: Sequence[float], base: Sequence[float]) -> float:
    return round(_median([v / b for v, b in zip(values, base, strict=True)]), 2)


def median(values: Sequence[float]) -> float:
    return round(_median(values), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2_000_000, help="packets per test run")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved runs per case")
    parser.add_argument(
        "--flows", type=int, default=2_000, help="new connections per new-flow case and round"
    )
    args = parser.parse_args()
    if args.repeat < 1_000_000:
        parser.error("--repeat must be at least 1,000,000 (shorter runs measure the timer)")
    exit_on_sigterm()
    host = machine()

    prefixes = drop_prefixes(RULES, avoid=POD_NET)
    with ExitStack() as stack:
        maps = stack.enter_context(node_maps())
        bench = Bench(stack, maps, prefixes)
        cases = bench.cases()
        flows = bench.new_flows(args.flows)
        bench.handshakes()
        for case in cases:  # warm up caches and the tries before timing anything
            case.measure(100_000)
            case.kernel_ns.clear()
            case.wall_ns.clear()
            bench.drain()
        for flow in flows:
            flow.measure(bench.empty)
            flow.kernel_ns.clear()
            flow.empty_ns.clear()
            bench.drain()
        for _ in range(args.rounds):
            bench.handshakes()  # every round starts from the same conntrack table
            for case in cases:
                repeat = case.measure(args.repeat)
                events = bench.drain()
                if events != (repeat if case.new_flow_per_packet else 0):
                    raise RuntimeError(f"{case.name}: {events} flow events in {repeat} runs")
            for flow in flows:
                flow.measure(bench.empty)
                flow.events += bench.drain()
        ct_entries = len(maps.ct)

    for flow in flows:
        if flow.events != args.flows * args.rounds:
            raise RuntimeError(f"{flow.name}: {flow.events} flow events, expected one per flow")
    empty = cases[0]
    results: dict[str, dict[str, Any]] = {}
    for c in cases:
        results[c.name] = {
            "runs_per_test_run": min(args.repeat, HOT_NEW_FLOW_REPEAT)
            if c.new_flow_per_packet
            else args.repeat,
            "ns_per_packet": median(c.kernel_ns),
            "added_ns": median([a - b for a, b in zip(c.kernel_ns, empty.kernel_ns, strict=True)]),
            "wall_ns_per_packet": round(_median(c.wall_ns), 2),
            "ratio_to_empty": ratio(c.kernel_ns, empty.kernel_ns),
            "baseline": "empty tc",
            "rounds_ns": c.kernel_ns,
        }
    for f in flows:
        results[f.name] = {
            "runs_per_test_run": 1,
            "flows_per_round": args.flows,
            "ns_per_packet": median(f.kernel_ns),
            "empty_tc_one_per_run_ns": median(f.empty_ns),
            "added_ns": median([a - b for a, b in zip(f.kernel_ns, f.empty_ns, strict=True)]),
            "ratio_to_empty": ratio(f.kernel_ns, f.empty_ns),
            "baseline": "empty tc, one packet per test run, same frames",
            "rounds_ns": [round(v, 1) for v in f.kernel_ns],
            "rounds_empty_ns": [round(v, 1) for v in f.empty_ns],
        }
    established = {n: results[n]["ratio_to_empty"] for n in results if n.endswith("established")}
    worst = max(established.values())
    out = {
        "bench": "endpoint_cost",
        "machine": host,
        "method": {
            "tool": "BPF_PROG_TEST_RUN",
            "repeat": args.repeat,
            "rounds": args.rounds,
            "new_flows_per_case_and_round": args.flows,
            "statistic": "median over rounds; ratios per round against the baseline of "
            "that round, then the median",
            "ns_per_packet": "the kernel's mean per repetition (whole ns; time scheduled "
            "out is excluded); for new flows the mean over the round's test runs of one "
            "packet each",
            "maps": {
                "ipcache": f"{len(prefixes)} CIDR prefixes + {PODS} pods + the endpoint "
                "+ 0.0.0.0/0",
                "policy_entries_for_the_endpoint": bench.entries,
                "policy": f"both directions enforced; allow TCP/{PORT} with each of "
                f"{len(prefixes)} CIDR identities and {PODS} pod identities",
                "ct_entries_at_end": ct_entries,
            },
            "packet_bytes": len(cases[0].data),
            "events": "on; drained after every new-flow case, none lost",
        },
        "cases": results,
        "targets": [
            {
                "name": f"established <= {TARGET_ESTABLISHED_RATIO:g}x the empty tc program "
                "(worst of the two programs)",
                "value": worst,
                "limit": TARGET_ESTABLISHED_RATIO,
                "met": worst <= TARGET_ESTABLISHED_RATIO,
            }
        ],
    }
    summary = [f"{'case':46} {'ns/pkt':>7} {'base ns':>8} {'x base':>7}"]
    for name, r in results.items():
        base = r.get("empty_tc_one_per_run_ns", results["empty tc"]["ns_per_packet"])
        summary.append(
            f"{name:46} {r['ns_per_packet']:7.1f} {base:8.1f} {r['ratio_to_empty']:7.2f}"
        )
    t = out["targets"][0]
    summary.append(f"target: {t['name']}: {t['value']:.2f}x -> {'met' if t['met'] else 'MISSED'}")
    emit(out, summary)


if __name__ == "__main__":
    main()
