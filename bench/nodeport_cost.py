"""Per-packet cost of the per-packet service path (bpf/nodeport.bpf.c: NodePort traffic
from outside the node) against an empty tc program, with 1 and 1,000 NodePort services,
random and Maglev backend sets, in SNAT and DSR mode; IPv6 NodePorts (SNAT and DSR, random
picks) beside them.

BPF_PROG_TEST_RUN of one packet per call (repeat=1), the kernel's duration of each call,
median per case and round, cases interleaved over --rounds rounds, each beside the empty
tc program timed the same way (difference in ns, median over rounds); the method of
bench/lb_cost.py (whose XDP L4LB numbers, Maglev lookup included, this does not repeat).
The services are written by the agent's own writer (membrane.service.maps) into the maps
of freshly loaded programs; the program runs in a namespace whose routes make one backend
local (a pod device) and one remote (behind ext0, the device the program serves), so its
FIB lookups answer as on a node.
Cases: a flow's first packet (a fresh client port per call: frontend lookup, backend pick,
FIB lookup, flow and reverse-NAT inserts), an established flow's packet (1,000 flows known,
one per call in turn), a remote backend's reply (SNAT: ingress) and a local backend's
reply (egress), and a packet for no service (pass).

    python -m bench.nodeport_cost [--calls 5000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench._common import emit, exit_on_sigterm, machine, median, packet
from membrane.bpf import BpfObject, Program
from membrane.bpf.fs import temporary_pin_dir
from membrane.netns import Topology
from membrane.service.nodeport import OWN_MAPS
from membrane.testing.nodeport import (
    ADDRESSES,
    CLIENT_IP,
    FIRST_NODE_PORT,
    LOCAL_POD,
    NODE_IP,
    REMOTE_POD,
    TARGET,
    Bed,
    load_nodeport,
    nodeport_testbed,
)

TC_ACT_OK, TC_ACT_REDIRECT = 0, 7
TC_ACT_UNSPEC = 0xFFFFFFFF


@dataclass
class Case:
    name: str
    prog: Program
    frames: Callable[[int], bytes]  # call number -> its frame
    ifindex: int
    expect: int
    kernel_ns: list[float] = field(default_factory=list)
    calls: int = 0
    after: Callable[[], None] = lambda: None  # run after each measurement

    def measure(self, bed: Bed, calls: int) -> None:
        frames = [self.frames(self.calls + k) for k in range(calls)]  # built first, as lb_cost
        self.calls += calls
        durations = []
        for frame in frames:
            result = bed.run(self.prog, frame, self.ifindex)
            if result.retval != self.expect:
                raise RuntimeError(f"{self.name}: verdict {result.retval}, not {self.expect}")
            durations.append(result.duration_ns)
        self.kernel_ns.append(median(durations))
        self.after()


def forget_new_flows(obj: BpfObject, family: int = 4) -> Callable[[], None]:
    """Remove the flows the new-flow cases made (client ports below 60,000) and their
    reverse-NAT entries: rounds of thousands of new flows to one backend would otherwise
    fill its 32,768 SNAT ports (random picks then miss, and the flow is dropped)."""
    prefix = "np6" if family == 6 else "np"

    def forget() -> None:
        flows, rev = obj.map(f"{prefix}_flows"), obj.map(f"{prefix}_rev")
        flows.delete_batch([key for key, _ in flows.lookup_batch() if key.sport < 60_000])
        rev.delete_batch([key for key, back in rev.lookup_batch() if back.dport < 60_000])

    return forget


def to_node_port(port: int, family: int = 4) -> Callable[[int], bytes]:
    """Call i: a client flow to the node's address:port from a port of its own (new
    flows)."""
    node, client = ADDRESSES[family][:2]
    return lambda i: packet(client, node, sport=10_000 + i % 50_000, dport=port)


def known(port: int, flows: int = 1000, family: int = 4) -> Callable[[int], bytes]:
    """Call i: one of `flows` client flows in turn (established after their first call)."""
    node, client = ADDRESSES[family][:2]
    return lambda i: packet(client, node, sport=60_000 + i % flows, dport=port)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000, help="test runs per case and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    exit_on_sigterm()
    host = machine()
    started = time.monotonic()
    objects: list[BpfObject] = []
    with Topology("mnc") as topo, temporary_pin_dir() as pin_root:
        bed = nodeport_testbed(topo)
        empty = BpfObject.open("bench_empty").load()
        objects.append(empty)
        base = Case("empty tc program", empty.program("empty_tc"), to_node_port(1), bed.ext,
                    TC_ACT_UNSPEC)  # fmt: skip
        cases = []
        variants = (
            (4, "snat", "random"), (4, "snat", "maglev"), (4, "dsr", "random"),
            (6, "snat", "random"), (6, "dsr", "random"),
        )  # fmt: skip
        for services in (1, 1000):
            for family, mode, algorithm in variants:
                pins = f"{pin_root}/{services}-{family}-{mode}-{algorithm}"
                obj = load_nodeport(bed, pins, mode, services, algorithm, family=family).obj
                objects.append(obj)
                ingress, egress = obj.program("nodeport_ingress"), obj.program("nodeport_egress")
                local_port = FIRST_NODE_PORT + 2 * (services // 2)  # a service in the middle
                remote_port = local_port + 1
                tag = f"{services} svc, {mode}, {algorithm}" + (", IPv6" if family == 6 else "")
                remote_verdict = TC_ACT_REDIRECT
                forget = forget_new_flows(obj, family)
                cases += [
                    Case(f"new flow, local backend ({tag})", ingress,
                         to_node_port(local_port, family), bed.ext, TC_ACT_OK, after=forget),
                    Case(f"new flow, remote backend ({tag})", ingress,
                         to_node_port(remote_port, family), bed.ext, remote_verdict,
                         after=forget),
                    Case(f"established, local backend ({tag})", ingress,
                         known(local_port, family=family), bed.ext, TC_ACT_OK),
                    Case(f"established, remote backend ({tag})", ingress,
                         known(remote_port, family=family), bed.ext, remote_verdict),
                ]  # fmt: skip
                if family == 4 and mode == "snat" and algorithm == "random":
                    cases += reply_cases(bed, obj, ingress, egress, local_port, remote_port, tag)
        cases.append(Case("no service (pass)", objects[1].program("nodeport_ingress"),
                          lambda i: packet(CLIENT_IP, NODE_IP, sport=10_000 + i, dport=22),
                          bed.ext, TC_ACT_OK))  # fmt: skip
        for case in cases:  # warm up: the established flows exist before any round
            case.measure(bed, 1000)
            case.kernel_ns.clear()
        base.measure(bed, 1000)
        base.kernel_ns.clear()
        for rnd in range(args.rounds):
            for case in [base, *cases]:
                case.measure(bed, args.calls)
            print(f"  round {rnd + 1}/{args.rounds} done", flush=True, file=sys.stderr)
        for obj in objects:
            obj.close()

    rows = {}
    for case in cases:
        rows[case.name] = {
            "kernel_ns": round(median(case.kernel_ns), 1),
            "over_empty_ns": round(
                median([c - b for c, b in zip(case.kernel_ns, base.kernel_ns, strict=True)]), 1
            ),
            "rounds_ns": case.kernel_ns,
        }
    out = {
        "bench": "nodeport_cost",
        "machine": host,
        "method": {
            "calls_per_case_and_round": args.calls,
            "rounds": args.rounds,
            "empty_tc_ns": round(median(base.kernel_ns), 1),
            "empty_tc_rounds_ns": base.kernel_ns,
            "own_maps": list(OWN_MAPS),
            "seconds": round(time.monotonic() - started),
        },
        "cases": rows,
    }
    summary = [f"empty tc program: {out['method']['empty_tc_ns']} ns"]
    summary += [f"{name:58} {r['kernel_ns']:7} ns  (+{r['over_empty_ns']})"
                for name, r in rows.items()]  # fmt: skip
    emit(out, summary)


def reply_cases(
    bed: Bed,
    obj: BpfObject,
    ingress: Program,
    egress: Program,
    local_port: int,
    remote_port: int,
    tag: str,
) -> list[Case]:
    """Replies of established flows: a remote backend's to the node's NAT port (ingress)
    and a local pod's to the client (egress); the NAT ports are read from np_flows."""
    flows = {}
    for i in range(1000):  # create the flows: their first packets
        for port in (local_port, remote_port):
            bed.run(ingress, known(port)(i), bed.ext)
    for key, flow in obj.map("np_flows").items():
        flows[(key.sport, key.dport)] = flow.nat_port

    def snat_reply(i: int) -> bytes:
        nat = flows[(60_000 + i % 1000, remote_port)]
        return packet(REMOTE_POD, NODE_IP, sport=TARGET, dport=nat)

    def local_reply(i: int) -> bytes:
        return packet(LOCAL_POD, CLIENT_IP, sport=TARGET, dport=60_000 + i % 1000)

    return [
        Case(f"reply, remote backend ({tag})", ingress, snat_reply, bed.ext, TC_ACT_REDIRECT),
        Case(f"reply, local backend ({tag})", egress, local_reply, bed.ext, TC_ACT_OK),
    ]


if __name__ == "__main__":
    main()
