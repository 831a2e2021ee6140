"""Pods around a test agent: an endpoint the agent added (its record as the API returns
it), the echo server a pod may run, and the outside host on a veth to the node."""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

from membrane import netns
from membrane.api.client import ApiClient
from membrane.endpoint.world import ExternalHost, add_external_host
from membrane.testing.agent import AgentProcess

ECHO_SERVER = str(Path(__file__).with_name("echo_server.py"))
ECHO_PORTS = (80, 81, 82)
EXTERNAL_IP = "198.19.1.2"  # the outside host, on a /30 link to the node
EXTERNAL_LINK = "198.19.1.0/30"
EXTERNAL_LINK6 = "2001:db8:ffff:1::/64"  # dual-stack nodes: the host is ::2 on it
EXTERNAL_IP6 = "2001:db8:ffff:1::2"


@dataclass
class Pod:
    """An endpoint of the agent, with what a test or benchmark runs in it."""

    namespace: str
    name: str
    info: dict[str, Any]  # the agent's endpoint record
    server: subprocess.Popen[str] | None = None  # the echo server
    listener: socket.socket | None = None  # a bare listener (traffic.listen)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ip(self) -> str:
        return str(self.info["ipv4"])

    @property
    def ip6(self) -> str | None:
        """Its IPv6 address (None on an IPv4-only node)."""
        return self.info.get("ipv6")

    @property
    def netns(self) -> str:
        return str(self.info["netns"])

    @property
    def id(self) -> int:
        return int(self.info["id"])


def add_pod(
    client: ApiClient,
    ns: str,
    name: str,
    labels: dict[str, str],
    ports: Sequence[str] = (),
) -> tuple[Pod, float]:
    """Add an endpoint through the REST API; the pod and the call's wall time."""
    body = {"namespace": ns, "name": name, "labels": labels, "ports": list(ports)}
    started = time.perf_counter()
    info = client.post("/v1/endpoints", body)
    return Pod(ns, name, info), time.perf_counter() - started


def start_echo_server(ns: str, ports: Sequence[int] = ECHO_PORTS) -> subprocess.Popen[str]:
    """The echo server in `ns`, returned once every socket is bound."""
    proc = netns.popen(ns, [sys.executable, ECHO_SERVER, *map(str, ports)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "ready":
        netns.stop(proc)
        raise RuntimeError(f"echo server in {ns} did not start (said {line!r})")
    return proc


def add_outside_host(
    agent: AgentProcess,
    extra_ips: Iterable[str | IPv4Address] = (),
    extra_ips6: Iterable[str | IPv6Address] = (),
) -> ExternalHost:
    """The outside host (namespace `agent.external_netns`, EXTERNAL_IP on a /30 to the
    node, plus `extra_ips`; on a dual-stack node also EXTERNAL_IP6 plus `extra_ips6`);
    `agent.destroy` removes it."""
    dual = agent.node.node_ip6 is not None
    return add_external_host(
        agent.node,
        agent.external_netns,
        IPv4Address(EXTERNAL_IP),
        IPv4Network(EXTERNAL_LINK),
        extra_ips=[IPv4Address(a) for a in extra_ips],
        link_net6=IPv6Network(EXTERNAL_LINK6) if dual else None,
        extra_ips6=[IPv6Address(a) for a in extra_ips6] if dual else (),
    )
