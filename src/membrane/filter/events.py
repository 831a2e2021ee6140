"""Drop events of the filter programs, read from their shared pinned ring buffer."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

from membrane.bpf import Map
from membrane.bpf.btf import Btf
from membrane.bpf.ktime import ktime_to_iso
from membrane.bpf.object import object_path
from membrane.bpf.ringbuf import RingBuffer
from membrane.errors import UserError
from membrane.filter.manager import HOOK_IDS, Attachment, FilterManager
from membrane.filter.rules import protocol_name

_HOOK_NAMES = {number: name for name, number in HOOK_IDS.items()}
_POLL_MS = 200


class FilterEvents:
    """Context manager yielding batches of decoded drop events."""

    TABLE_HEADER = (
        f"{'TIME':<15} {'DEVICE':<24} {'HOOK':<10} {'PROTO':<6} "
        f"{'SOURCE':<24} {'DESTINATION':<24} RULE"
    )

    def __init__(self, mgr: FilterManager) -> None:
        self.mgr = mgr
        try:
            self._ring_map = Map.from_pin(str(mgr.root / "events"))
            self._lost_map = Map.from_pin(str(mgr.root / "events_lost"))
        except FileNotFoundError:
            raise UserError("", "no filters are attached, so there are no events") from None
        dtype = Btf.from_file(object_path("filter_xdp")).dtype("filter_event")
        self._ring = RingBuffer(self._ring_map, dtype=dtype, lost_map=self._lost_map)
        self._by_instance: dict[int, tuple[Attachment, dict[int, str]]] = {}

    def __enter__(self) -> FilterEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self._ring.close()
        self._ring_map.close()
        self._lost_map.close()

    @property
    def lost(self) -> int:
        """Events the kernel could not queue since the ring buffer was created."""
        return self._ring.lost

    def _describe(self, instance: int) -> tuple[Attachment | None, dict[int, str]]:
        if instance not in self._by_instance:
            for att in self.mgr.attachments():
                try:
                    rules = {r.id: f"{r.kind} {r.text}" for r in self.mgr.rules(att, False)}
                except FileNotFoundError:  # detached meanwhile by another command
                    continue
                self._by_instance[att.meta.instance] = (att, rules)
        return self._by_instance.get(instance, (None, {}))

    def decode(self, rec: Any) -> dict[str, Any]:
        size = 4 if rec["family"] == 4 else 16
        att, rules = self._describe(int(rec["instance"]))
        rule_id = int(rec["rule_id"])
        return {
            "time": ktime_to_iso(int(rec["hdr"]["ts_ns"])),
            "device": att.device if att else f"ifindex {int(rec['ifindex'])}",
            "netns": att.netns if att else None,
            "hook": _HOOK_NAMES.get(int(rec["hook"]), str(int(rec["hook"]))),
            "protocol": protocol_name(int(rec["protocol"])),
            "src": str(ipaddress.ip_address(bytes(rec["src"])[:size])),
            "dst": str(ipaddress.ip_address(bytes(rec["dst"])[:size])),
            "sport": int(rec["sport"]),
            "dport": int(rec["dport"]),
            "length": int(rec["pkt_len"]),
            "rule_id": rule_id,
            "rule": rules.get(rule_id, f"rule {rule_id} (since removed)"),
        }

    def batches(self, follow: bool) -> Iterator[list[dict[str, Any]]]:
        """Drain what is queued; with `follow`, keep waiting for more until interrupted."""
        try:
            while True:
                records = self._ring.poll(_POLL_MS if follow else 0)
                if len(records):
                    yield [self.decode(r) for r in records]
                elif not follow:
                    return
        except KeyboardInterrupt:
            return

    @staticmethod
    def table_line(ev: dict[str, Any]) -> str:
        def endpoint(addr: str, port: int) -> str:
            if not port:
                return addr
            return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"

        device = ev["device"] + (f"@{ev['netns']}" if ev["netns"] else "")
        return (
            f"{ev['time'][11:26]:<15} {device:<24} {ev['hook']:<10} {ev['protocol']:<6} "
            f"{endpoint(ev['src'], ev['sport']):<24} {endpoint(ev['dst'], ev['dport']):<24} "
            f"{ev['rule']}"
        )
