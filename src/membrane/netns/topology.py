"""Topology: a cleanup registry for everything a test, benchmark or demo builds.

    with Topology() as topo:
        pair = topo.pair()                          # client/server namespaces over a veth
        topo.popen(pair.server.ns, ["iperf3", "-s"])
        run(pair.client.ns, ["iperf3", "-c", pair.server.ip, "-t", "1"])
    # processes stopped, namespaces (and their devices) deleted, also on an exception

Cleanups run last-in first-out, so a process is stopped before its namespace goes and a
BPF link registered with `callback` is detached before its device disappears.
"""

from __future__ import annotations

import itertools
import random
import secrets
import subprocess
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network
from typing import Any, NamedTuple

from membrane.netns import links, namespace, process
from membrane.netns.probe import wait_ping

# Test subnets come from the pod range 198.18.0.0/16: a /24 per pair, 198.18.1.0 to
# 198.18.254.0 in turn from a random start, so that concurrent runs rarely use the same one
# at the same time (their namespaces keep them apart anyway).
_FIRST_SUBNET = random.randrange(254)
_handed_out = itertools.count()


def next_subnet() -> IPv4Network:
    """A /24 of 198.18.0.0/16 that this process has not handed out in its last 253 calls."""
    n = (_FIRST_SUBNET + next(_handed_out)) % 254 + 1
    return IPv4Network(f"198.18.{n}.0/24")


@dataclass(frozen=True)
class Iface:
    """One end of a link: the namespace it lives in, its name, its address (if any)."""

    ns: str
    name: str
    address: IPv4Interface | None = None

    @property
    def ip(self) -> str:
        if self.address is None:
            raise ValueError(f"{self.name} in {self.ns} has no address")
        return str(self.address.ip)

    def ifindex(self) -> int:
        return namespace.ifindex(self.ns, self.name)


class Pair(NamedTuple):
    client: Iface
    server: Iface


class Topology:
    """Creates namespaces, veths and processes, and undoes all of it on close.

    Namespaces are named `<tag>-<role>` with a random tag (`mbt-3fa9c1-server`), so
    concurrent or leftover runs never collide and a person can see what belongs together
    in `ip netns list`."""

    def __init__(self, prefix: str = "mbt") -> None:
        self.tag = f"{prefix}-{secrets.token_hex(3)}"
        self.namespaces: list[str] = []
        self._cleanups = ExitStack()

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Undo everything, newest first; every cleanup runs even if an earlier one fails
        (the first failure is raised afterwards, chained to the others)."""
        self._cleanups.close()
        self.namespaces.clear()

    def callback(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Register a cleanup of your own (detach a BPF link, remove a pin, ...)."""
        self._cleanups.callback(fn, *args, **kwargs)

    def namespace(self, role: str) -> str:
        """Create namespace `<tag>-<role>` (loopback up); returns its name."""
        name = namespace.create(f"{self.tag}-{role}")
        self.callback(namespace.delete, name)
        self.namespaces.append(name)
        return name

    def veth(
        self,
        ns_a: str,
        ns_b: str,
        *,
        names: tuple[str, str] = ("eth0", "eth0"),
        subnet: IPv4Network | str | None = None,
    ) -> tuple[Iface, Iface]:
        """A veth between `ns_a` and `ns_b` (either may be a namespace this topology did
        not create), both ends up; with a subnet, the ends get its first two addresses."""
        links.add_veth(ns_a, names[0], ns_b, names[1])
        self.callback(links.delete_link, ns_a, names[0])
        ends = []
        hosts = IPv4Network(subnet).hosts() if subnet is not None else None
        for ns, dev in ((ns_a, names[0]), (ns_b, names[1])):
            address = None
            if hosts is not None:
                address = IPv4Interface(f"{next(hosts)}/{IPv4Network(subnet).prefixlen}")
                links.add_address(ns, dev, address)
            links.set_up(ns, dev)
            ends.append(Iface(ns, dev, address))
        return ends[0], ends[1]

    def pair(
        self,
        subnet: IPv4Network | str | None = None,
        *,
        roles: tuple[str, str] = ("client", "server"),
    ) -> Pair:
        """Two fresh namespaces joined by a veth (`eth0` on both sides) with addresses
        .1 (client) and .2 (server) of `subnet` (default: `next_subnet()`); returns once
        the server answers ping."""
        client_ns, server_ns = self.namespace(roles[0]), self.namespace(roles[1])
        client, server = self.veth(client_ns, server_ns, subnet=subnet or next_subnet())
        wait_ping(client.ns, server.ip)
        return Pair(client, server)

    def popen(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """Start a program in `ns` that is stopped (by PID) when the topology closes."""
        proc = process.popen(ns, argv, **kwargs)
        self.callback(process.stop, proc)
        return proc
