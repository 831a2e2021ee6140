"""Drops anywhere (issue 11 part 5): packets of the node's endpoints that the kernel drops
outside our datapath (no socket, netfilter, no route, a full receive queue, ...), as Hubble
flows with the kernel's own drop reason, so `membrane observe -t drop` is the one place to
look when A cannot reach B.

bpf/drop_monitor.bpf.c reports them from the skb:kfree_skb tracepoint. This module loads
it when the agent starts, keeps its watched set (`drop_watched`) in step with the
endpoints, reads its ring buffer on a thread of its own, and turns each event into a
flow.Flow built by the same code as the datapath's drops (membrane.observe.record), handed
to the same `deliver` callback as the FlowReader's.

The drop reasons are the running kernel's `enum skb_drop_reason`, read from its BTF: the
enum differs between kernels (numbers shift as reasons are added), so nothing is
hard-coded. Hubble's DropReason has no kernel reasons, so a kernel drop is a drop
(event_type 1, verdict DROPPED) with drop_reason_desc DROP_REASON_UNKNOWN, and the kernel's
reason named in `Summary` ("kernel NO_SOCKET at __udp4_lib_rcv; UDP"), which
`membrane observe -o compact` prints.

Where the kernel cannot do it (no BTF, no tp_btf programs, kfree_skb without a `reason`
argument: Linux < 5.17) the monitor stays off and `unavailable_reason()` says why.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

from membrane import netns
from membrane.abi import (
    DROP_EVENT_KERNEL,
    DROP_IGNORED_MAX,
    MEMBRANE_EVENT_VERSION,
    Direction,
    FlowEventType,
)
from membrane.bpf import BpfObject
from membrane.bpf.btf import FUNC_PROTO, PTR, TYPEDEF, Btf, kernel_btf
from membrane.bpf.errors import BpfError
from membrane.bpf.links import Link, attach_auto
from membrane.bpf.ringbuf import RingBuffer
from membrane.hubble.flow import flow_pb2
from membrane.observe.record import FlowEvent, event_response, lost_response

if TYPE_CHECKING:
    from membrane.agent.agent import Agent
    from membrane.agent.snapshot import Snapshot
    from membrane.agent.state import EndpointRecord

log = logging.getLogger("membrane.agent")
POLL_MS = 100
REASON_PREFIX = "SKB_DROP_REASON_"
# Not reported: our own programs' drops (tc and XDP), which their own events report.
OWN_PROGRAM_REASONS = ("TC_INGRESS", "TC_EGRESS", "XDP")
DEVICES_WATCHED = 0  # drop_watch.ep_id of a namespace whose devices have entries
# The tracepoint's arguments up to `reason` (skb, location, reason): Linux >= 5.17.
_REASON_ARG = 3


# ---- what this kernel can do ------------------------------------------------------------
def drop_reason_names(btf: Btf) -> dict[int, str]:
    """The kernel's drop reasons by number, named as the kernel's drop_monitor and
    perf name them (`NO_SOCKET`, `NETFILTER_DROP`; `SKB_CONSUMED` keeps its prefix less
    name `CONSUMED`). Bounds of the enum (`MAX`, `SUBSYS_MASK`) are not reasons."""
    names: dict[int, str] = {}
    for c_name, value in btf.enum("skb_drop_reason").items():
        name = c_name.removeprefix(REASON_PREFIX).removeprefix("SKB_")
        if name not in ("MAX", "SUBSYS_MASK"):
            names.setdefault(value, name)
    return names


def reason_name(names: dict[int, str], number: int) -> str:
    """A reason's name; a subsystem's reason (mac80211, openvswitch: the subsystem in the
    high 16 bits, its own enum) by its numbers."""
    if number in names:
        return names[number]
    return f"SUBSYS_{number >> 16}_REASON_{number & 0xFFFF}" if number >> 16 else str(number)


def tracepoint_args(btf: Btf, tracepoint: str) -> int:
    """How many arguments a tracepoint passes (its `btf_trace_<name>` prototype, less the
    context pointer every such prototype begins with); 0 when the kernel has none."""
    try:
        t = btf.resolve(btf.find(f"btf_trace_{tracepoint}", TYPEDEF))
    except KeyError:
        return 0
    if t.kind == PTR:
        t = btf.type(t.size_or_type)
    return t.vlen - 1 if t.kind == FUNC_PROTO else 0


def unavailable_reason() -> str | None:
    """Why the kernel drop monitor cannot run on this kernel (None: it can)."""
    from membrane.bpf.probe import supports

    try:
        btf = kernel_btf()
    except BpfError:
        return "the kernel has no BTF (/sys/kernel/btf/vmlinux)"
    if not supports("tp_btf"):
        return "the kernel refuses tp_btf programs (`membrane probe`)"
    if tracepoint_args(btf, "kfree_skb") < _REASON_ARG:
        return "skb:kfree_skb has no drop reason on this kernel (Linux 5.17 or later)"
    try:
        drop_reason_names(btf)
    except KeyError:
        return "the kernel's BTF has no enum skb_drop_reason (Linux 5.17 or later)"
    return None


def load_config(names: dict[int, str]) -> dict[str, Any]:
    """The program's load-time constants for this kernel's numbering."""
    by_name = {name: number for number, name in names.items()}
    ignored = [by_name[n] for n in OWN_PROGRAM_REASONS if n in by_name]
    return {
        "first_drop_reason": by_name["NOT_SPECIFIED"] + 1,
        "ignored_reasons": np.array(
            ignored + [0] * (DROP_IGNORED_MAX - len(ignored)), dtype=np.uint32
        ).tobytes(),
    }


# ---- packets ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PacketHeaders:
    """What the L3/L4 headers of a dropped packet say (ports 0 when not read: for ICMP,
    `sport`/`dport` hold type and code, as in the datapath's events)."""

    family: int
    saddr: str
    daddr: str
    proto: int
    sport: int = 0
    dport: int = 0
    tcp_flags: int = 0


def parse_headers(data: bytes) -> PacketHeaders | None:
    """The headers from the network header on; None when they are not IPv4/IPv6."""
    if len(data) >= 20 and data[0] >> 4 == 4:
        l4_at = (data[0] & 0x0F) * 4
        proto = data[9]
        fragment = int.from_bytes(data[6:8], "big") & 0x1FFF
        saddr, daddr = socket.inet_ntoa(data[12:16]), socket.inet_ntoa(data[16:20])
        l4 = data[l4_at:] if not fragment else b""
        return PacketHeaders(4, saddr, daddr, proto, *_layer4(proto, l4))
    if len(data) >= 40 and data[0] >> 4 == 6:
        proto = data[6]  # extension headers are not walked: their type is named
        saddr = socket.inet_ntop(socket.AF_INET6, data[8:24])
        daddr = socket.inet_ntop(socket.AF_INET6, data[24:40])
        return PacketHeaders(6, saddr, daddr, proto, *_layer4(proto, data[40:]))
    return None


def _layer4(proto: int, l4: bytes) -> tuple[int, int, int]:
    if proto in (6, 17, 132) and len(l4) >= 4:  # TCP, UDP, SCTP
        flags = l4[13] if proto == 6 and len(l4) >= 14 else 0
        return int.from_bytes(l4[0:2], "big"), int.from_bytes(l4[2:4], "big"), flags
    if proto in (1, 58) and len(l4) >= 2:  # ICMP, ICMPv6: type and code
        return l4[0], l4[1], 0
    return 0, 0, 0


# ---- the monitor --------------------------------------------------------------------------
class KernelDrops:
    """Loaded and attached by `start`; `stop` detaches it (nothing is pinned: the monitor
    reports to this agent only, and a restarted agent loads it again)."""

    def __init__(
        self,
        agent: Agent,
        deliver: Callable[[list[Any]], Any],  # observer.GetFlowsResponse messages
        observe: Callable[[list[FlowEvent], Snapshot], Any] | None = None,
    ) -> None:
        self.agent = agent
        self.deliver = deliver
        self.observe = observe  # as the FlowReader's: the metrics count the drops there
        self.names = drop_reason_names(kernel_btf())
        self._obj = BpfObject.open("drop_monitor")
        self._link: Link | None = None
        self._ring: RingBuffer | None = None
        self._watched: dict[tuple[int, int], int] = {}  # (netns inode, ifindex) -> endpoint
        self._places: dict[tuple, tuple[tuple[int, int], ...]] = {}  # endpoint -> keys
        self._synced: Snapshot | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kernel-drops", daemon=True)
        self.unreadable = 0  # events without IP headers we could read
        self._symbols: dict[int, str | None] = {}  # drop location -> kernel function

    def start(self) -> None:
        obj = self._obj
        obj.set_config(**load_config(self.names))
        obj.load()
        self._ring = RingBuffer(
            obj.map("events"),
            dtype=obj.btf.dtype("kernel_drop_event"),
            lost_map=obj.map("events_lost"),
        )
        self.sync(self.agent.snapshot)  # watching before attaching: no partial start
        self._link = attach_auto(obj.program("kernel_drop"))
        self._thread.start()
        log.info(
            "kernel drop monitor on",
            extra={"fields": {"reasons": len(self.names), "watched": len(self._watched)}},
        )

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        if self._link is not None:
            self._link.close()
            self._link = None
        if self._ring is not None:
            self._ring.close()
        self._obj.close()

    # ---- counts ----------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Drops of watched traffic seen, suppressed by the rate limit, and lost to a
        full ring (summed over CPUs)."""
        per_cpu = self._obj.map("drop_stats").lookup(0)
        return {
            "watched": sum(s.watched for s in per_cpu),
            "suppressed": sum(s.suppressed for s in per_cpu),
            "lost": self._ring.lost if self._ring is not None else 0,
        }

    # ---- the watched set -------------------------------------------------------------------
    def sync(self, snapshot: Snapshot) -> None:
        """Watch every endpoint of `snapshot`, and nothing else: each pod's namespace, and
        its veth's node side in the node's namespace (drops while the node routes it)."""
        if snapshot is self._synced:
            return
        wanted: dict[tuple[int, int], int] = {}
        places: dict[tuple, tuple[tuple[int, int], ...]] = {}
        node_ino = self._node_netns_ino()
        complete = True
        for ep in snapshot.endpoints.values():
            which = (ep.id, ep.netns, ep.host_ifname, ep.created)  # ids are reused
            keys = self._places.get(which) or self._keys(ep, node_ino)
            complete = complete and bool(keys)
            places[which] = keys
            wanted.update(dict.fromkeys(keys, ep.id))
        if wanted:  # the node's namespace: "look at the device" (bpf/abi/drop_monitor.h)
            wanted[(node_ino, 0)] = DEVICES_WATCHED
        watched = self._obj.map("drop_watched")
        for key in self._watched.keys() - wanted.keys():
            watched.delete(_watch_key(watched, key))
        for key, ep_id in wanted.items():
            if self._watched.get(key) != ep_id:
                watched.update(_watch_key(watched, key), _watch_value(watched, ep_id))
        self._watched, self._places = wanted, places
        # An endpoint still being made has no veth yet: the next poll looks again.
        self._synced = snapshot if complete else None

    def _node_netns_ino(self) -> int:
        node = self.agent.config.node_netns
        return os.stat(netns.path(node) if node else "/proc/self/ns/net").st_ino

    def _keys(self, ep: EndpointRecord, node_ino: int) -> tuple[tuple[int, int], ...]:
        """Where `ep`'s drops happen; () while its namespace or veth is missing (a later
        sync tries again)."""
        try:
            pod_ino = os.stat(netns.path(ep.netns)).st_ino
            node = self.agent.config.node_netns
            host_ifindex = (
                netns.ifindex(node, ep.host_ifname)
                if node
                else socket.if_nametoindex(ep.host_ifname)
            )
        except (OSError, LookupError):
            return ()
        return ((pod_ino, 0), (node_ino, host_ifindex))

    # ---- events ----------------------------------------------------------------------------
    def _run(self) -> None:
        assert self._ring is not None
        node = self.agent.config.node_name
        reported = self._missing()
        while not self._stop.is_set():
            try:
                self.sync(self.agent.snapshot)
                batch = self._ring.poll(POLL_MS)
                records = []
                if (missing := self._missing()) > reported:
                    # Suppressed by the rate limit or lost to a full ring: events the
                    # kernel could not pass up, Hubble's PERF_EVENT_RING_BUFFER loss.
                    source = flow_pb2.PERF_EVENT_RING_BUFFER
                    records.append(lost_response(source, missing - reported, node))
                    reported = missing
                if len(batch):
                    records.extend(self.responses(batch, self.agent.snapshot, node))
                if records:
                    self.deliver(records)
            except Exception:
                log.exception("kernel drop monitor failed; going on")

    def _missing(self) -> int:
        stats = self.stats()
        return stats["suppressed"] + stats["lost"]

    def responses(self, batch: np.ndarray, snapshot: Snapshot, node: str) -> list[Any]:
        from membrane.agent.flows import AgentResolver

        # With the services: a drop of a connection the socket LB translated (a FIN purged
        # as the backend's socket closes) names its Service as the datapath's flows do.
        resolver = AgentResolver(snapshot, self.agent.services)
        out, events = [], []
        identities: dict[str, int] = {}  # a storm's drops name few peers: look each up once
        for drop in decode_batch(batch):
            event = self.flow_event(drop, snapshot, identities)
            if event is None:
                self.unreadable += 1
                continue
            response = event_response(event, resolver, node)
            self._describe(response.flow, drop)
            out.append(response)
            events.append(event)
        if self.observe is not None and events:
            self.observe(events, snapshot)
        return out

    def flow_event(
        self, drop: KernelDrop, snapshot: Snapshot, identities: dict[str, int] | None = None
    ) -> FlowEvent | None:
        """The drop as the datapath's flow events are, so that one builder makes both
        (None: another layout, or not an IP packet we could read)."""
        if drop.version != MEMBRANE_EVENT_VERSION or drop.type != DROP_EVENT_KERNEL:
            return None
        headers = parse_headers(drop.headers)
        if headers is None:
            return None
        ep = snapshot.endpoints.get(drop.ep_id)
        egress = ep is not None and headers.saddr in (ep.ipv4, ep.ipv6)
        peer = headers.daddr if egress else headers.saddr
        identities = {} if identities is None else identities
        if peer not in identities:
            identities[peer] = snapshot.identity_of_ip(ipaddress.ip_address(peer))
        return FlowEvent(
            ts_ns=drop.ts_ns,
            version=MEMBRANE_EVENT_VERSION,
            type=FlowEventType.DROP,
            cpu=drop.cpu,
            saddr=headers.saddr,
            daddr=headers.daddr,
            sport=headers.sport,
            dport=headers.dport,
            proto=headers.proto,
            dir=Direction.EGRESS if egress else Direction.INGRESS,
            tcp_flags=headers.tcp_flags,
            match=0,
            ep_id=drop.ep_id,
            drop_reason=0,  # none of ours: DROP_REASON_UNKNOWN in Hubble's terms
            peer_identity=identities[peer],
            rule_id=0,
            policy_rev=0,
            len=drop.len,
            family=headers.family,
        )

    def _describe(self, flow: flow_pb2.Flow, drop: KernelDrop) -> None:
        """What the kernel adds: its reason and where (Summary), and the device."""
        reason = reason_name(self.names, drop.reason)
        if drop.location not in self._symbols:  # a few places drop: looked up once each
            self._symbols[drop.location] = kernel_symbol(drop.location)
        where = self._symbols[drop.location]
        flow.Summary = f"kernel {reason}" + (f" at {where}" if where else "") + f"; {flow.Summary}"
        flow.ClearField("is_reply")  # not known: the kernel's drop says nothing of it
        if drop.ifindex:
            flow.interface.index = drop.ifindex
            flow.interface.name = drop.ifname


@dataclass(frozen=True, slots=True)
class KernelDrop:
    """A `struct kernel_drop_event` with plain Python values."""

    ts_ns: int
    version: int
    type: int
    cpu: int
    location: int
    reason: int
    ep_id: int
    ifindex: int
    ifname: str
    len: int
    headers: bytes  # the bytes read (headers_len of them)


def decode_batch(batch: np.ndarray) -> list[KernelDrop]:
    """Every row of a RingBuffer batch, read column by column (one `tolist()` each is
    much cheaper than reading each field of each numpy row)."""
    h = batch["hdr"]
    raw = np.ascontiguousarray(batch["headers"]).tobytes()
    width = batch.dtype["headers"].itemsize
    return [
        KernelDrop(ts, version, kind, cpu, location, reason, ep_id, ifindex,
                   ifname.decode(errors="replace"), length, raw[i * width : i * width + used])
        for i, (ts, version, kind, cpu, location, reason, ep_id, ifindex, ifname, length, used)
        in enumerate(zip(
            h["ts_ns"].tolist(), h["version"].tolist(), h["type"].tolist(), h["cpu"].tolist(),
            batch["location"].tolist(), batch["reason"].tolist(), batch["ep_id"].tolist(),
            batch["ifindex"].tolist(), batch["ifname"].tolist(), batch["len"].tolist(),
            batch["headers_len"].tolist(), strict=True,
        ))
    ]  # fmt: skip


def _watch_key(watched: Any, key: tuple[int, int]) -> Any:
    return watched.key_type(netns_ino=key[0], ifindex=key[1])


def _watch_value(watched: Any, ep_id: int) -> Any:
    return watched.value_type(ep_id=ep_id)


@cache
def _kernel_symbols() -> Any:
    from membrane.trace.symbols import kernel_symbols

    return kernel_symbols()


def kernel_symbol(address: int) -> str | None:
    """The kernel function at `address` (None without kallsyms addresses)."""
    if not address:
        return None
    return _kernel_symbols().lookup(np.array([address], dtype=np.uint64))[0]


def start_kernel_drops(
    agent: Agent,
    deliver: Callable[[list[Any]], Any],
    observe: Callable[[list[FlowEvent], Snapshot], Any] | None = None,
) -> KernelDrops | None:
    """The monitor, started, when --kernel-drops asks for it and the kernel allows it;
    otherwise one log line says why it is off (the agent runs on without it). `observe`
    sees the drops as the FlowReader's sees the datapath's events (from another thread)."""
    if not agent.config.kernel_drops:
        log.info("kernel drop monitor off", extra={"fields": {"why": "--kernel-drops=false"}})
        return None
    if (why := unavailable_reason()) is not None:
        log.warning("kernel drop monitor off", extra={"fields": {"why": why}})
        return None
    monitor = None
    try:
        monitor = KernelDrops(agent, deliver, observe)
        monitor.start()
    except BpfError as err:  # a missing object, or a load or attach the kernel refused
        if monitor is not None:
            monitor.stop()
        log.warning("kernel drop monitor off", extra={"fields": {"why": str(err)}})
        return None
    return monitor
