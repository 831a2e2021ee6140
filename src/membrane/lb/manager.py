"""Attaches, changes and removes the `membrane lb` load balancer; all state is in bpffs.

Layout: /sys/fs/bpf/membrane/lb/<scope>/ holds `link` and the maps of bpf/abi/lb.h, where
scope is `host` or `netns-<name>` (the namespace of the device), as `membrane filter`
names them. One LB per machine: VIP and backend commands find it without naming a device.
It is built in a staging directory and renamed into place once attached, so a failed
attach leaves nothing behind; it keeps balancing after the command exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from membrane.bpf import AttachError, BpfError, BpfObject, Link, Map
from membrane.bpf.fs import ensure_bpffs
from membrane.bpf.links import attach_xdp
from membrane.errors import NotPermitted, UserError
from membrane.filter.manager import (
    XDP_MODE_IDS,
    XDP_MODE_NAMES,
    FilterManager,
    attach_problem,
    decode_pin_name,
    device_index,
    in_netns,
    xdp_mode_for,
)
from membrane.filter.rules import IPAddress
from membrane.lb.frontend import Vip
from membrane.lb.tables import Backend, LbTables, Service

LB_ROOT = "lb"
LOCK_FILE = "/run/lock/membrane-lb.lock"


@dataclass
class LbAttachment:
    path: Path
    netns: str | None
    device: str  # as found now through the ifindex ("" when the device is gone)
    ifindex: int
    xdp_mode: str
    source4: IPAddress | None
    source6: IPAddress | None

    def tables(self) -> LbTables:
        return LbTables(lambda name: Map.from_pin(str(self.path / name)))


def require_root() -> None:
    from membrane.bpf.probe import missing_capabilities

    if missing := missing_capabilities(("CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN")):
        raise NotPermitted(
            "", f"membrane lb needs root ({', '.join(missing)} missing) to load, attach and pin"
        )


def device_addresses(ifindex: int) -> tuple[IPAddress | None, IPAddress | None]:
    """The first global IPv4 and IPv6 address of a device in the current namespace: the
    outer source of encapsulated packets unless --source names one."""
    from pyroute2 import IPRoute

    found: dict[int, IPAddress] = {}
    with IPRoute() as ipr:
        for msg in ipr.get_addr(index=ifindex):
            addr = ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
            if not addr.is_link_local and addr.version not in found:
                found[addr.version] = addr
    return found.get(4), found.get(6)


class LbManager:
    def __init__(self, pin_root: str | None = None) -> None:
        require_root()
        self.root = Path(pin_root or ensure_bpffs()) / LB_ROOT

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One change at a time: two would pick the same service or backend ids."""
        os.makedirs(os.path.dirname(LOCK_FILE), exist_ok=True)
        with open(LOCK_FILE, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def find(self) -> LbAttachment | None:
        for path in sorted(self.root.glob("*")) if self.root.is_dir() else []:
            scope = path.name
            if not (scope == "host" or scope.startswith("netns-")) or not (path / "link").exists():
                continue
            netns = decode_pin_name(scope.removeprefix("netns-")) if scope != "host" else None
            with Map.from_pin(str(path / "lb_config")) as config:
                cfg = config.lookup(0)
            device = ""
            with contextlib.suppress(OSError, UserError), in_netns(netns):
                device = socket.if_indextoname(cfg.ifindex)
            src4 = ipaddress.IPv4Address(bytes(cfg.src4))
            src6 = ipaddress.IPv6Address(bytes(cfg.src6))
            return LbAttachment(
                path,
                netns,
                device,
                cfg.ifindex,
                XDP_MODE_NAMES.get(cfg.xdp_mode, "?"),
                src4 if int(src4) else None,
                src6 if int(src6) else None,
            )
        return None

    def require(self) -> LbAttachment:
        att = self.find()
        if att is None:
            raise UserError("", "no load balancer is attached (membrane lb attach DEV)")
        return att

    def attach(
        self,
        device: str,
        netns: str | None,
        mode: str = "auto",
        sources: list[IPAddress] | None = None,
    ) -> LbAttachment:
        if (att := self.find()) is not None:
            where = f" in netns {att.netns}" if att.netns else ""
            raise UserError(
                "DEV", f"the load balancer is attached to {att.device}{where}; detach it first"
            )
        final = self.root / FilterManager.scope_of(netns)
        staging = self.root / f"staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        link: Link | None = None
        try:
            with in_netns(netns):
                ifindex = device_index(device, "DEV")
                src4, src6 = _sources(ifindex, sources or [])
                obj = BpfObject.open("lb_xdp")
                obj.pin_maps(str(staging))
                with obj.load():
                    xdp_mode = xdp_mode_for(ifindex, mode)
                    tables = LbTables(obj.map)
                    tables.set_sources(src4, src6, ifindex=ifindex)
                    link, took = attach_xdp(obj.program("lb_xdp"), ifindex, xdp_mode)
                    tables.set_sources(src4, src6, ifindex=ifindex, xdp_mode=XDP_MODE_IDS[took])
                    link.pin(str(staging / "link"))
            os.rename(staging, final)
        except AttachError as err:
            self._undo(link, staging)
            raise UserError("DEV", attach_problem(device, "xdp", err)) from None
        except BaseException:
            self._undo(link, staging)
            raise
        finally:
            if link is not None:
                link.close()
        found = self.find()
        assert found is not None
        return found

    def _undo(self, link: Link | None, staging: Path) -> None:
        if link is not None:
            with contextlib.suppress(BpfError):
                link.detach()
        shutil.rmtree(staging, ignore_errors=True)

    def detach(self) -> LbAttachment:
        att = self.require()
        with contextlib.suppress(FileNotFoundError), Link.from_pin(str(att.path / "link")) as link:
            link.detach()
        shutil.rmtree(att.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.root.rmdir()
        return att

    # ---- services ------------------------------------------------------------------------
    def add_vip(self, vip: Vip, table_size: int) -> Service:
        att = self.require()
        src = att.source4 if vip.addr.version == 4 else att.source6
        if src is None:
            raise UserError(
                "VIP",
                f"{vip} is IPv{vip.addr.version} but the load balancer has no IPv"
                f"{vip.addr.version} source address (attach with --source)",
            )
        return att.tables().add_vip(vip, table_size)

    def delete_vip(self, vip: Vip) -> None:
        self.require().tables().delete_vip(vip)

    def set_backend(self, vip: Vip, addr: IPAddress, weight: int) -> Backend:
        return self.require().tables().set_backend(vip, addr, weight)

    def remove_backend(self, vip: Vip, addr: IPAddress) -> None:
        self.require().tables().remove_backend(vip, addr)

    def link_state(self, att: LbAttachment) -> str:
        with Link.from_pin(str(att.path / "link")) as link:
            return "attached" if link.ifindex else "defunct (device gone)"


def _sources(ifindex: int, given: list[IPAddress]) -> tuple[IPAddress | None, IPAddress | None]:
    """The outer source addresses: those given (one per family at most), else the
    device's own."""
    own4, own6 = device_addresses(ifindex)
    chosen: dict[int, IPAddress] = {}
    for addr in given:
        if addr.version in chosen:
            raise UserError("--source", f"give at most one IPv{addr.version} source address")
        chosen[addr.version] = addr
    src4, src6 = chosen.get(4, own4), chosen.get(6, own6)
    if src4 is None and src6 is None:
        raise UserError(
            "--source", "the device has no IP address to use as outer source; give --source"
        )
    return src4, src6
