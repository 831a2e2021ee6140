"""Run the endpoint programs (endpoint.bpf.o) on frames through BPF_PROG_TEST_RUN, on fresh
node maps pinned in a temporary directory, and report what each run did: the verdict, the
flow events it emitted and how the drop counters moved.

    with EndpointDatapath.temporary() as dp:
        dp.set_ipcache({"198.18.0.20/32": PEER_ID})
        dp.set_policy([allow(Direction.EGRESS, PEER_ID, port=80)], egress=True)
        out = dp.egress(tcp_segment(EP_IP, "198.18.0.20", dport=80))
        assert out.verdict == "pass"
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from membrane.abi import Direction, DropReason
from membrane.bpf import BpfObject, test_run
from membrane.bpf.fs import temporary_pin_dir
from membrane.bpf.ringbuf import RingBuffer
from membrane.datapath import (
    CtEntry,
    EndpointPolicy,
    NodeMaps,
    PolicyWriter,
    entries,
    load_endpoint,
    sync_ipcache,
)
from membrane.datapath.abi import (
    FRAGS6_EGRESS,
    FRAGS6_INGRESS,
    FRAGS_EGRESS,
    FRAGS_INGRESS,
    PROG_FROM_CONTAINER,
    PROG_TO_CONTAINER,
)
from membrane.datapath.policy_entries import PolicyEntry

EP_ID = 7
EP_IP = "198.18.0.10"
EP_IP6 = "2001:db8:1::a"
EP_IDENTITY = 1000
TC_VERDICTS = {0: "pass", 2: "drop"}  # TC_ACT_OK, TC_ACT_SHOT


def policy_entry(
    direction: Direction,
    identity: int,
    *,
    proto: int = 6,
    port: int = 0,
    port_bits: int = 16,
    deny: bool = False,
    rule_id: int = 1,
) -> PolicyEntry:
    """A policy entry with what most tests want unless they say otherwise: TCP, one port
    (port_bits 16), an allow of rule 1."""
    return PolicyEntry(direction, identity, proto, port, port_bits, deny, rule_id)


def allow(direction: Direction, identity: int, **kw: Any) -> PolicyEntry:
    return policy_entry(direction, identity, **kw)


def deny(direction: Direction, identity: int, **kw: Any) -> PolicyEntry:
    return policy_entry(direction, identity, deny=True, **kw)


@dataclass(frozen=True)
class Outcome:
    verdict: str  # "pass" or "drop"
    length: int
    events: list[Any]  # flow_event records (numpy) emitted by the run
    drops: dict[tuple[int, int, int], tuple[int, int]]  # (ep, dir, reason) -> delta
    started_ns: int
    ended_ns: int
    data: bytes = b""  # the frame as the program left it

    @property
    def event(self) -> Any:
        assert len(self.events) == 1, f"expected one event, got {len(self.events)}"
        return self.events[0]

    @property
    def reason(self) -> DropReason:
        return DropReason(int(self.event["drop_reason"]))


class EndpointDatapath:
    """Node maps in a pin directory of their own, and endpoint programs loaded on them."""

    def __init__(self, pin_dir: str, **config: int) -> None:
        self.pin_dir = pin_dir
        self.maps = NodeMaps.open(pin_dir)
        self.writer = PolicyWriter(self.maps)
        self.objects: dict[int, BpfObject] = {}
        self.ring = RingBuffer(
            self.maps.events, dtype=self.maps.flow_event_dtype(), lost_map=self.maps.events_lost
        )
        self.add_endpoint(EP_ID, EP_IP, EP_IP6, **config)
        sync_ipcache(self.maps, {})
        self.set_policy()  # known to the datapath, nothing enforced

    @classmethod
    @contextmanager
    def temporary(cls, **config: int) -> Iterator[EndpointDatapath]:
        with temporary_pin_dir() as pin_dir:
            dp = cls(pin_dir, **config)
            try:
                yield dp
            finally:
                dp.close()

    def close(self) -> None:
        self.ring.close()
        for obj in self.objects.values():
            obj.close()
        self.maps.close()

    def add_endpoint(self, ep_id: int, ip: str, ip6: str | None = None, **config: int) -> None:
        """An endpoint with `ip` and, when given, `ip6` (else IPv4-only)."""
        self.objects[ep_id] = load_endpoint(self.pin_dir, ep_id, ip, ip6, **config)

    # ---- configuration ---------------------------------------------------------------
    def set_ipcache(self, prefixes: Mapping[str, int | tuple[int, int]]) -> None:
        """IPv4 and IPv6 prefixes -> identity, or (identity, the address's own identity)
        (each family's world prefix kept)."""
        sync_ipcache(
            self.maps,
            {p: (v, 0) if isinstance(v, int) else (v[0], 0, v[1]) for p, v in prefixes.items()},
        )

    def set_policy(
        self,
        entries: Sequence[PolicyEntry] = (),
        *,
        ingress: bool = False,
        egress: bool = False,
        ep_id: int = EP_ID,
        identity: int = EP_IDENTITY,
    ) -> None:
        """Install a policy through the PolicyWriter; `ingress`/`egress` enforce default
        deny in that direction."""
        self.writer.apply({ep_id: EndpointPolicy(ingress, egress, entries)}, {ep_id: identity})

    def state(self, ep_id: int = EP_ID) -> Any:
        return self.maps.endpoints.lookup(ep_id)

    # ---- running ---------------------------------------------------------------------
    def egress(self, frame: Any, *, ep_id: int = EP_ID, repeat: int = 1) -> Outcome:
        """Run from_container (the pod's egress) on `frame`."""
        return self.run(self.objects[ep_id].program(PROG_FROM_CONTAINER), frame, repeat)

    def ingress(self, frame: Any, *, ep_id: int = EP_ID, repeat: int = 1) -> Outcome:
        """Run to_container (the pod's ingress) on `frame`."""
        return self.run(self.objects[ep_id].program(PROG_TO_CONTAINER), frame, repeat)

    def drop_counters(self) -> dict[tuple[int, int, int], tuple[int, int]]:
        return {
            (int(k.ep_id), int(k.dir), int(k.reason)): (
                sum(int(v.packets) for v in per_cpu),
                sum(int(v.bytes) for v in per_cpu),
            )
            for k, per_cpu in self.maps.drops.items()
        }

    def run(self, prog: Any, frame: Any, repeat: int = 1) -> Outcome:
        data = bytes(frame)
        self.ring.drain()  # leftovers of earlier runs are not this frame's
        before = self.drop_counters()
        started = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        result = test_run(prog, data, repeat=repeat)
        retval = ctypes.c_int32(result.retval).value
        ended = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        assert retval in TC_VERDICTS, f"unexpected return code {retval}"
        after = self.drop_counters()
        moved = {
            k: (v[0] - before.get(k, (0, 0))[0], v[1] - before.get(k, (0, 0))[1])
            for k, v in after.items()
            if v != before.get(k)
        }
        return Outcome(
            verdict=TC_VERDICTS[retval],
            length=len(data),
            events=list(self.ring.drain()),
            drops=moved,
            started_ns=started,
            ended_ns=ended,
            data=bytes(result.data),
        )

    def frags(self, direction: Direction, ep_id: int = EP_ID, family: int = 4) -> Any:
        """The endpoint's fragment records of `direction` and `family` (a map of its own
        object)."""
        egress = direction == Direction.EGRESS
        if family == 6:
            return self.objects[ep_id].map(FRAGS6_EGRESS if egress else FRAGS6_INGRESS)
        return self.objects[ep_id].map(FRAGS_EGRESS if egress else FRAGS_INGRESS)

    # ---- conntrack -------------------------------------------------------------------
    def ct(self) -> list[CtEntry]:
        return entries(self.maps)

    def ct_raw(self, family: int = 4) -> list[tuple[Any, Any]]:
        return (self.maps.ct if family == 4 else self.maps.ct6).lookup_batch()

    def set_expiry(self, expires_ns: int) -> None:
        """Make every conntrack entry expire at `expires_ns` (ktime)."""
        for key, value in self.ct_raw():
            value.expires_ns = expires_ns
            self.maps.ct.update(key, value)


def assert_dropped(out: Outcome, reason: DropReason, direction: int, ep_id: int = EP_ID) -> None:
    """Dropped once for `reason`: counted in `drops` under (ep, dir, reason) and reported
    in exactly one drop event."""
    assert out.verdict == "drop", out
    assert out.reason == reason, (out.reason, reason)
    assert out.drops == {(ep_id, direction, int(reason)): (1, out.length)}, out.drops


def assert_passed(out: Outcome, *, new_flow: bool) -> None:
    """Passed; a new flow is reported once, established and reply traffic never."""
    assert out.verdict == "pass", out.events and DropReason(int(out.events[0]["drop_reason"]))
    assert out.drops == {}
    assert len(out.events) == (1 if new_flow else 0), out.events
    if new_flow:
        assert int(out.event["h"]["type"]) == 1  # FLOW_EVENT_POLICY_VERDICT


# ---- measurement -------------------------------------------------------------------------
def per_packet_ns(prog: Any, frames: Sequence[Any], repeat: int = 1) -> float:
    """Kernel-measured mean run time of `prog` over `frames` (each run `repeat` times).
    Distinct frames with repeat=1 measure first packets (new flows); one frame with a
    large repeat measures established traffic. A repeat=1 run carries a few ns of timer
    overhead, so compare like with like."""
    total = sum(test_run(prog, bytes(f), repeat=repeat).duration_ns for f in frames)
    return total / len(frames)
