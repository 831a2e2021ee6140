"""The backend side of `membrane lb` where no ipip/ip6tnl device can be made (a kernel
built without CONFIG_NET_IPIP / CONFIG_IPV6_TUNNEL): the lb_decap XDP program strips
the outer header so the inner packet reaches the VIP held on a local device.

Pinned at /sys/fs/bpf/membrane/lb-decap/<scope>/<device>/ (link, lb_decap_stats), scope
as `membrane filter` names it, so it stays after the command exits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from membrane.bpf import AttachError, BpfError, BpfObject, Link, Map
from membrane.bpf.fs import ensure_bpffs
from membrane.bpf.links import attach_xdp
from membrane.errors import UserError
from membrane.filter.manager import (
    FilterManager,
    attach_problem,
    device_index,
    encode_pin_name,
    in_netns,
    xdp_mode_for,
)

DECAP_ROOT = "lb-decap"


def _path(pin_root: str | None, netns: str | None, device: str) -> Path:
    base = Path(pin_root or ensure_bpffs()) / DECAP_ROOT
    return base / FilterManager.scope_of(netns) / encode_pin_name(device)


def attach_decap(
    device: str, netns: str | None, mode: str = "auto", pin_root: str | None = None
) -> str:
    """Attach lb_decap to `device`; returns the XDP mode that took."""
    path = _path(pin_root, netns, device)
    if (path / "link").exists():
        raise UserError("DEV", f"{device} has the decapsulation program already")
    link: Link | None = None
    try:
        with in_netns(netns):
            ifindex = device_index(device, "DEV")
            obj = BpfObject.open("lb_decap")
            obj.pin_maps(str(path))
            with obj.load():
                link, took = attach_xdp(
                    obj.program("lb_decap"), ifindex, xdp_mode_for(ifindex, mode)
                )
                link.pin(str(path / "link"))
    except AttachError as err:
        _undo(link, path)
        raise UserError("DEV", attach_problem(device, "xdp", err)) from None
    except BaseException:
        _undo(link, path)
        raise
    finally:
        if link is not None:
            link.close()
    return took


def detach_decap(device: str, netns: str | None, pin_root: str | None = None) -> None:
    path = _path(pin_root, netns, device)
    if not (path / "link").exists():
        raise UserError("DEV", f"{device} has no decapsulation program of membrane lb")
    with Link.from_pin(str(path / "link")) as link:
        link.detach()
    _undo(None, path)


def decap_counts(device: str, netns: str | None, pin_root: str | None = None) -> dict[str, int]:
    """Packets decapsulated and passed untouched so far."""
    if not (_path(pin_root, netns, device) / "link").exists():
        raise UserError("DEV", f"{device} has no decapsulation program of membrane lb")
    with Map.from_pin(str(_path(pin_root, netns, device) / "lb_decap_stats")) as stats:
        decapsulated, passed = (sum(c.packets for c in stats.lookup(i)) for i in (0, 1))
    return {"decapsulated": decapsulated, "passed": passed}


def _undo(link: Link | None, path: Path) -> None:
    if link is not None:
        with contextlib.suppress(BpfError):
            link.detach()
    shutil.rmtree(path, ignore_errors=True)
    for parent in (path.parent, path.parent.parent):
        with contextlib.suppress(OSError):
            os.rmdir(parent)
