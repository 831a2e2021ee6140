"""Per-packet cost of the endpoint (pod) programs, measured in the kernel with
BPF_PROG_TEST_RUN, on node maps holding what a busy node holds, for IPv4 and IPv6 side by
side in the same run.

Maps (the same for both families): the ipcache holds 10,000 CIDR prefixes per family (each
with a CIDR identity of its own; the IPv6 prefix i has the identity of the IPv4 prefix i),
1,000 pods (an IPv4 and an IPv6 address each, one identity) and the measured endpoint,
which is dual-stack; the endpoint's policy enforces both directions and allows TCP port
5201 to and from every one of the 10,000 CIDR identities and the 1,000 pod identities
(22,000 policy entries: 11,000 identities in two directions; policy is by identity, so
the same entries serve both families). Events are on, as in the product: new flows emit
a verdict event each and, at the agent's default monitor aggregation (medium; see
`--monitor-aggregation`), a trace event; established data segments emit none. The
benchmark drains them between cases (and checks that none was lost, so no number comes
from the ring-full path). Every forwarded packet is counted in the per-CPU `forwards`.

Cases, for from_container (the pod's egress) and to_container (the pod's ingress), each
on IPv4 and on IPv6 (the same TCP segment, options and payload in either):
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
overhead, so cold new flows are compared with a run of one packet). The two families of a
case run back to back in every round (which goes first alternates), and their ratio
IPv6/IPv4 is taken per round.

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
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from bench._common import (
    RULES,
    TC_ACT_UNSPEC,
    TEST_RANGE_V6,
    drop_prefixes,
    emit,
    exit_on_sigterm,
    machine,
    random_prefixes,
)
from bench._common import median as _median
from membrane.abi import Direction, FlowEventType, IpProto
from membrane.agent.config import DEFAULT_SERVICE_CIDR, DEFAULT_SERVICE_CIDR_V6
from membrane.bpf import BpfObject, Program, test_run
from membrane.bpf.fs import PIN_ROOT, ensure_bpffs
from membrane.bpf.ringbuf import RingBuffer
from membrane.datapath import EndpointPolicy, Identity, NodeMaps, PolicyWriter, load_endpoint
from membrane.datapath.abi import PROG_FROM_CONTAINER, PROG_TO_CONTAINER
from membrane.datapath.ipcache import sync_ipcache
from membrane.datapath.monitor import (
    DEFAULT_MONITOR_AGGREGATION,
    MONITOR_AGGREGATION_LEVELS,
    set_monitor_aggregation,
)
from membrane.datapath.policy_entries import PolicyEntry
from membrane.datapath.service_nat import service_nat_config

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

TC_ACT_OK = 0
PODS = 1_000
POD_NET = IPv4Network("198.18.0.0/22")  # the pods; no CIDR prefix covers it
POD_NET6 = IPv6Network("2001:db8:1::/64")  # their IPv6 addresses; no CIDR prefix covers it
EP_ID, EP_IP, EP_IP6 = 1, POD_NET[2], POD_NET6[2]
PEER_IPS = [POD_NET[3 + i] for i in range(PODS)]
PEER_IPS6 = [POD_NET6[3 + i] for i in range(PODS)]
PEER_EP_IDS = range(2, 2 + PODS)
EP_IDENTITY = int(Identity.FIRST_ENDPOINT)
PEER_IDENTITIES = [EP_IDENTITY + 1 + i for i in range(PODS)]
CIDR_IDENTITY = int(Identity.FIRST_CIDR)
# IPv6 CIDR prefixes as filter_cost draws them: hosts and a few networks (/64, /48)
V6_PREFIX_LENGTHS = ((128, 7), (64, 2), (48, 1))
PORT = 5201
# New flows per test run: each emits a verdict and (medium aggregation) a trace event, and
# the 1 MiB ring holds ~10,900 events of 96 bytes.
HOT_NEW_FLOW_REPEAT = 5_000
NEW_FLOW_SPORT = 41000
TCP = IpProto.TCP
SYN, ACK, SYNACK, SYNFIN = "S", "A", "SA", "SF"
RULE_CIDR, RULE_PODS = 1, 2
TARGET_ESTABLISHED_RATIO = 10.0
TARGET_IPV6_ESTABLISHED_RATIO = 1.2
FAMILIES = ("ipv4", "ipv6")


def segment(
    src: Address, dst: Address, sport: int, dport: int, flags: str, payload: int = 0
) -> bytes:
    """Ethernet/IPv4 (or IPv6, for IPv6 addresses)/TCP with timestamps, as a Linux peer
    sends it."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    l3 = (
        IPv6(src=str(src), dst=str(dst), hlim=64)
        if src.version == 6
        else IP(src=str(src), dst=str(dst), ttl=64)
    )
    frame = (
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / l3
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


@dataclass(frozen=True)
class Family:
    """One address family's side of the node: the endpoint's address, the pods' and the
    CIDR prefixes (prefix i has the identity CIDR_IDENTITY + i in either family)."""

    name: str
    ep: Address
    peers: Sequence[Address]
    prefixes: Sequence[Network]

    def ipcache(self) -> dict[Network, tuple[int, int]]:
        bits = self.ep.max_prefixlen
        entries: dict[Network, tuple[int, int]] = {
            net: (CIDR_IDENTITY + i, 0) for i, net in enumerate(self.prefixes)
        }
        entries[ip_host(self.ep, bits)] = (EP_IDENTITY, EP_ID)
        for ip, ident, ep in zip(self.peers, PEER_IDENTITIES, PEER_EP_IDS, strict=True):
            entries[ip_host(ip, bits)] = (ident, ep)
        return entries


def ip_host(addr: Address, bits: int) -> Network:
    return IPv4Network((addr, bits)) if addr.version == 4 else IPv6Network((addr, bits))


def families() -> tuple[Family, Family]:
    v4 = drop_prefixes(RULES, avoid=POD_NET)
    v6: list[Any] = random_prefixes(RULES, TEST_RANGE_V6, POD_NET6, V6_PREFIX_LENGTHS, 7)
    return Family("ipv4", EP_IP, PEER_IPS, v4), Family("ipv6", EP_IP6, PEER_IPS6, v6)


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


def fill(maps: NodeMaps, fams: Sequence[Family]) -> int:
    """Both families' ipcaches and the endpoint's policy (one set of entries, by identity,
    for both families); returns the number of policy entries."""
    ipcache: dict[Network, tuple[int, int]] = {}
    for fam in fams:
        ipcache.update(fam.ipcache())
    sync_ipcache(maps, ipcache)
    for fam, m in zip(fams, (maps.ipcache, maps.ipcache6), strict=True):
        held = len(m)
        if held != len(fam.ipcache()) + 1:  # + the world prefix
            raise RuntimeError(f"{fam.name} ipcache holds {held} entries")
    cidrs = max(len(fam.prefixes) for fam in fams)
    peers = [(CIDR_IDENTITY + i, RULE_CIDR) for i in range(cidrs)]
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
    family: str
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
            raise RuntimeError(
                f"{self.name} ({self.family}): verdict {result.retval}, expected {self.expect}"
            )
        self.kernel_ns.append(result.duration_ns)
        self.wall_ns.append(elapsed / repeat)
        return repeat


@dataclass
class NewFlows:
    """The first packets of `len(frames)` distinct connections, one per test run, each
    paired with the empty program on the same frame (run just before it)."""

    name: str
    family: str
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
                raise RuntimeError(f"{self.name} ({self.family}): verdict {result.retval}")
            ours += result.duration_ns
        self.kernel_ns.append(ours / len(self.frames))
        self.empty_ns.append(base / len(self.frames))


class Bench:
    def __init__(self, stack: ExitStack, maps: NodeMaps, fams: Sequence[Family]) -> None:
        self.maps = maps
        self.fams = fams
        self.entries = fill(maps, fams)
        # as the agent loads it: with its service CIDRs, so every packet leaving the pod
        # pays the per-packet ClusterIP translation's compare (none of these is a service's)
        service_cidrs = (IPv4Network(DEFAULT_SERVICE_CIDR), IPv6Network(DEFAULT_SERVICE_CIDR_V6))
        obj = stack.enter_context(
            load_endpoint(maps.pin_dir, EP_ID, EP_IP, EP_IP6, **service_nat_config(service_cidrs))
        )
        self.egress, self.ingress = obj.program(PROG_FROM_CONTAINER), obj.program(PROG_TO_CONTAINER)
        self.empty = stack.enter_context(BpfObject.open("bench_empty")).load().program("empty_tc")
        self.ring = stack.enter_context(
            RingBuffer(maps.events, dtype=maps.flow_event_dtype(), lost_map=maps.events_lost)
        )
        # the peers of the two tracked connections, the same pods in either family
        self.out_peer, self.in_peer = PODS // 2, PODS // 3
        # source ports of the two tracked connections (new flows use NEW_FLOW_SPORT up)
        self.out_sport, self.in_sport = 40000, 40001

    # ---- the tracked connections ---------------------------------------------------------
    def handshakes(self) -> None:
        """Empty both conntrack tables, then open one connection each way per family
        (SYN, SYN-ACK, ACK through both programs), so that every round starts from the
        same tables and the established and reply cases find what a real connection
        leaves behind."""
        self.maps.ct.clear()
        self.maps.ct6.clear()
        for fam in self.fams:
            ep, out_peer, in_peer = fam.ep, fam.peers[self.out_peer], fam.peers[self.in_peer]
            for opener, answerer, client, server, sport in (
                (self.egress, self.ingress, ep, out_peer, self.out_sport),
                (self.ingress, self.egress, in_peer, ep, self.in_sport),
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
        """Empty the ring; returns the policy-verdict events in it (one per new flow;
        trace events, as many as the monitor aggregation asks, are not counted)."""
        events = self.ring.drain()
        if self.ring.lost:
            raise RuntimeError(f"{self.ring.lost} flow events lost: the ring was full")
        return int((events["h"]["type"] == FlowEventType.POLICY_VERDICT).sum())

    # ---- cases ---------------------------------------------------------------------------
    def cases(self, fam: Family) -> list[Case]:
        """The cases of one family, the empty program first."""
        data = 64
        ep, out_peer, in_peer = fam.ep, fam.peers[self.out_peer], fam.peers[self.in_peer]
        n = fam.name
        return [
            Case(
                "empty tc", n, self.empty, segment(ep, out_peer, 1, PORT, ACK, data), TC_ACT_UNSPEC
            ),
            Case(
                "from_container, established",
                n,
                self.egress,
                segment(ep, out_peer, self.out_sport, PORT, ACK, data),
                TC_ACT_OK,
            ),
            Case(
                "to_container, reply",
                n,
                self.ingress,
                segment(out_peer, ep, PORT, self.out_sport, ACK, data),
                TC_ACT_OK,
            ),
            Case(
                "to_container, established",
                n,
                self.ingress,
                segment(in_peer, ep, self.in_sport, PORT, ACK, data),
                TC_ACT_OK,
            ),
            Case(
                "from_container, reply",
                n,
                self.egress,
                segment(ep, in_peer, PORT, self.in_sport, ACK, data),
                TC_ACT_OK,
            ),
            # SYN+FIN: conntrack marks the connection closing at once, so the next SYN on
            # the tuple is a new connection again: every repetition takes the whole
            # new-flow path (verdict, conntrack insert, event) with hot caches.
            Case(
                "from_container, new flow, hot caches",
                n,
                self.egress,
                segment(ep, out_peer, NEW_FLOW_SPORT - 1, PORT, SYNFIN),
                TC_ACT_OK,
                new_flow_per_packet=True,
            ),
            Case(
                "to_container, new flow, hot caches",
                n,
                self.ingress,
                segment(in_peer, ep, NEW_FLOW_SPORT - 1, PORT, SYNFIN),
                TC_ACT_OK,
                new_flow_per_packet=True,
            ),
        ]

    def new_flows(self, fam: Family, count: int) -> list[NewFlows]:
        """SYNs of `count` new connections per case: to or from pods (a host prefix in the
        ipcache, peers drawn at random) and CIDR peers (an address inside a listed prefix).
        Both families draw the same peer and prefix indices. The same frames serve every
        round: each round starts with empty tables."""
        rng = random.Random(11)
        cidr_ips = [net[net.num_addresses // 2] for net in fam.prefixes]
        if NEW_FLOW_SPORT + count > 0xFFFF:
            raise ValueError(f"--flows must be at most {0xFFFF - NEW_FLOW_SPORT}")

        def syns(outbound: bool, peers: Sequence[Address]) -> list[bytes]:
            out = []
            for i in range(count):
                peer, sport = peers[rng.randrange(len(peers))], NEW_FLOW_SPORT + i
                src, dst = (fam.ep, peer) if outbound else (peer, fam.ep)
                out.append(segment(src, dst, sport, PORT, SYN))
            return out

        n, eg, ig = fam.name, self.egress, self.ingress
        return [
            NewFlows("from_container, new flow to a pod, cold", n, eg, syns(True, fam.peers)),
            NewFlows("to_container, new flow from a pod, cold", n, ig, syns(False, fam.peers)),
            NewFlows("from_container, new flow to a CIDR peer, cold", n, eg, syns(True, cidr_ips)),
            NewFlows("to_container, new flow from a CIDR peer, cold", n, ig, syns(False, cidr_ips)),
        ]


def ratio(values: Sequence[float], base: Sequence[float]) -> float:
    return round(_median([v / b for v, b in zip(values, base, strict=True)]), 2)


def median(values: Sequence[float]) -> float:
    return round(_median(values), 1)


def case_result(c: Case, empty: Case, repeat: int) -> dict[str, Any]:
    return {
        "runs_per_test_run": min(repeat, HOT_NEW_FLOW_REPEAT) if c.new_flow_per_packet else repeat,
        "packet_bytes": len(c.data),
        "ns_per_packet": median(c.kernel_ns),
        "added_ns": median([a - b for a, b in zip(c.kernel_ns, empty.kernel_ns, strict=True)]),
        "wall_ns_per_packet": round(_median(c.wall_ns), 2),
        "ratio_to_empty": ratio(c.kernel_ns, empty.kernel_ns),
        "baseline": "empty tc (same family's frame)",
        "rounds_ns": c.kernel_ns,
    }


def flow_result(f: NewFlows, flows: int) -> dict[str, Any]:
    return {
        "runs_per_test_run": 1,
        "flows_per_round": flows,
        "ns_per_packet": median(f.kernel_ns),
        "empty_tc_one_per_run_ns": median(f.empty_ns),
        "added_ns": median([a - b for a, b in zip(f.kernel_ns, f.empty_ns, strict=True)]),
        "ratio_to_empty": ratio(f.kernel_ns, f.empty_ns),
        "baseline": "empty tc, one packet per test run, same frames",
        "rounds_ns": [round(v, 1) for v in f.kernel_ns],
        "rounds_empty_ns": [round(v, 1) for v in f.empty_ns],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2_000_000, help="packets per test run")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved runs per case")
    parser.add_argument(
        "--flows", type=int, default=2_000, help="new connections per new-flow case and round"
    )
    parser.add_argument(
        "--monitor-aggregation",
        default=DEFAULT_MONITOR_AGGREGATION,
        choices=[name for name in MONITOR_AGGREGATION_LEVELS if name not in ("disabled", "max")],
        help="trace events, as the agent's option (the agent's default: medium)",
    )
    args = parser.parse_args()
    if args.repeat < 1_000_000:
        parser.error("--repeat must be at least 1,000,000 (shorter runs measure the timer)")
    exit_on_sigterm()
    host = machine()

    fams = families()
    with ExitStack() as stack:
        maps = stack.enter_context(node_maps())
        set_monitor_aggregation(maps.monitor_config, args.monitor_aggregation)
        bench = Bench(stack, maps, fams)
        # pairs[i] = (the IPv4 case, the IPv6 case): the same case in either family
        pairs = list(zip(*(bench.cases(fam) for fam in fams), strict=True))
        flow_pairs = list(zip(*(bench.new_flows(fam, args.flows) for fam in fams), strict=True))
        bench.handshakes()
        for pair in pairs:  # warm up caches and the tries before timing anything
            for case in pair:
                case.measure(100_000)
                case.kernel_ns.clear()
                case.wall_ns.clear()
                bench.drain()
        for fpair in flow_pairs:
            for flow in fpair:
                flow.measure(bench.empty)
                flow.kernel_ns.clear()
                flow.empty_ns.clear()
                bench.drain()
        for rnd in range(args.rounds):
            bench.handshakes()  # every round starts from the same conntrack tables
            order = slice(None) if rnd % 2 == 0 else slice(None, None, -1)  # who goes first
            for pair in pairs:
                for case in pair[order]:
                    repeat = case.measure(args.repeat)
                    events = bench.drain()
                    if events != (repeat if case.new_flow_per_packet else 0):
                        raise RuntimeError(
                            f"{case.name} ({case.family}): {events} flow events in {repeat} runs"
                        )
            for fpair in flow_pairs:
                for flow in fpair[order]:
                    flow.measure(bench.empty)
                    flow.events += bench.drain()
        ct_entries = {"ct": len(maps.ct), "ct6": len(maps.ct6)}

    for fpair in flow_pairs:
        for flow in fpair:
            if flow.events != args.flows * args.rounds:
                raise RuntimeError(
                    f"{flow.name} ({flow.family}): {flow.events} flow events, expected one per flow"
                )
    results: dict[str, dict[str, Any]] = {}
    for v4, v6 in pairs:
        results[v4.name] = {
            "ipv4": case_result(v4, pairs[0][0], args.repeat),
            "ipv6": case_result(v6, pairs[0][1], args.repeat),
            "ipv6_over_ipv4": ratio(v6.kernel_ns, v4.kernel_ns),
        }
    for f4, f6 in flow_pairs:
        results[f4.name] = {
            "ipv4": flow_result(f4, args.flows),
            "ipv6": flow_result(f6, args.flows),
            "ipv6_over_ipv4": ratio(f6.kernel_ns, f4.kernel_ns),
        }
    established = [n for n in results if n.endswith("established")]
    worst = max(results[n]["ipv4"]["ratio_to_empty"] for n in established)
    worst6 = max(results[n]["ipv6_over_ipv4"] for n in established)
    prefixes4, prefixes6 = (len(fam.prefixes) for fam in fams)
    out = {
        "bench": "endpoint_cost",
        "machine": host,
        "method": {
            "tool": "BPF_PROG_TEST_RUN",
            "repeat": args.repeat,
            "rounds": args.rounds,
            "new_flows_per_case_and_round": args.flows,
            "statistic": "median over rounds; ratios per round against the baseline of "
            "that round (ipv6_over_ipv4: the IPv6 case against the IPv4 case of the same "
            "round, run back to back, the first of the two alternating), then the median",
            "ns_per_packet": "the kernel's mean per repetition (whole ns; time scheduled "
            "out is excluded); for new flows the mean over the round's test runs of one "
            "packet each",
            "maps": {
                "ipcache": f"{prefixes4} CIDR prefixes + {PODS} pods + the endpoint + 0.0.0.0/0",
                "ipcache6": f"{prefixes6} CIDR prefixes in {TEST_RANGE_V6} (lengths "
                f"{'/'.join(str(n) for n, _ in V6_PREFIX_LENGTHS)}, weights "
                f"{':'.join(str(w) for _, w in V6_PREFIX_LENGTHS)}; prefix i has the "
                f"identity of IPv4 prefix i) + {PODS} pods in {POD_NET6} + the endpoint + ::/0",
                "policy_entries_for_the_endpoint": bench.entries,
                "policy": f"both directions enforced; allow TCP/{PORT} with each of "
                f"{max(prefixes4, prefixes6)} CIDR identities and {PODS} pod identities "
                "(the same entries for both families)",
                "ct_entries_at_end": ct_entries,
            },
            "packet_bytes": {fam.name: len(p.data) for fam, p in zip(fams, pairs[0], strict=True)},
            "events": "on; drained after every new-flow case, none lost",
            "monitor_aggregation": args.monitor_aggregation,
        },
        "cases": results,
        "targets": [
            {
                "name": f"established <= {TARGET_ESTABLISHED_RATIO:g}x the empty tc program "
                "(IPv4, worst of the two programs)",
                "value": worst,
                "limit": TARGET_ESTABLISHED_RATIO,
                "met": worst <= TARGET_ESTABLISHED_RATIO,
            },
            {
                "name": f"ipv6_established_ratio <= {TARGET_IPV6_ESTABLISHED_RATIO:g} (IPv6 "
                "established / IPv4 established, worst of the two programs)",
                "value": worst6,
                "per_program": {n: results[n]["ipv6_over_ipv4"] for n in established},
                "limit": TARGET_IPV6_ESTABLISHED_RATIO,
                "met": worst6 <= TARGET_IPV6_ESTABLISHED_RATIO,
            },
        ],
    }
    summary = [f"{'case':46} {'v4 ns':>7} {'x base':>6} {'v6 ns':>7} {'x base':>6} {'v6/v4':>6}"]
    for name, r in results.items():
        v4, v6 = r["ipv4"], r["ipv6"]
        summary.append(
            f"{name:46} {v4['ns_per_packet']:7.1f} {v4['ratio_to_empty']:6.2f} "
            f"{v6['ns_per_packet']:7.1f} {v6['ratio_to_empty']:6.2f} {r['ipv6_over_ipv4']:6.2f}"
        )
    for t in out["targets"]:
        summary.append(
            f"target: {t['name']}: {t['value']:.2f} -> {'met' if t['met'] else 'MISSED'}"
        )
    emit(out, summary)


if __name__ == "__main__":
    main()
