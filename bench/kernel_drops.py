"""What the kernel drop monitor (bpf/drop_monitor.bpf.c) costs traffic that is not a pod's:
a UDP flood to a closed port on the loopback of a namespace the monitor does not watch,
where every packet is a kernel drop (NO_SOCKET), so the program runs its whole filter
(reason, device, namespace, two hash lookups that miss) once per packet.

    python -m bench.kernel_drops [--packets N] [--rounds R] [--watched K] [--storm N]

Scenarios, alternated round by round so that drift hits them alike:
  off        the program is not attached (the baseline)
  floor      an empty program on the same tracepoint (bpf/bench_drop_floor.bpf.c): what
             attaching anything there costs
  unwatched  attached, with K other namespaces watched (a node's pods), not this one
  watched    attached and this namespace watched: every drop is reported, so past the
             per-CPU rate limit (50 per 100 ms) each is counted as suppressed
Per packet: the workload's own wall time per sendto (C, one process on one CPU), and the
program's run time per kfree_skb from the kernel's BPF run-time statistics (a separate
pass: the statistics add two clock reads to every run).

--storm N: the same flood, N packets from one pod to a closed port of another, with the
real agent (its monitor watching both pods), and again with --kernel-drops=false: the
agent's CPU time, and the drops it delivered as flows (hubble_drop_total). Prints JSON;
summary on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import socket
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench._common import emit, exit_on_sigterm, machine, median
from bench._trace import Workload, bpf_run_time, bpf_run_time_stats, compile_workload
from membrane import netns
from membrane.agent.kernel_drops import drop_reason_names, load_config, unavailable_reason
from membrane.bpf import BpfObject
from membrane.bpf.btf import kernel_btf
from membrane.bpf.links import Link, attach_auto
from membrane.bpf.ringbuf import RingBuffer
from membrane.testing.cluster import running_cluster
from membrane.testing.waiting import wait_for

SCENARIOS = ("off", "floor", "unwatched", "watched")

FLOOD_C = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

static long long work(int argc, char **argv)
{
    long long n = atoll(argv[1]), sent = 0;
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    char payload[16] = "drop me";
    int fd = socket(AF_INET, SOCK_DGRAM, 0);

    if (fd < 0 || inet_pton(AF_INET, argv[2], &to.sin_addr) != 1)
        return -1;
    for (long long i = 0; i < n; i++)  /* unconnected: the ICMP errors are not ours */
        sent += sendto(fd, payload, sizeof(payload), 0, (struct sockaddr *)&to, sizeof(to)) > 0;
    return sent;
}
"""


class Monitor:
    """The drop monitor loaded alone (no agent), its watched set filled by hand."""

    def __init__(self, watched: int) -> None:
        self.obj = BpfObject.open("drop_monitor")
        self.obj.set_config(**load_config(drop_reason_names(kernel_btf())))
        self.obj.load()
        self.map = self.obj.map("drop_watched")
        rng = random.Random(7)
        for i in range(watched):  # pods' namespaces (inode numbers no namespace has here)
            key = self.map.key_type(netns_ino=rng.randrange(1 << 31, 1 << 32), ifindex=0)
            self.map.update(key, self.map.value_type(ep_id=i + 1))
        self.ring = RingBuffer(
            self.obj.map("events"), dtype=self.obj.btf.dtype("kernel_drop_event")
        )
        self.link: Link | None = None

    def watch(self, ino: int, on: bool) -> None:
        key = self.map.key_type(netns_ino=ino, ifindex=0)
        if on:
            self.map.update(key, self.map.value_type(ep_id=0xFFFF))
        else:
            self.map.delete(key)  # False when it was not there

    def attach(self, on: bool) -> None:
        if on and self.link is None:
            self.link = attach_auto(self.obj.program("kernel_drop"))
        elif not on and self.link is not None:
            self.link.close()
            self.link = None

    def drain(self) -> int:
        return len(self.ring.drain())

    def stats(self) -> dict[str, int]:
        per_cpu = self.obj.map("drop_stats").lookup(0)
        lost = self.obj.map("events_lost").lookup(0)
        return {
            "watched": sum(s.watched for s in per_cpu),
            "suppressed": sum(s.suppressed for s in per_cpu),
            "lost": sum(lost),
        }

    def close(self) -> None:
        self.attach(False)
        self.ring.close()
        self.obj.close()


@contextlib.contextmanager
def bench_namespace() -> Iterator[str]:
    name = netns.create(f"mbkd{os.getpid()}")
    try:
        yield name
    finally:
        netns.delete(name)


def flood(
    binary: Path, ns: str, packets: int, to: str = "127.0.0.1", port: int = 9
) -> tuple[int, int]:
    """The workload's wall ns and packets sent, run in `ns`."""
    w = Workload(["nsenter", f"--net={netns.path(ns)}", str(binary), str(packets), to, str(port)])
    try:
        wall, _cpu, sent = w.run()
    finally:
        w.kill()
    return wall, sent


def unknown_drops(address: str) -> float:
    """hubble_drop_total of DROP_REASON_UNKNOWN (the kernel's drops), all protocols."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        lines = resp.read().decode().splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("hubble_drop_total{") and 'reason="DROP_REASON_UNKNOWN"' in line
    )


def warm_up(binary: Path, ns: str, to: str, metrics: str) -> bool:
    flood(binary, ns, 100, to, 9)
    return unknown_drops(metrics) > 0


def storm(binary: Path, packets: int) -> dict[str, Any]:
    """Pod to pod, every packet a kernel drop: the agent with its monitor, and without."""
    out: dict[str, Any] = {"packets": packets}
    for monitor in (True, False):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            metrics = f"127.0.0.1:{probe.getsockname()[1]}"
        args = ["--hubble-metrics-server", metrics, f"--kernel-drops={str(monitor).lower()}"]
        with running_cluster(namespaces=("x",), pod_names=("a", "b"), extra_args=args) as c:
            a, b = c.pods["x/a"], c.pods["x/b"]
            if monitor:  # until it watches the pods and has named a drop's place
                wait_for(
                    "the first kernel drops delivered",
                    functools.partial(warm_up, binary, a.netns, b.ip, metrics),
                    timeout=30,
                    interval=0.2,
                )
            cpu0, delivered0 = c.agent.cpu_s(), unknown_drops(metrics)
            wall, sent = flood(binary, a.netns, packets, b.ip, 9)
            cpu = c.agent.cpu_s() - cpu0
            delivered = unknown_drops(metrics) - delivered0
        out["monitor" if monitor else "no_monitor"] = {
            "seconds": round(wall / 1e9, 2),
            "packets_per_s": round(sent / (wall / 1e9)),
            "agent_cpu_s": round(cpu, 2),
            "agent_cpu_share": round(cpu / (wall / 1e9), 3),
            "kernel_drops_delivered": int(delivered),
        }
    return out


class Floor:
    """The empty program on kfree_skb, attached while it is asked for."""

    def __init__(self) -> None:
        self.obj = BpfObject.open("bench_drop_floor").load()
        self.link: Link | None = None

    def attach(self, on: bool) -> None:
        if on and self.link is None:
            self.link = attach_auto(self.obj.program("kfree_skb_floor"))
        elif not on and self.link is not None:
            self.link.close()
            self.link = None

    def close(self) -> None:
        self.attach(False)
        self.obj.close()


def setup(mon: Monitor, floor: Floor, scenario: str, ino: int) -> None:
    floor.attach(scenario == "floor")
    mon.attach(scenario in ("unwatched", "watched"))
    mon.watch(ino, scenario == "watched")


def main() -> None:
    exit_on_sigterm()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--packets", type=int, default=300_000, help="per round and scenario")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--watched", type=int, default=1000, help="other namespaces watched")
    p.add_argument("--storm", type=int, default=0, help="packets pod to pod with the agent")
    args = p.parse_args()
    if (why := unavailable_reason()) is not None:
        raise SystemExit(f"the kernel drop monitor cannot run here: {why}")
    result: dict[str, Any] = {
        "benchmark": "kernel_drops",
        "machine": machine(),
        "packets": args.packets,
        "rounds": args.rounds,
        "watched_namespaces": args.watched,
    }
    with tempfile.TemporaryDirectory() as tmp, bench_namespace() as ns:
        binary = compile_workload(Path(tmp), "flood", FLOOD_C)
        ino = os.stat(netns.path(ns)).st_ino
        mon, floor = Monitor(args.watched), Floor()
        try:
            per_packet: dict[str, list[float]] = {s: [] for s in SCENARIOS}
            events = {"reported": 0, "suppressed": 0, "lost": 0}
            for _ in range(args.rounds):
                for scenario in SCENARIOS:
                    setup(mon, floor, scenario, ino)
                    before = mon.stats()
                    wall, sent = flood(binary, ns, args.packets)
                    per_packet[scenario].append(wall / max(sent, 1))
                    if scenario == "watched":
                        after = mon.stats()
                        events["reported"] += mon.drain()
                        events["suppressed"] += after["suppressed"] - before["suppressed"]
                        events["lost"] += after["lost"] - before["lost"]
                    mon.drain()
            # the program's own time per run, from the kernel's statistics
            run_ns: dict[str, float] = {}
            with bpf_run_time_stats():
                for scenario in ("floor", "unwatched", "watched"):
                    setup(mon, floor, scenario, ino)
                    t0, n0 = bpf_run_time(os.getpid())
                    flood(binary, ns, args.packets)
                    t1, n1 = bpf_run_time(os.getpid())
                    run_ns[scenario] = (t1 - t0) / max(n1 - n0, 1)
                    result.setdefault("program_runs", {})[scenario] = n1 - n0
                    mon.drain()
        finally:
            mon.close()
            floor.close()
        if args.storm:
            result["storm"] = storm(binary, args.storm)
    base = median(per_packet["off"])
    result["ns_per_packet"] = {s: round(median(v), 1) for s, v in per_packet.items()}
    result["ns_per_packet_rounds"] = {s: [round(x, 1) for x in v] for s, v in per_packet.items()}
    attached = ("floor", "unwatched", "watched")
    result["added_ns_per_packet"] = {s: round(median(per_packet[s]) - base, 1) for s in attached}
    result["throughput_ratio_vs_off"] = {
        s: round(base / median(per_packet[s]), 3) for s in attached
    }
    result["program_ns_per_run"] = {s: round(v, 1) for s, v in run_ns.items()}
    # what the monitor's own work costs per run, above an empty program's
    result["filter_ns_per_run"] = {
        s: round(run_ns[s] - run_ns["floor"], 1) for s in ("unwatched", "watched")
    }
    result["watched_events"] = events
    emit(
        result,
        [
            f"sendto to a closed port: off {result['ns_per_packet']['off']} ns/packet, "
            f"unwatched {result['ns_per_packet']['unwatched']} "
            f"(ratio {result['throughput_ratio_vs_off']['unwatched']}), "
            f"watched {result['ns_per_packet']['watched']} "
            f"(ratio {result['throughput_ratio_vs_off']['watched']})",
            f"program per kfree_skb: empty {run_ns['floor']:.1f} ns, unwatched "
            f"{run_ns['unwatched']:.1f} ns (filter {result['filter_ns_per_run']['unwatched']}), "
            f"watched, rate-limited {run_ns['watched']:.1f} ns",
            f"watched: {events['reported']} events, {events['suppressed']} suppressed, "
            f"{events['lost']} lost",
        ]
        + ([f"storm: {result['storm']}"] if "storm" in result else []),
    )


if __name__ == "__main__":
    main()
