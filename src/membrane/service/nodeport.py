"""The per-packet service path (bpf/nodeport.bpf.c): NodePort and externalIP frontends
reached from outside the node, translated per packet on the node's external devices
(Cilium's `--devices`), in SNAT or DSR mode (Cilium's `--bpf-lb-mode`).

The programs read the service maps the socket LB's loader pins (membrane.service.socklb)
and keep their own flows, reverse-NAT entries, device set and counters pinned under
`<bpf dir>/nodeport/`. Links are pinned per device too (tcx where the kernel has it, else
clsact filters, which live with the device), so translation goes on while the agent is
down; a restarted agent swaps its build's programs into the pinned links.

Call with the node's network namespace entered (the agent's devices are there).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from membrane import netns
from membrane.abi import NodePortMode, NodePortStat
from membrane.bpf import AttachError, BpfError, BpfObject, Link, Map
from membrane.bpf.links import ClsactAttachment, TcSlot, attach_tc
from membrane.errors import UserError
from membrane.filter.manager import decode_pin_name, encode_pin_name
from membrane.service.maps import MAP_NAMES
from membrane.service.socklb import PIN_SUBDIR as SERVICE_PIN_SUBDIR

log = logging.getLogger("membrane.service")
OBJECT = "nodeport"
PIN_SUBDIR = "nodeport"
OWN_MAPS = ("np_flows", "np_rev", "np6_flows", "np6_rev", "np_devices", "np_stats")
MODES = {"snat": NodePortMode.SNAT, "dsr": NodePortMode.DSR}
PROGRAMS = {"ingress": "nodeport_ingress", "egress": "nodeport_egress"}
# clsact fallback: a fixed slot per direction, so a restart replaces its own filter
CLSACT_SLOT = TcSlot(handle=0x4E50, priority=0x4E50)  # "NP"
STAT_NAMES = {s: s.name.lower() for s in NodePortStat if s != NodePortStat.MAX}


def check_mode(value: str) -> str:
    """--bpf-lb-mode: snat or dsr."""
    if value not in MODES:
        raise UserError("bpf-lb-mode", f"must be one of {', '.join(MODES)}, not {value!r}")
    return value


def check_devices(value: str) -> tuple[str, ...]:
    """--devices: comma-separated device names or shell-style patterns (eth*)."""
    names = tuple(d.strip() for d in value.split(",") if d.strip())
    for name in names:
        if len(name) > 15 or "/" in name or any(c.isspace() for c in name):
            raise UserError("devices", f"{name!r} is not a device name or pattern")
    return names


def matching_devices(patterns: Sequence[str], present: Iterable[str]) -> list[str]:
    """The present devices any pattern names (never lo)."""
    return sorted(
        d for d in present if d != "lo" and any(fnmatch.fnmatchcase(d, p) for p in patterns)
    )


@dataclass
class NodePortPath:
    """The programs loaded once, attached to each external device as it is found."""

    pin_dir: str
    mode: str
    node_ip: IPv4Address
    obj: BpfObject
    node_ipv6: IPv6Address | None = None
    devices: dict[str, str] = field(default_factory=dict)  # device -> attachment kind

    @classmethod
    def start(
        cls, bpf_dir: str, mode: str, node_ip: IPv4Address, node_ipv6: IPv6Address | None = None
    ) -> NodePortPath:
        """Load the programs for `mode` with the node's addresses as the SNAT and tunnel
        sources (without an IPv6 one, IPv6 passes untouched); maps already pinned are
        reused (flows survive a restart)."""
        pin_dir = os.path.join(bpf_dir, PIN_SUBDIR)
        os.makedirs(os.path.join(pin_dir, "links"), exist_ok=True)
        drop_resized_counters(pin_dir)
        obj = BpfObject.open(OBJECT)
        try:
            obj.pin_maps(os.path.join(bpf_dir, SERVICE_PIN_SUBDIR), names=list(MAP_NAMES))
            obj.pin_maps(pin_dir, names=list(OWN_MAPS))
            obj.set_config(
                np_mode=int(MODES[mode]),
                np_node_ip4=be32(node_ip),
                np_node_ip6=node_ipv6.packed if node_ipv6 is not None else bytes(16),
            )
            obj.load()
        except BaseException:
            obj.close()
            raise
        return cls(pin_dir, mode, node_ip, obj, node_ipv6)

    def close(self) -> None:
        self.obj.close()

    def attach(self, device: str) -> str:
        """Serve `device` (both directions); a device already served gets this build's
        programs swapped in. Returns how: tcx, clsact or adopted."""
        ifindex = socket.if_nametoindex(device)
        how = "adopted"
        for direction, program in PROGRAMS.items():
            prog = self.obj.program(program)
            pin = self._link_pin(device, direction)
            if os.path.exists(pin):
                with Link.from_pin(pin) as link:
                    if link.ifindex == ifindex:
                        link.update(prog)
                        continue
                    os.unlink(pin)  # a device of that name that is gone: its link too
            try:
                made = attach_tc(prog, ifindex, direction, slot=CLSACT_SLOT)
            except AttachError as err:
                raise UserError("devices", f"cannot attach to {device}: {err}") from None
            if isinstance(made, ClsactAttachment):
                how = "clsact"
            else:
                with contextlib.closing(made):
                    made.pin(pin)
                how = "tcx"
        self.obj.map("np_devices").update(ifindex, 1)
        self.devices[device] = how
        return how

    def detach(self, device: str) -> None:
        """Stop serving `device` (what is already gone is skipped)."""
        for direction in PROGRAMS:
            pin = self._link_pin(device, direction)
            if os.path.exists(pin):
                with Link.from_pin(pin) as link, contextlib.suppress(BpfError):
                    link.detach()
                os.unlink(pin)
        with contextlib.suppress(OSError):
            self.obj.map("np_devices").delete(socket.if_nametoindex(device))
        self.devices.pop(device, None)

    def sync(self, patterns: Sequence[str]) -> list[str]:
        """Attach to every present device the patterns name that is not served yet;
        returns the ones newly attached. A device that refuses is logged, not fatal."""
        present = [name for _, name in socket.if_nameindex()]
        added = []
        for device in matching_devices(patterns, present):
            if device in self.devices:
                continue
            try:
                self.attach(device)
                added.append(device)
            except (UserError, OSError) as err:
                log.warning("nodeport: device not served", extra={"fields": {"why": str(err)}})
        return added

    def counters(self) -> dict[str, int]:
        return read_counters(self.obj.map("np_stats"))

    def _link_pin(self, device: str, direction: str) -> str:
        return os.path.join(self.pin_dir, "links", f"{encode_pin_name(device)}-{direction}")


class DeviceWatcher:
    """Serves the devices `--devices` names as they appear (a test's outside link, a NIC
    that comes up late): a check every `interval` seconds in the node's namespace. A device
    that goes away is forgotten, so one made again under its name is served again."""

    def __init__(
        self, path: NodePortPath, patterns: Sequence[str], node_netns: str | None, interval: float
    ) -> None:
        self.path, self.patterns, self.node_netns = path, tuple(patterns), node_netns
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nodeport-devices", daemon=True)

    def start(self) -> None:
        self.check()  # the devices present now are served before the agent says ready
        self._thread.start()

    def check(self) -> list[str]:
        with netns.inside(self.node_netns) if self.node_netns else contextlib.nullcontext():
            present = {name for _, name in socket.if_nameindex()}
            for gone in set(self.path.devices) - present:
                self.path.devices.pop(gone, None)
            added = self.path.sync(self.patterns)
        if added:
            log.info("nodeport: serving", extra={"fields": {"devices": ",".join(added)}})
        return added

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:
                log.exception("nodeport: device check failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.path.close()


def start_nodeport(
    bpf_dir: str,
    mode: str,
    node_ip: IPv4Address,
    devices: Sequence[str],
    node_netns: str | None,
    interval: float = 1.0,
    node_ipv6: IPv6Address | None = None,
) -> DeviceWatcher | None:
    """The agent's per-packet path on `devices` (names or patterns), or None without any:
    the socket LB alone then serves the node's own clients and its pods. IPv6 NodePorts
    with `node_ipv6` (a dual-stack agent)."""
    release_unwanted(bpf_dir, devices)
    if not devices:
        return None
    watcher = DeviceWatcher(
        NodePortPath.start(bpf_dir, mode, node_ip, node_ipv6), devices, node_netns, interval
    )
    watcher.start()
    return watcher


def release_unwanted(bpf_dir: str, patterns: Sequence[str]) -> list[str]:
    """Detach the pinned links of devices `patterns` no longer names (a restart with other
    --devices, or none: the path is off), and forget those devices; returns them."""
    links_dir = Path(bpf_dir) / PIN_SUBDIR / "links"
    released = set()
    for pin in sorted(links_dir.glob("*")) if links_dir.exists() else ():
        device = decode_pin_name(pin.name.rsplit("-", 1)[0])
        if any(fnmatch.fnmatchcase(device, p) for p in patterns) and device != "lo":
            continue
        with contextlib.suppress(BpfError, OSError), Link.from_pin(str(pin)) as link:
            ifindex = link.ifindex
            link.detach()
            with Map.from_pin(str(links_dir.parent / "np_devices")) as served:
                served.delete(ifindex)
        pin.unlink(missing_ok=True)
        released.add(device)
    if released:
        log.info("nodeport: released", extra={"fields": {"devices": ",".join(sorted(released))}})
    return sorted(released)


def drop_resized_counters(pin_dir: str) -> None:
    """A pinned np_stats of another build's size is let go (counters only, no state):
    the build's own is pinned in its place instead of failing the load."""
    path = os.path.join(pin_dir, "np_stats")
    if not os.path.exists(path):
        return
    with Map.from_pin(path) as stats:
        resized = stats.max_entries != int(NodePortStat.MAX)
    if resized:
        os.unlink(path)


def read_counters(stats: Map) -> dict[str, int]:
    """np_stats summed over CPUs, by name."""
    return {name: int(sum(stats.lookup(int(stat)))) for stat, name in STAT_NAMES.items()}


def pinned_counters(bpf_dir: str) -> dict[str, int] | None:
    """The counters of an agent's per-packet path, or None when it has none."""
    path = Path(bpf_dir) / PIN_SUBDIR / "np_stats"
    if not path.exists():
        return None
    with Map.from_pin(str(path)) as stats:
        return read_counters(stats)


def be32(ip: IPv4Address) -> int:
    """An address as the datapath's __be32 reads it from memory on this host."""
    return int.from_bytes(ip.packed, sys.byteorder)
