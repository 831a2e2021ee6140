"""Endpoint programs: load endpoint.bpf.o for one endpoint and attach it to the node side of
its veth.

    from_container  tcx ingress of the node-side veth (the pod's egress)
    to_container    tcx egress of the node-side veth  (the pod's ingress)

The links are pinned under <pin_dir>/endpoint_links/<ep_id>/{ingress,egress} (not
<pin_dir>/endpoints/: that is the pinned `endpoints` map), so the programs keep enforcing
while the agent is away. Attaching again (an agent restart, an upgrade, a
changed address) keeps the pinned links and swaps the freshly loaded programs into them
in place (bpf_link_update): at no moment does the device run without a program. Needs
tcx (kernel >= 6.6) for the pins; on the clsact fallback the filters live with the
device but cannot be adopted after a restart.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from ipaddress import IPv4Address

from membrane.bpf import BpfError, BpfObject, Link
from membrane.bpf.links import attach_tc
from membrane.datapath.abi import (
    ENDPOINT_OBJECT,
    NODE_MAPS,
    PROG_FROM_CONTAINER,
    PROG_TO_CONTAINER,
)
from membrane.datapath.nodemaps import pinned_sizes
from membrane.netns.namespace import inside

ATTACH_TCX, ATTACH_CLSACT = "tcx", "clsact"

# tc direction on the node-side veth -> program
HOOKS = {"ingress": PROG_FROM_CONTAINER, "egress": PROG_TO_CONTAINER}


def links_dir(pin_dir: str, ep_id: int) -> str:
    return os.path.join(pin_dir, "endpoint_links", str(ep_id))


def load_endpoint(pin_dir: str, ep_id: int, ipv4: IPv4Address | str, **config: int) -> BpfObject:
    """endpoint.bpf.o loaded for one endpoint on the node maps pinned under `pin_dir`
    (NodeMaps.open must have created them). `config` sets further load-time constants
    (ct_timeout_*_s, events_wakeup_bytes). The caller closes the object."""
    sizes = pinned_sizes(pin_dir)
    missing = [name for name in NODE_MAPS if name not in sizes]
    if missing:
        raise BpfError(
            f"node maps {', '.join(missing)} are not pinned under {pin_dir}: "
            "open them with NodeMaps.open first"
        )
    if not 0 < ep_id <= 0xFFFF:
        raise ValueError(f"endpoint id {ep_id} is outside 1..65535")
    obj = BpfObject.open(ENDPOINT_OBJECT)
    try:
        obj.set_config(ep_id=ep_id, ep_ipv4=IPv4Address(ipv4).packed, **config)
        for name, size in sizes.items():
            obj.set_max_entries(name, size)
        obj.pin_maps(pin_dir, names=list(NODE_MAPS))
        obj.load()
    except BaseException:
        obj.close()
        raise
    return obj


@contextlib.contextmanager
def _netns(ns: str | None) -> Iterator[None]:
    if ns is None:
        yield
    else:
        with inside(ns):
            yield


def _pinned(path: str) -> Link | None:
    try:
        return Link.from_pin(path, kind="tcx")
    except FileNotFoundError:
        return None


def attach_endpoint(
    pin_dir: str,
    ep_id: int,
    ipv4: IPv4Address | str,
    ifindex: int,
    node_netns: str | None = None,
    **config: int,
) -> str:
    """Load the endpoint's programs and attach them to `ifindex` (the node-side veth, an
    index in `node_netns` when given), or swap them into the links already pinned for
    this endpoint on that device. Returns how they are attached: "tcx" (pinned links) or
    "clsact" (the fallback on kernels without tcx)."""
    directory = links_dir(pin_dir, ep_id)
    modes = set()
    with load_endpoint(pin_dir, ep_id, ipv4, **config) as obj, _netns(node_netns):
        for direction, prog_name in HOOKS.items():
            prog = obj.program(prog_name)
            path = os.path.join(directory, direction)
            link = _pinned(path)
            if link is not None and link.ifindex == ifindex:
                link.update(prog)
                link.close()
                modes.add(ATTACH_TCX)
                continue
            if link is not None:
                link.detach()  # another device, or its device is gone (defunct link)
            attachment = attach_tc(prog, ifindex, direction)
            attachment.pin(path)
            modes.add(ATTACH_TCX if attachment.kind.startswith("tcx") else ATTACH_CLSACT)
            attachment.close()
    return ATTACH_CLSACT if ATTACH_CLSACT in modes else ATTACH_TCX


def detach_endpoint(pin_dir: str, ep_id: int) -> bool:
    """Detach and unpin the endpoint's programs; False when none were pinned."""
    directory = links_dir(pin_dir, ep_id)
    found = False
    for direction in HOOKS:
        link = _pinned(os.path.join(directory, direction))
        if link is not None:
            link.detach()
            found = True
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(directory)
    return found


def detach_all_endpoints(pin_dir: str) -> int:
    """Detach every endpoint's programs pinned under `pin_dir`, one by one; returns how
    many endpoints had some. Removing the pins instead leaves each link to a kernel worker
    of its own, and a node's worth of them (1,000 for 500 endpoints) queue up behind the
    RTNL lock for seconds, stalling every netlink user on the machine."""
    return sum(1 for ep_id in pinned_endpoint_ids(pin_dir) if detach_endpoint(pin_dir, ep_id))


def pinned_endpoint_ids(pin_dir: str) -> list[int]:
    """Endpoint ids with a link directory under `pin_dir`."""
    try:
        names = os.listdir(os.path.join(pin_dir, "endpoint_links"))
    except FileNotFoundError:
        return []
    return sorted(int(name) for name in names if name.isdigit())


def is_attached(pin_dir: str, ep_id: int) -> bool:
    """Both programs are pinned and attached to a device that still exists."""
    for direction in HOOKS:
        link = _pinned(os.path.join(links_dir(pin_dir, ep_id), direction))
        if link is None:
            return False
        with link:
            if link.ifindex == 0:
                return False
    return True
