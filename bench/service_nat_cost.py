"""Per-packet cost of the endpoint programs' ClusterIP translation (bpf/lib/service_nat.h),
measured in the kernel with BPF_PROG_TEST_RUN, IPv4 and IPv6, and optionally against the
endpoint object of another build (`--before`, e.g. the build without the translation) on
the same maps and packets.

One endpoint (loaded as the agent loads it: with the service CIDRs 198.19.128.0/17 and
2001:db8:f::/112), no policy enforced, one Service (ClusterIP:80 -> a pod's :5201, TCP).
Per round, conntrack and the translation's records are emptied and two connections opened
by SYN / SYN-ACK / ACK through both programs: one straight to a pod, one to the ClusterIP
(translated). Cases, per family:

  pod, established / reply        a data segment of the direct connection (from_container)
                                  and the pod's answer (to_container): what every other
                                  packet pays now (a compare with the service CIDR; the
                                  reply a flag test), `--repeat` per test run, against the
                                  empty tc program and the `--before` build
  ClusterIP, established / reply  the same for the translated connection: svc_nat lookup,
                                  DNAT and checksums (from_container), reverse translation
                                  (to_container). A test run's repetitions share one skb,
                                  which the first one rewrites, so these run one packet per
                                  test run (`--runs` of them, alternating with the pod's
                                  case and the empty program on the same method)

    python -m bench.service_nat_cost [--before PATH] [--repeat N] [--rounds N] [--runs N]
"""

from __future__ import annotations

import argparse
import ctypes
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from bench._common import emit, exit_on_sigterm, machine
from bench._common import median as _median
from bench.endpoint_cost import ACK, SYN, SYNACK, node_maps, segment
from membrane.bpf import BpfObject, Program, test_run
from membrane.datapath import EndpointPolicy, PolicyWriter, load_endpoint
from membrane.datapath import endpoint_prog as endpoint_prog_module
from membrane.datapath.abi import ENDPOINT_OBJECT, PROG_FROM_CONTAINER, PROG_TO_CONTAINER
from membrane.datapath.ipcache import sync_ipcache
from membrane.datapath.service_nat import service_nat_config
from membrane.service.maps import ServiceIds
from membrane.service.model import (
    Endpoint,
    EndpointPort,
    EndpointSliceRecord,
    ServicePort,
    ServiceRecord,
)
from membrane.service.plan import NodeView, plan
from membrane.service.socklb import SocketLb

Address = IPv4Address | IPv6Address
CIDRS = (IPv4Network("198.19.128.0/17"), IPv6Network("2001:db8:f::/112"))
EP_ID, EP_IDENTITY, PEER_IDENTITY = 1, 256, 257
PORT, VIP_PORT, PAYLOAD = 5201, 80, 64
DIRECT_SPORT, SERVICE_SPORT = 40000, 40002
TC_ACT_OK = 0


@dataclass(frozen=True)
class Family:
    name: str
    ep: Address
    backend: Address  # the Service's one backend
    peer: Address  # another pod, reached directly
    vip: Address


FAMILIES = (
    Family("ipv4", IPv4Address("198.18.0.2"), IPv4Address("198.18.0.3"),
           IPv4Address("198.18.0.4"), IPv4Address("198.19.128.10")),
    Family("ipv6", IPv6Address("2001:db8:1::2"), IPv6Address("2001:db8:1::3"),
           IPv6Address("2001:db8:1::4"), IPv6Address("2001:db8:f::10")),
)  # fmt: skip


def service() -> tuple[ServiceRecord, list[EndpointSliceRecord]]:
    svc = ServiceRecord(
        "bench", "web", (ServicePort("http", VIP_PORT, "TCP", PORT),),
        tuple(str(f.vip) for f in FAMILIES),
    )  # fmt: skip
    slices = [
        EndpointSliceRecord(
            "bench",
            f"web-{f.name}",
            "web",
            (EndpointPort("http", PORT, "TCP"),),
            (Endpoint((str(f.backend),), "active", 1),),
        )
        for f in FAMILIES
    ]
    return svc, slices


@dataclass
class Case:
    name: str
    family: str
    run: Callable[[], float]  # ns per packet of one measurement
    ns: list[float] = field(default_factory=list)


def repeated(
    prog: Program, data: bytes, repeat: int, expect: int = TC_ACT_OK
) -> Callable[[], float]:
    def run() -> float:
        result = test_run(prog, data, repeat=repeat)
        if ctypes.c_int32(result.retval).value != expect:
            raise RuntimeError(f"{prog.name}: verdict {result.retval}")
        return float(result.duration_ns)

    return run


def one_per_run(prog: Program, data: bytes, runs: int) -> Callable[[], float]:
    def run() -> float:
        total = 0
        for _ in range(runs):
            result = test_run(prog, data, repeat=1)
            if ctypes.c_int32(result.retval).value != TC_ACT_OK and prog.name != "empty_tc":
                raise RuntimeError(f"{prog.name}: verdict {result.retval}")
            total += result.duration_ns
        return total / runs

    return run


def load(pin_dir: str, path: str | None, translation: bool) -> BpfObject:
    """The endpoint object for EP_ID: this build's, or the file at `path` (another build);
    with the service CIDRs when `translation`."""
    config = service_nat_config(CIDRS) if translation else {}
    if path is not None:  # load_endpoint opens the object that this name says
        endpoint_prog_module.ENDPOINT_OBJECT = path
    try:
        return load_endpoint(pin_dir, EP_ID, FAMILIES[0].ep, FAMILIES[1].ep, **config)
    finally:
        endpoint_prog_module.ENDPOINT_OBJECT = ENDPOINT_OBJECT


def median(values: list[float]) -> float:
    return round(_median(values), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="endpoint.bpf.o of the build to compare with")
    parser.add_argument("--object", help="endpoint.bpf.o to measure (default: this build's)")
    parser.add_argument("--repeat", type=int, default=1_000_000, help="packets per test run")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved runs per case")
    parser.add_argument("--runs", type=int, default=20_000, help="one-packet test runs per round")
    args = parser.parse_args()
    exit_on_sigterm()
    host = machine()
    with ExitStack() as stack:
        maps = stack.enter_context(node_maps())
        ipcache: dict[Any, tuple[int, int]] = {}
        for f in FAMILIES:
            bits = f.ep.max_prefixlen
            net = IPv4Network if f.ep.version == 4 else IPv6Network
            ipcache[net((f.ep, bits))] = (EP_IDENTITY, EP_ID)
            ipcache[net((f.backend, bits))] = (PEER_IDENTITY, 2)
            ipcache[net((f.peer, bits))] = (PEER_IDENTITY, 3)
        sync_ipcache(maps, ipcache)
        PolicyWriter(maps).apply({EP_ID: EndpointPolicy(False, False, [])}, {EP_ID: EP_IDENTITY})
        lb = SocketLb.start(maps.pin_dir, "", (4, 6))
        stack.callback(lb.close)
        svc, slices = service()
        node = NodeView((), {4: ("198.19.0.1",), 6: ("2001:db8::1",)}, 251)
        lb.maps.apply(plan([svc], slices, node), ServiceIds.from_json(None))
        obj = stack.enter_context(load(maps.pin_dir, args.object, True))
        egress, ingress = obj.program(PROG_FROM_CONTAINER), obj.program(PROG_TO_CONTAINER)
        before = (
            stack.enter_context(load(maps.pin_dir, args.before, False)) if args.before else None
        )
        empty = stack.enter_context(BpfObject.open("bench_empty")).load().program("empty_tc")
        svc_nat = (obj.map("svc_nat"), obj.map("svc_nat6"))

        def handshakes() -> None:
            for m in (maps.ct, maps.ct6, *svc_nat):
                m.clear()
            for f in FAMILIES:
                for server, sport, dport, answer_from in (
                    (f.peer, DIRECT_SPORT, PORT, f.peer),
                    (f.vip, SERVICE_SPORT, VIP_PORT, f.backend),
                ):
                    for prog, frame in (
                        (egress, segment(f.ep, server, sport, dport, SYN)),
                        (ingress, segment(answer_from, f.ep, PORT, sport, SYNACK)),
                        (egress, segment(f.ep, server, sport, dport, ACK)),
                    ):
                        if test_run(prog, frame, repeat=1).retval != TC_ACT_OK:
                            raise RuntimeError(f"handshake to {server} failed")

        cases: list[Case] = []
        for f in FAMILIES:
            n = f.name
            out_pod = segment(f.ep, f.peer, DIRECT_SPORT, PORT, ACK, PAYLOAD)
            in_pod = segment(f.peer, f.ep, PORT, DIRECT_SPORT, ACK, PAYLOAD)
            out_vip = segment(f.ep, f.vip, SERVICE_SPORT, VIP_PORT, ACK, PAYLOAD)
            in_vip = segment(f.backend, f.ep, PORT, SERVICE_SPORT, ACK, PAYLOAD)
            rep = args.repeat
            cases += [
                Case("empty tc", n, repeated(empty, out_pod, rep, -1)),
                Case("from_container, established, to a pod", n, repeated(egress, out_pod, rep)),
                Case("to_container, reply, from a pod", n, repeated(ingress, in_pod, rep)),
            ]
            if before is not None:
                b_eg, b_in = before.program(PROG_FROM_CONTAINER), before.program(PROG_TO_CONTAINER)
                cases += [
                    Case("before: from_container, established, to a pod", n,
                         repeated(b_eg, out_pod, rep)),
                    Case("before: to_container, reply, from a pod", n, repeated(b_in, in_pod, rep)),
                ]  # fmt: skip
            runs = args.runs
            cases += [
                Case("one per run: empty tc", n, one_per_run(empty, out_pod, runs)),
                Case("one per run: from_container, established, to a pod", n,
                     one_per_run(egress, out_pod, runs)),
                Case("one per run: from_container, established, to the ClusterIP", n,
                     one_per_run(egress, out_vip, runs)),
                Case("one per run: to_container, reply, from a pod", n,
                     one_per_run(ingress, in_pod, runs)),
                Case("one per run: to_container, reply, from the ClusterIP's backend", n,
                     one_per_run(ingress, in_vip, runs)),
            ]  # fmt: skip
        for case in cases:  # warm up
            case.run()
        for rnd in range(args.rounds):
            handshakes()
            order = cases if rnd % 2 == 0 else cases[::-1]
            for case in order:
                case.ns.append(case.run())
        # the translated packets really were translated (and the direct ones were not)
        for f in FAMILIES:
            out = test_run(egress, segment(f.ep, f.vip, SERVICE_SPORT, VIP_PORT, ACK, 8)).data
            raw = bytes(f.backend.packed)
            if raw not in out and not args.object:
                raise RuntimeError(f"{f.name}: the packet to the ClusterIP was not translated")

    results: dict[str, dict[str, Any]] = {}
    for case in cases:
        results.setdefault(case.name, {})[case.family] = {
            "ns_per_packet": median(case.ns),
            "rounds_ns": [round(v, 1) for v in case.ns],
        }
    summary = []
    for name, by_family in results.items():
        summary.append(
            f"{name:70s} "
            + "  ".join(f"{fam} {v['ns_per_packet']:8.1f}" for fam, v in by_family.items())
        )
    emit(
        {
            "bench": "service_nat_cost",
            "machine": host,
            "method": {
                "tool": "BPF_PROG_TEST_RUN",
                "repeat": args.repeat,
                "rounds": args.rounds,
                "one_per_run_runs": args.runs,
                "statistic": "median over rounds of the kernel's mean per repetition",
                "before": args.before,
                "object": args.object,
            },
            "cases": results,
        },
        summary,
    )


if __name__ == "__main__":
    main()
