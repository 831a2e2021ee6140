"""A DDoS test bed: a legitimate client and a flooder in namespaces of their own reach a
server through a router, so both arrive on the server's eth0, where `membrane filter`
guards it; paced senders (flood_sender.py, one process each) and a receiver that counts
the server's datagrams by source.

    legit eth0 --- eth1 router eth0 --- eth0 server
    flood eth0 --- eth2 /

Spoofed sources (198.19.0.0/16 by default) are routed nowhere: the server's answers to
them die at the router, as they would on the Internet.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from membrane import netns
from membrane.netns import Iface, Topology, next_subnet

SENDER = str(Path(__file__).with_name("flood_sender.py"))
SPOOFED = "198.19.0.0/16"


@dataclass(frozen=True)
class Bed:
    legit: Iface
    flood: Iface
    server: Iface


def build(topo: Topology) -> Bed:
    router = topo.namespace("router")
    legit_ns, flood_ns, server_ns = (topo.namespace(r) for r in ("legit", "flood", "server"))
    to_server, server = topo.veth(router, server_ns, subnet=next_subnet())
    legit, to_legit = topo.veth(legit_ns, router, names=("eth0", "eth1"), subnet=next_subnet())
    flood, to_flood = topo.veth(flood_ns, router, names=("eth0", "eth2"), subnet=next_subnet())
    for end, gateway in ((legit, to_legit), (flood, to_flood), (server, to_server)):
        netns.add_route(end.ns, "default", via=gateway.ip)
    with netns.inside(router):
        netns.write_sysctl("net.ipv4.ip_forward", 1)
        for dev in ("all", "default", "eth0", "eth1", "eth2"):
            netns.write_sysctl(f"net.ipv4.conf.{dev}.rp_filter", 0)  # let spoofed sources in
    netns.wait_ping(legit.ns, server.ip)
    netns.wait_ping(flood.ns, server.ip)
    return Bed(legit, flood, server)


def start_sender(topo: Topology, ns: str, **spec: Any) -> subprocess.Popen[str]:
    """flood_sender.py in `ns` with `spec`; `finish` waits for its counts."""
    return topo.popen(ns, [sys.executable, SENDER, json.dumps(spec)], stdout=subprocess.PIPE)


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"flood_sender exited {proc.returncode}")
    return json.loads(out)


@dataclass
class UdpCounter:
    """Datagrams the server receives on `port`, by source address, counted in a thread."""

    ns: str
    ip: str
    port: int
    counts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        with netns.inside(self.ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((self.ip, self.port))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                _, (src, _) = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            self.counts[src] += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def __enter__(self) -> UdpCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
