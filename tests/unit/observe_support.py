"""Flow events as the datapath writes them (dicts shaped like `struct flow_event`) and a
resolver standing in for the agent's tables."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from membrane.observe.record import EndpointView, RuleView

BOOT_WALL = 1_732_183_200.0  # 2024-11-21T10:00:00Z: wall time at ktime 0
WEB = EndpointView(
    id=12,
    namespace="shop",
    name="web",
    ipv4="198.18.0.10",
    identity=256,
    labels=["k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop"],
)
DB = EndpointView(
    id=13,
    namespace="shop",
    name="db",
    ipv4="198.18.0.11",
    identity=257,
    labels=["k8s:app=db", "k8s:io.kubernetes.pod.namespace=shop"],
)
ALLOW_DB = RuleView(
    kind="CiliumNetworkPolicy",
    namespace="shop",
    name="db-from-web",
    direction="ingress",
    deny=False,
    index=0,
    description="from app=web to 5432/TCP",
    l3=True,
    l4=True,
)
DENY_WORLD = RuleView(
    kind="CiliumClusterwideNetworkPolicy",
    namespace=None,
    name="no-world",
    direction="ingress",
    deny=True,
    index=1,
    description="deny from world",
    l3=True,
    l4=False,
)


@dataclass
class FakeResolver:
    endpoints: list[EndpointView] = field(default_factory=lambda: [WEB, DB])
    rules: dict[int, RuleView] = field(default_factory=lambda: {7: ALLOW_DB, 9: DENY_WORLD})
    identities: dict[int, list[str]] = field(default_factory=dict)

    def endpoint_by_id(self, ep_id: int) -> EndpointView | None:
        return next((ep for ep in self.endpoints if ep.id == ep_id), None)

    def endpoint_by_ip(self, ip: str) -> EndpointView | None:
        return next((ep for ep in self.endpoints if ep.ipv4 == ip), None)

    def identity_labels(self, identity: int) -> list[str]:
        return self.identities.get(identity, [])

    def rule(self, rule_id: int) -> RuleView | None:
        return self.rules.get(rule_id)

    def ktime_to_wall(self, ts_ns: int) -> float:
        return BOOT_WALL + ts_ns / 1e9


def addr(ip: str) -> list[int]:
    """An address as the struct's four u32 read on this host (network order in memory;
    IPv4 in the first)."""
    packed = ipaddress.ip_address(ip).packed.ljust(16, b"\0")
    return [int.from_bytes(packed[i : i + 4], sys.byteorder) for i in range(0, 16, 4)]


def event(**fields: Any) -> dict[str, Any]:
    """web (ep 12) opening TCP 43512 -> db:5432, seen at db's ingress, allowed by rule 7."""
    h = {"ts_ns": 1_123_456_789, "version": 1, "type": 1, "cpu": 0}
    h.update(fields.pop("h", {}))
    ev = {
        "h": h,
        "saddr": addr(WEB.ipv4),
        "daddr": addr(DB.ipv4),
        "sport": 43512,
        "dport": 5432,
        "proto": 6,
        "dir": 0,
        "tcp_flags": 0x02,
        "match": 1,
        "ep_id": DB.id,
        "drop_reason": 0,
        "peer_identity": WEB.identity,
        "rule_id": 7,
        "policy_rev": 3,
        "len": 60,
    }
    ev.update(fields)
    return ev


def world_drop(**fields: Any) -> dict[str, Any]:
    """203.0.113.9 -> db:5432 dropped at db's ingress by default deny."""
    base = {
        "h": {"type": 2},
        "saddr": addr("203.0.113.9"),
        "sport": 40000,
        "peer_identity": 2,
        "match": 2,
        "rule_id": 0,
        "drop_reason": 133,
    }
    return event(**{**base, **fields})


def flow_event_dtype() -> Any:
    """The numpy dtype of `struct flow_event` (the ring's rows), from the built object;
    skips the test when it is not built."""
    import pytest

    from membrane.bpf.btf import Btf
    from membrane.bpf.object import objects_dir

    obj = objects_dir() / "endpoint.bpf.o"
    if not obj.exists():
        pytest.skip("endpoint.bpf.o is not built (make bpf)")
    return Btf.from_file(obj).dtype("flow_event")


def event_rows(dtype: Any, events: list[dict[str, Any]]) -> Any:
    """Events (dicts shaped like the struct) as ring-buffer rows of `dtype`."""
    import numpy as np

    out = np.zeros(len(events), dtype=dtype)
    for row, ev in zip(out, events, strict=True):
        for name, value in ev.items():
            if name == "h":
                for hname, hvalue in value.items():
                    row["h"][hname] = hvalue
            else:
                row[name] = value
    return out


@contextlib.contextmanager
def on_own_loop(
    make: Callable[[], Awaitable[Any]],
) -> Iterator[tuple[Any, asyncio.AbstractEventLoop]]:
    """The server `make` starts, on an event loop thread of its own (grpc.aio binds a server
    to the loop it is made on), with that loop; stopped and the loop closed after."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        server = asyncio.run_coroutine_threadsafe(make(), loop).result(timeout=10)
        try:
            yield server, loop
        finally:
            asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(timeout=10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@contextlib.contextmanager
def observer_server(store: Any, socket_path: str, node: str = "node-1") -> Iterator[str]:
    """The agent's gRPC Observer server over `store` (on_own_loop); yields its address."""
    from membrane.hubble.server import HubbleServer, ObserverService

    async def start() -> HubbleServer:
        server = HubbleServer(ObserverService(store, node), socket_path)
        await server.start()
        return server

    with on_own_loop(start):
        yield "unix://" + socket_path
