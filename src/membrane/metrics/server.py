"""The two metrics HTTP servers of `membrane agent run`, as in Cilium: the agent's
(`--prometheus-serve-addr`, cilium_* and process_*) and Hubble's (`--hubble-metrics-server`,
hubble_*). Each serves `/metrics` from a thread of its own; a scrape reads only the
kernel's maps, the agent's published snapshot and the flow counts."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from membrane.errors import UserError
from membrane.metrics.address import parse_listen_address
from membrane.metrics.agent import AgentCollector, PolicyChanges
from membrane.metrics.flows import FlowCounts
from membrane.metrics.hubble import HubbleCollector

if TYPE_CHECKING:
    from membrane.agent.snapshot import Snapshot

log = logging.getLogger("membrane.agent")


class MetricsServers:
    """Registries and their listening servers. Listening comes first (a taken port fails
    the agent before it changes anything); `attach` then points the collectors at the
    started agent."""

    def __init__(self, agent_addr: str = "", hubble_addr: str = "") -> None:
        disable_created_metrics()  # no *_created series: Cilium's Go client has none
        self.counts = FlowCounts()
        self.agent_registry = CollectorRegistry(auto_describe=True)
        self.hubble_registry = CollectorRegistry(auto_describe=True)
        self.agent = AgentCollector(self.counts)
        self.agent_registry.register(self.agent)
        ProcessCollector(registry=self.agent_registry)
        self.policy = PolicyChanges(self.agent_registry)
        self.hubble = HubbleCollector(self.counts)
        self.hubble_registry.register(self.hubble)
        self._servers: list[WSGIServer] = []
        try:
            for option, addr, registry in (
                ("prometheus-serve-addr", agent_addr, self.agent_registry),
                ("hubble-metrics-server", hubble_addr, self.hubble_registry),
            ):
                self._listen(option, addr, registry)
        except BaseException:
            self.stop()
            raise

    def _listen(self, option: str, addr: str, registry: CollectorRegistry) -> None:
        where = parse_listen_address(addr, option)
        if where is None:
            return
        host, port = where
        try:
            server, _thread = start_http_server(port, host or _every_address(), registry)
        except OSError as err:
            raise UserError(option, f"cannot listen on {addr}: {err.strerror or err}") from None
        self._servers.append(server)
        log.info("metrics listening", extra={"fields": {"option": option, "address": addr}})

    @property
    def ports(self) -> list[int]:
        """The ports listened on (for tests that ask for port 0)."""
        return [s.server_address[1] for s in self._servers]

    def attach(
        self,
        snapshot: Callable[[], Snapshot],
        bpf_dir: str,
        lost: Callable[[], Mapping[str, int]],
    ) -> None:
        self.agent.attach(snapshot, bpf_dir)
        self.hubble.lost = lost

    def stop(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            server.shutdown()
            server.server_close()
        self.agent.close()


def _every_address() -> str:
    """`:PORT` listens on IPv4 and IPv6 where the machine has IPv6 (as Cilium's Go
    listener does), else on IPv4."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET6, socket.SOCK_STREAM):
        return "::"
    return "0.0.0.0"
