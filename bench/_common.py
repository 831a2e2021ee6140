"""What the benchmarks share: the 10,000-prefix rule set, the test packets, map keys built
from the objects' BTF, the machine description and the output convention."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import sys
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

from membrane.bpf import BpfObject
from membrane.filter.keys import DropDstTables
from membrane.filter.rules import IPNetwork

# Every address a benchmark uses, as traffic or as a rule, lies in the test range.
TEST_RANGE = IPv4Network("198.18.0.0/15")
TEST_RANGE_V6 = IPv6Network("2001:db8::/32")
RULES = 10_000
XDP_PASS, XDP_DROP = 2, 1
TC_ACT_UNSPEC, TC_ACT_SHOT = 0xFFFFFFFF, 2  # the retval test runs report (-1 as __u32)


def random_prefixes(
    count: int,
    within: IPNetwork,
    avoid: IPNetwork,
    lengths: Sequence[tuple[int, int]],
    seed: int,
) -> list[IPNetwork]:
    """`count` distinct prefixes inside `within`, none overlapping `avoid`, their lengths
    drawn with the given (prefix length, weight) pairs: random, but the same every run."""
    rng = random.Random(seed)
    sizes, weights = [n for n, _ in lengths], [w for _, w in lengths]
    found: set[IPNetwork] = set()
    while len(found) < count:
        prefixlen = rng.choices(sizes, weights=weights)[0]
        address = within.network_address + rng.randrange(within.num_addresses)
        net = ip_network((address, prefixlen), strict=False)
        if not net.overlaps(avoid):
            found.add(net)
    return sorted(found)


def drop_prefixes(count: int, avoid: IPv4Network, seed: int = 7) -> list[IPv4Network]:
    """`count` distinct prefixes inside 198.18.0.0/15 that never cover `avoid` (where the
    measured traffic goes): 70 % /32, 20 % /24, 10 % /28, like a blocklist of hosts and a
    few networks. They crowd the whole range, so a lookup for an address in `avoid` walks
    a deep trie and misses late, instead of leaving the trie at its first node."""
    return random_prefixes(count, TEST_RANGE, avoid, ((32, 7), (24, 2), (28, 1)), seed)  # type: ignore[return-value]


def scenario_arguments(
    doc: str | None, scenarios: Sequence[str], duration: float, rounds: int
) -> argparse.ArgumentParser:
    """The command line of a throughput benchmark: seconds per test, rounds over all
    scenarios and which of them; more options may be added before parsing."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=duration, help="seconds per iperf3 test")
    parser.add_argument("--rounds", type=int, default=rounds, help="rounds over all scenarios")
    parser.add_argument(
        "--scenarios",
        default=",".join(scenarios),
        help=f"comma-separated subset of {','.join(scenarios)}",
    )
    return parser


def chosen_scenarios(
    parser: argparse.ArgumentParser, args: argparse.Namespace, scenarios: Sequence[str]
) -> list[str]:
    """The scenarios `--scenarios` names (an unknown one is a usage error)."""
    chosen = [s for s in args.scenarios.split(",") if s]
    if unknown := set(chosen) - set(scenarios):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return chosen


def drop_dst_tables(obj: BpfObject) -> DropDstTables:
    """The drop-dst tables of a loaded filter_xdp object."""
    return DropDstTables.of(obj.map)


def fill_drop_dst(obj: BpfObject, prefixes: Sequence[IPNetwork]) -> DropDstTables:
    """The filter's drop-dst tables := prefixes (IPv4 or IPv6) with rule ids 1..n, written
    the way the manager writes them."""
    tables = drop_dst_tables(obj)
    written = tables.add((net, i) for i, net in enumerate(prefixes, 1))
    if written != len(prefixes) or len(tables.v4) + len(tables.v6) != len(prefixes):
        raise RuntimeError(f"the drop-dst tables took {written} of {len(prefixes)} prefixes")
    return tables


def packet(
    src: str | IPv4Address | IPv6Address,
    dst: str | IPv4Address | IPv6Address,
    *,
    proto: str = "tcp",
    sport: int = 40000,
    dport: int = 5201,
    payload: int = 64,
) -> bytes:
    """An Ethernet/IPv4 (or IPv6, for IPv6 addresses) packet with a `payload`-byte payload
    (TCP ACK with timestamps, the shape of a bulk-transfer segment, or UDP)."""
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    l4: Any
    if proto == "tcp":
        l4 = TCP(
            sport=sport,
            dport=dport,
            flags="A",
            seq=1,
            ack=1,
            options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 1))],
        )
    else:
        l4 = UDP(sport=sport, dport=dport)
    frame = (
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / (
            IPv6(src=str(src), dst=str(dst), hlim=64)
            if ip_address(str(dst)).version == 6
            else IP(src=str(src), dst=str(dst), ttl=64)
        )
        / l4
        / (b"\xa5" * payload)
    )
    return bytes(frame)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """The sample at fraction `q` (0..1) of the sorted values (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        # others' work on a shared machine moves every absolute number: say how busy it was
        "loadavg_1m_at_start": os.getloadavg()[0],
    }


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so `with Topology()` and `finally` clean up as they do
    on Ctrl-C (the default SIGTERM action would leave namespaces behind)."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def emit(result: dict[str, Any], summary: Sequence[str]) -> None:
    """The convention of every benchmark: JSON on stdout, a short summary on stderr."""
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    for line in summary:
        print(line, file=sys.stderr)
