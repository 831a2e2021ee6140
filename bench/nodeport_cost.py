"""Per-packet cost of the per-packet service path (bpf/nodeport.bpf.c: NodePort traffic
from outside the node) against an empty tc program, with 1 and 1,000 NodePort services,
random and Maglev backend sets, in SNAT and DSR mode.

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
import ipaddress
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyroute2 import IPRoute

from bench._common import emit, exit_on_sigterm, machine, median, packet
from membrane.bpf import BpfObject, Program, test_run
from membrane.netns import Topology, links
from membrane.netns.namespace import inside
from membrane.netns.sysctl import write_sysctl
from membrane.service.kubernetes import hand_written
from membrane.service.maps import ServiceIds, ServiceMaps
from membrane.service.nodeport import MODES, OWN_MAPS
from membrane.service.plan import NodeView, plan
from membrane.testing.lb import NUD_PERMANENT, backend_mac

NODE_IP = "198.19.0.1"
CLIENT = "198.19.8.2"
REMOTE_HOST = "198.19.8.11"
LOCAL_POD, REMOTE_POD = "198.18.0.10", "198.18.200.11"
FIRST_NODE_PORT = 30000
TARGET = 7000
TC_ACT_OK, TC_ACT_REDIRECT = 0, 7
TC_ACT_UNSPEC = 0xFFFFFFFF


@dataclass(frozen=True)
class Bed:
    ns: str
    ext: int  # ifindex of ext0 (served; the remote backend is behind it)
    pod: int  # ifindex of the local pod's device

    def run(self, prog: Program, frame: bytes, ifindex: int) -> tuple[int, int]:
        """(verdict, kernel ns) of `prog` on `frame` as if it arrived on `ifindex`."""
        ctx = bytearray(192)  # struct __sk_buff: ingress_ifindex at 36, ifindex at 40
        struct.pack_into("II", ctx, 36, ifindex, ifindex)
        with inside(self.ns):
            result = test_run(prog, frame, ctx=bytes(ctx))
        return result.retval, result.duration_ns


def testbed(topo: Topology) -> Bed:
    """A node-like namespace: ext0 (198.19.8.1/24, the remote host and the client as
    permanent neighbours, the other node's pods routed via the remote host) and pod0 (the
    local pod's /32)."""
    ns, peer, pod = topo.namespace("node"), topo.namespace("peer"), topo.namespace("pod")
    topo.veth(ns, peer, names=("ext0", "eth0"))
    topo.veth(ns, pod, names=("pod0", "eth0"))
    links.add_address(ns, "lo", f"{NODE_IP}/32")
    links.add_address(ns, "ext0", "198.19.8.1/24")
    with inside(ns), IPRoute() as ipr:
        ext, pod0 = ipr.link_lookup(ifname="ext0")[0], ipr.link_lookup(ifname="pod0")[0]
        for addr in (REMOTE_HOST, CLIENT):
            ipr.neigh("add", dst=addr, lladdr=backend_mac(addr), ifindex=ext, state=NUD_PERMANENT)
        ipr.route("add", dst=f"{REMOTE_POD}/32", gateway=REMOTE_HOST, oif=ext)
        ipr.route("add", dst=f"{LOCAL_POD}/32", oif=pod0)
        ipr.neigh("add", dst=LOCAL_POD, lladdr=backend_mac(LOCAL_POD), ifindex=pod0,
                  state=NUD_PERMANENT)  # fmt: skip
        write_sysctl("net.ipv4.ip_forward", 1)
    return Bed(ns, ext, pod0)


def load(bed: Bed, mode: str, services: int, algorithm: str) -> BpfObject:
    """The programs in `mode` with `services` NodePorts (FIRST_NODE_PORT + 2i to the local
    pod, + 2i + 1 to the remote one), written as the agent writes them."""
    obj = BpfObject.open("nodeport")
    obj.set_config(np_mode=int(MODES[mode]), np_node_ip4=_le32(NODE_IP))
    obj.load()
    records, slices = [], []
    for i in range(services):
        for k, backend in enumerate((LOCAL_POD, REMOTE_POD)):
            spec = {
                "type": "NodePort",
                "clusterIP": str(ipaddress.ip_address("198.19.128.1") + 2 * i + k),
                "ports": [{"port": 80, "targetPort": TARGET,
                           "nodePort": FIRST_NODE_PORT + 2 * i + k}],
            }  # fmt: skip
            annotations = {"service.cilium.io/lb-algorithm": algorithm}
            svc, eps = hand_written(
                "bench",
                f"s{i}-{k}",
                spec,
                annotations,
                [{"address": backend, "port": None, "state": "active", "weight": 1}],
            )
            records.append(svc.with_ips((spec["clusterIP"],)))
            slices.append(eps)
    node = NodeView((), {4: (NODE_IP,)}, 16381)
    ServiceMaps(obj.map).apply(
        plan(records, [s for s in slices if s], node), ServiceIds.from_json(None)
    )
    obj.map("np_devices").update(bed.ext, 1)
    return obj


def _le32(ip: str) -> int:
    return int.from_bytes(ipaddress.ip_address(ip).packed, "little")


@dataclass
class Case:
    name: str
    prog: Program
    frames: Callable[[int], bytes]  # call number -> its frame
    ifindex: int
    expect: int
    kernel_ns: list[float] = field(default_factory=list)
    calls: int = 0

    def measure(self, bed: Bed, calls: int) -> None:
        frames = [self.frames(self.calls + k) for k in range(calls)]  # built first, as lb_cost
        self.calls += calls
        durations = []
        for frame in frames:
            verdict, ns = bed.run(self.prog, frame, self.ifindex)
            if verdict != self.expect:
                raise RuntimeError(f"{self.name}: verdict {verdict}, not {self.expect}")
            durations.append(ns)
        self.kernel_ns.append(median(durations))


def to_node_port(port: int) -> Callable[[int], bytes]:
    """Call i: a client flow to NODE_IP:port from a port of its own (new flows)."""
    return lambda i: packet(CLIENT, NODE_IP, sport=10_000 + i % 50_000, dport=port)


def known(port: int, flows: int = 1000) -> Callable[[int], bytes]:
    """Call i: one of `flows` client flows in turn (established after their first call)."""
    return lambda i: packet(CLIENT, NODE_IP, sport=60_000 + i % flows, dport=port)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000, help="test runs per case and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    exit_on_sigterm()
    host = machine()
    started = time.monotonic()
    objects: list[BpfObject] = []
    with Topology("mnc") as topo:
        bed = testbed(topo)
        empty = BpfObject.open("bench_empty").load()
        objects.append(empty)
        base = Case("empty tc program", empty.program("empty_tc"), to_node_port(1), bed.ext,
                    TC_ACT_UNSPEC)  # fmt: skip
        cases = []
        for services in (1, 1000):
            for mode, algorithm in (("snat", "random"), ("snat", "maglev"), ("dsr", "random")):
                obj = load(bed, mode, services, algorithm)
                objects.append(obj)
                ingress, egress = obj.program("nodeport_ingress"), obj.program("nodeport_egress")
                local_port = FIRST_NODE_PORT + 2 * (services // 2)  # a service in the middle
                remote_port = local_port + 1
                tag = f"{services} svc, {mode}, {algorithm}"
                remote_verdict = TC_ACT_REDIRECT
                cases += [
                    Case(f"new flow, local backend ({tag})", ingress, to_node_port(local_port),
                         bed.ext, TC_ACT_OK),
                    Case(f"new flow, remote backend ({tag})", ingress, to_node_port(remote_port),
                         bed.ext, remote_verdict),
                    Case(f"established, local backend ({tag})", ingress, known(local_port),
                         bed.ext, TC_ACT_OK),
                    Case(f"established, remote backend ({tag})", ingress, known(remote_port),
                         bed.ext, remote_verdict),
                ]  # fmt: skip
                if mode == "snat" and algorithm == "random":
                    cases += reply_cases(bed, obj, ingress, egress, local_port, remote_port, tag)
        cases.append(Case("no service (pass)", objects[1].program("nodeport_ingress"),
                          lambda i: packet(CLIENT, NODE_IP, sport=10_000 + i, dport=22),
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
        return packet(LOCAL_POD, CLIENT, sport=TARGET, dport=60_000 + i % 1000)

    return [
        Case(f"reply, remote backend ({tag})", ingress, snat_reply, bed.ext, TC_ACT_REDIRECT),
        Case(f"reply, local backend ({tag})", egress, local_reply, bed.ext, TC_ACT_OK),
    ]


if __name__ == "__main__":
    main()
