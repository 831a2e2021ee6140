"""Run a `membrane filter` program on one frame through BPF_PROG_TEST_RUN and report
everything it did: the verdict, how each counter moved, and the drop events it emitted.

Counters are per-CPU and shared by every test of a module (one loaded object per module),
so outcomes are deltas around a single run; rule counters are watched for the rule ids a
test installed.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from membrane.abi import MEMBRANE_EVENT_VERSION, FilterEventType, FilterStat
from membrane.bpf import BpfObject, Map, test_run
from membrane.bpf.maps import possible_cpus
from membrane.bpf.ringbuf import RingBuffer
from membrane.filter.keys import DropDstTables, flow_key, guard_key
from membrane.filter.rules import AllowedFlow

XDP_VERDICTS = {2: "pass", 1: "drop"}  # XDP_PASS, XDP_DROP
TC_VERDICTS = {-1: "pass", 2: "drop"}  # TC_ACT_UNSPEC, TC_ACT_SHOT
STATS = {
    "passed": FilterStat.PASSED,
    "dropped": FilterStat.DROPPED,
    "unparsed": FilterStat.UNPARSED,
}
INSTANCE = 0x4D42  # load-time constant `instance`, which events carry
ZERO = (0, 0)


@dataclass(frozen=True)
class Outcome:
    verdict: str  # "pass" or "drop"
    length: int  # frame length, what the program counts as bytes
    repeat: int  # how many times the program ran on the frame
    stats: dict[str, tuple[int, int]]  # filter_stats delta: name -> (packets, bytes)
    rules: dict[int, tuple[int, int]]  # rule_stats delta of watched rules that moved
    events: list[Any]  # filter_event records (numpy) the runs emitted
    started_ns: int  # CLOCK_MONOTONIC around the run, to bound event timestamps
    ended_ns: int


def _sum(per_cpu: list[Any]) -> tuple[int, int]:
    return sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu)


class FilterProgram:
    """One loaded filter object (`filter_xdp` or `filter_tc`) and its program."""

    def __init__(
        self,
        name: str,
        pin_dir: str | None = None,
        max_entries: dict[str, int] | None = None,
        **config: Any,
    ) -> None:
        """`pin_dir`: pin the maps there, reusing those already pinned (as a filter
        reloaded by `membrane filter` does); `max_entries`: map sizes other than the
        object's."""
        self.obj = BpfObject.open(name)
        self.obj.set_config(**{"instance": INSTANCE, **config})
        for map_name, size in (max_entries or {}).items():
            self.obj.set_max_entries(map_name, size)
        if pin_dir is not None:
            self.obj.pin_maps(pin_dir)
        self.obj.load()
        self.prog = self.obj.program(name)
        self.verdicts = XDP_VERDICTS if name == "filter_xdp" else TC_VERDICTS
        self.watched: set[int] = set()
        self._ring = RingBuffer(
            self.map("events"),
            dtype=self.obj.btf.dtype("filter_event"),
            lost_map=self.map("events_lost"),
        )

    def close(self) -> None:
        self._ring.close()
        self.obj.close()

    def map(self, name: str) -> Map:
        return self.obj.map(name)

    # ---- rules ----------------------------------------------------------------------------
    def watch(self, *rule_ids: int) -> None:
        self.watched.update(rule_ids)

    def dst_tables(self) -> DropDstTables:
        return DropDstTables.of(self.map)

    def add_dst(
        self, network: str | ipaddress.IPv4Network | ipaddress.IPv6Network, rule: int
    ) -> None:
        self.dst_tables().add([(ipaddress.ip_network(network), rule)])
        self.watch(rule)

    def remove_dst(self, network: str | ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
        assert self.dst_tables().remove([ipaddress.ip_network(network)])

    def add_proto(self, protocol: int, rule: int) -> None:
        self.map("drop_proto").update(protocol, rule)
        self.watch(rule)

    def add_guard(self, protocol: int, port: int, rule: int) -> None:
        guards = self.map("allow_guard")
        guards.update(guard_key(guards, protocol, port), rule)
        self.watch(rule)

    def flow_key(self, src: str, dst: str, protocol: int, port: int) -> Any:
        flow = AllowedFlow(ipaddress.ip_address(src), ipaddress.ip_address(dst), port, protocol)
        return flow_key(self.map("allow_flows"), flow)

    def add_flow(self, src: str, dst: str, protocol: int, port: int, rule: int) -> None:
        self.map("allow_flows").update(self.flow_key(src, dst, protocol, port), rule)
        self.watch(rule)

    # ---- running ----------------------------------------------------------------------------
    def dropping_rules(self, frames: Iterable[bytes]) -> list[int]:
        """Run each frame once: the rule id that dropped it, 0 where it passed. Drop events
        must be on: a dropped frame's one event names its rule."""
        rules = []
        self._events()
        for data in frames:
            verdict = self.verdicts[ctypes.c_int32(test_run(self.prog, data).retval).value]
            events = self._events()
            assert len(events) == (verdict == "drop"), (verdict, events)
            rules.append(int(events[0]["rule_id"]) if events else 0)
        return rules

    def _stats(self) -> dict[str, tuple[int, int]]:
        stats = self.map("filter_stats")
        return {name: _sum(stats.lookup(index)) for name, index in STATS.items()}

    def _rules(self) -> dict[int, tuple[int, int]]:
        stats = self.map("rule_stats")
        return {rule: _sum(stats.lookup(rule)) for rule in self.watched}

    def _events(self) -> list[Any]:
        return list(self._ring.poll(0))

    def run(self, frame: Any, repeat: int = 1) -> Outcome:
        data = bytes(frame)
        self._events()  # leftovers of earlier runs are not this frame's
        stats, rules = self._stats(), self._rules()
        started = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        retval = ctypes.c_int32(test_run(self.prog, data, repeat=repeat).retval).value
        ended = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        assert retval in self.verdicts, f"unexpected return code {retval}"
        after_stats, after_rules = self._stats(), self._rules()
        moved = {
            r: (after_rules[r][0] - rules[r][0], after_rules[r][1] - rules[r][1])
            for r in rules
            if after_rules[r] != rules[r]
        }
        return Outcome(
            verdict=self.verdicts[retval],
            length=len(data),
            repeat=repeat,
            stats={
                k: (after_stats[k][0] - stats[k][0], after_stats[k][1] - stats[k][1]) for k in stats
            },
            rules=moved,
            events=self._events(),
            started_ns=started,
            ended_ns=ended,
        )


# ---- expectations -------------------------------------------------------------------------
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def longest_match(
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address, rules: dict[Network, int]
) -> int | None:
    """Reference model of drop-dst: the rule of the longest prefix holding dst, if any."""
    hits = [net for net in rules if dst in net]
    return rules[max(hits, key=lambda net: net.prefixlen)] if hits else None


def _summary(out: Outcome) -> dict[str, Any]:
    events = [(int(e["rule_id"]), int(e["pkt_len"])) for e in out.events]
    return {"verdict": out.verdict, "rules": out.rules, "stats": out.stats, "events": events}


def assert_dropped(out: Outcome, rule: int) -> None:
    """Dropped by `rule`: that rule and DROPPED count each run of the frame, and each run
    emitted one event naming the rule."""
    counted = (out.repeat, out.repeat * out.length)
    expected = {
        "verdict": "drop",
        "rules": {rule: counted},
        "stats": {"passed": ZERO, "dropped": counted, "unparsed": ZERO},
        "events": [(rule, out.length)] * out.repeat,
    }
    actual = _summary(out)
    assert actual == expected, f"\n got {actual}\nwant {expected}"


def assert_passed(out: Outcome, *, unparsed: bool = False, rule: int | None = None) -> None:
    """Passed: PASSED counts the frame (and UNPARSED when headers stopped the parser short);
    `rule` is an allow-only flow that matched; no event."""
    counted = (out.repeat, out.repeat * out.length)
    expected = {
        "verdict": "pass",
        "rules": {rule: counted} if rule else {},
        "stats": {"passed": counted, "dropped": ZERO, "unparsed": counted if unparsed else ZERO},
        "events": [],
    }
    actual = _summary(out)
    assert actual == expected, f"\n got {actual}\nwant {expected}"


def assert_drop_event(
    out: Outcome,
    *,
    rule: int,
    hook: int,
    src: str,
    dst: str,
    protocol: int,
    sport: int = 0,
    dport: int = 0,
) -> None:
    """The one event of a dropped frame describes it field by field. Test runs happen on
    the loopback device of the current namespace (ifindex 1); addresses fill the first 4
    or 16 bytes of their fields, the rest is zero."""
    assert len(out.events) == 1, out.events
    ev = out.events[0]
    actual = {
        "version": int(ev["hdr"]["version"]),
        "type": int(ev["hdr"]["type"]),
        "ts_in_run": out.started_ns <= int(ev["hdr"]["ts_ns"]) <= out.ended_ns,
        "cpu_possible": 0 <= int(ev["hdr"]["cpu"]) < possible_cpus(),
        "instance": int(ev["instance"]),
        "ifindex": int(ev["ifindex"]),
        "rule_id": int(ev["rule_id"]),
        "pkt_len": int(ev["pkt_len"]),
        "hook": int(ev["hook"]),
        "family": int(ev["family"]),
        "protocol": int(ev["protocol"]),
        "ports": (int(ev["sport"]), int(ev["dport"])),
        "src": bytes(ev["src"]),
        "dst": bytes(ev["dst"]),
    }
    expected = {
        "version": MEMBRANE_EVENT_VERSION,
        "type": FilterEventType.DROP,
        "ts_in_run": True,
        "cpu_possible": True,
        "instance": INSTANCE,
        "ifindex": socket.if_nametoindex("lo"),
        "rule_id": rule,
        "pkt_len": out.length,
        "hook": hook,
        "family": ipaddress.ip_address(dst).version,
        "protocol": protocol,
        "ports": (sport, dport),
        "src": ipaddress.ip_address(src).packed.ljust(16, b"\0"),
        "dst": ipaddress.ip_address(dst).packed.ljust(16, b"\0"),
    }
    assert actual == expected, f"\n got {actual}\nwant {expected}"
