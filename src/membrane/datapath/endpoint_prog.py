"""Endpoint programs: load endpoint.bpf.o for one endpoint and attach it to the node side of
its veth.

    from_container  tc ingress of the node-side veth (the pod's egress)
    to_container    tc egress of the node-side veth  (the pod's ingress)

Each direction's attachment is recorded at <pin_dir>/endpoint_links/<ep_id>/{ingress,egress}
(not <pin_dir>/endpoints/: that is the pinned `endpoints` map), so the programs keep
enforcing while the agent is away and a restarted agent, an upgrade or `agent reset` finds
them again:

- tcx (kernel >= 6.6): the pinned bpf_link. Attaching again swaps the freshly loaded
  program into it in place (bpf_link_update).
- clsact (older kernels, or forced): a filter in a fixed slot, CLSACT_SLOT (priority 1,
  handle 0x4d42) on both hooks of the device. bpffs holds no plain files, so the record is
  a symlink whose target names the device: "clsact:<ifindex>:<node netns>". Attaching
  again replaces the filter in that slot atomically (BPF_TC_F_REPLACE); it is never added
  beside the old one.

At no moment does the device run without a program: a new attachment (another device, or
another mode) is made before the old one is removed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from membrane.bpf import BpfError, BpfObject, Link, Program
from membrane.bpf.links import TC_MODES, ClsactAttachment, TcSlot, attach_tc
from membrane.bpf.maps import map_name
from membrane.bpf.proginfo import program_info, program_info_by_id
from membrane.datapath.abi import (
    ENDPOINT_OBJECT,
    NODE_MAPS,
    PROG_FROM_CONTAINER,
    PROG_TO_CONTAINER,
)
from membrane.datapath.nodemaps import pinned_sizes
from membrane.datapath.service_nat import pin_service_maps
from membrane.netns.namespace import exists as netns_exists
from membrane.netns.namespace import inside

ATTACH_TCX, ATTACH_CLSACT = "tcx", "clsact"
# The clsact slot of endpoint programs, on both hooks of the node-side veth.
CLSACT_SLOT = TcSlot(priority=1, handle=0x4D42)
_CLSACT_RECORD = "clsact"

# tc direction on the node-side veth -> program
HOOKS = {"ingress": PROG_FROM_CONTAINER, "egress": PROG_TO_CONTAINER}


def links_dir(pin_dir: str, ep_id: int) -> str:
    return os.path.join(pin_dir, "endpoint_links", str(ep_id))


def load_endpoint(
    pin_dir: str,
    ep_id: int,
    ipv4: IPv4Address | str,
    ipv6: IPv6Address | str | None = None,
    **config: int | bytes,
) -> BpfObject:
    """endpoint.bpf.o loaded for one endpoint on the node maps pinned under `pin_dir`
    (NodeMaps.open must have created them); without `ipv6` the endpoint is IPv4-only and
    its programs drop IPv6. `config` sets further load-time constants (ct_timeout_*_s,
    events_wakeup_bytes, the service CIDRs: service_nat_config). The service maps are
    shared under `pin_dir` too (datapath.service_nat). The caller closes the object."""
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
        ipv6_packed = bytes(16) if ipv6 is None else IPv6Address(ipv6).packed
        obj.set_config(ep_id=ep_id, ep_ipv4=IPv4Address(ipv4).packed, ep_ipv6=ipv6_packed, **config)
        for name, size in sizes.items():
            obj.set_max_entries(name, size)
        obj.pin_maps(pin_dir, names=list(NODE_MAPS))
        pin_service_maps(obj, pin_dir)
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


@dataclass(frozen=True)
class ClsactRecord:
    """Where an endpoint's clsact filter is: the device and the namespace it lives in."""

    ifindex: int
    netns: str | None

    def text(self) -> str:
        return f"{_CLSACT_RECORD}:{self.ifindex}:{self.netns or ''}"

    @classmethod
    def parse(cls, text: str) -> ClsactRecord | None:
        kind, _, rest = text.partition(":")
        ifindex, _, ns = rest.partition(":")
        if kind != _CLSACT_RECORD or not ifindex.isdigit():
            return None
        return cls(int(ifindex), ns or None)

    def attachment(self, direction: str) -> ClsactAttachment:
        return ClsactAttachment(self.ifindex, direction, CLSACT_SLOT.handle, CLSACT_SLOT.priority)

    def reachable(self) -> bool:
        return self.netns is None or netns_exists(self.netns)

    def program_id(self, direction: str) -> int | None:
        """The program in our slot on the device, or None when there is none."""
        if not self.reachable():
            return None
        with _netns(self.netns):
            return self.attachment(direction).program_id()

    def detach(self, direction: str) -> None:
        """Remove our filter; a device or namespace that is gone took it along."""
        if self.reachable():
            with _netns(self.netns):
                self.attachment(direction).detach()


Attached = Link | ClsactRecord


def _recorded(path: str) -> Attached | None:
    """This direction's attachment as recorded at `path`: a pinned tcx link, the record of
    a clsact filter, or None."""
    if os.path.islink(path):
        return ClsactRecord.parse(os.readlink(path))
    try:
        return Link.from_pin(path, kind="tcx")
    except FileNotFoundError:
        return None


def _forget(path: str, old: Attached, direction: str) -> None:
    """End an attachment and its record."""
    if isinstance(old, Link):
        old.detach()  # also unpins `path`
        return
    old.detach(direction)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _attach_direction(
    prog: Program, path: str, direction: str, ifindex: int, node_netns: str | None, mode: str
) -> str:
    """Swap `prog` in where this direction is attached already (same device, a mode that
    `mode` allows), else attach anew and then remove the old attachment. Returns the mode."""
    old = _recorded(path)
    if isinstance(old, Link) and old.ifindex == ifindex and mode != ATTACH_CLSACT:
        old.update(prog)
        old.close()
        return ATTACH_TCX
    new = attach_tc(prog, ifindex, direction, mode, slot=CLSACT_SLOT)
    record = ClsactRecord(ifindex, node_netns)
    staged = f"{path}-new"  # the new record, published once the old one is gone
    with contextlib.suppress(FileNotFoundError):
        os.unlink(staged)
    if isinstance(new, Link):
        new.pin(staged)
        new.close()
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(record.text(), staged)
    replaced_in_place = isinstance(new, ClsactAttachment) and old == record  # same slot
    if old is not None and not replaced_in_place:
        _forget(path, old, direction)
    os.replace(staged, path)
    return ATTACH_TCX if isinstance(new, Link) else ATTACH_CLSACT


def attach_endpoint(
    pin_dir: str,
    ep_id: int,
    ipv4: IPv4Address | str,
    ifindex: int,
    node_netns: str | None = None,
    mode: str = "auto",
    ipv6: IPv6Address | str | None = None,
    **config: int | bytes,
) -> str:
    """Load the endpoint's programs and attach them to `ifindex` (the node-side veth, an
    index in `node_netns` when given), or swap them into the attachments already recorded
    for this endpoint on that device. `mode`: auto (tcx where the kernel has it, else
    clsact; an existing attachment keeps its mode), tcx or clsact (an attachment in the
    other mode is replaced). Returns how they are attached: "tcx" or "clsact"."""
    if mode not in TC_MODES:
        raise ValueError(f"attach mode must be one of {', '.join(TC_MODES)}, not {mode!r}")
    with load_endpoint(pin_dir, ep_id, ipv4, ipv6, **config) as obj:
        return attach_loaded(obj, pin_dir, ep_id, ifindex, node_netns, mode)


def attach_loaded(
    obj: BpfObject,
    pin_dir: str,
    ep_id: int,
    ifindex: int,
    node_netns: str | None = None,
    mode: str = "auto",
) -> str:
    """attach_endpoint with the programs of `obj` (load_endpoint for this endpoint), which
    the caller loaded, e.g. while the veth was being made. (Attaching the two directions
    at once gains nothing: the kernel serialises tcx attachments on the RTNL lock.)"""
    if mode not in TC_MODES:
        raise ValueError(f"attach mode must be one of {', '.join(TC_MODES)}, not {mode!r}")
    directory = links_dir(pin_dir, ep_id)
    os.makedirs(directory, exist_ok=True)
    modes = set()
    with _netns(node_netns):
        for direction, prog_name in HOOKS.items():
            path = os.path.join(directory, direction)
            want = mode
            if mode == "auto" and isinstance(_peek(path), ClsactRecord):
                want = ATTACH_CLSACT  # adopted as it is
            modes.add(
                _attach_direction(
                    obj.program(prog_name), path, direction, ifindex, node_netns, want
                )
            )
    return ATTACH_CLSACT if ATTACH_CLSACT in modes else ATTACH_TCX


@dataclass
class HeldAttachment:
    """Programs attached to a device ahead of its endpoint's record (a veth made before
    the add that uses it): tcx links held by fd only, so a process that dies takes them
    along, or clsact filters in our slot, which go with the device. `record` makes them
    the endpoint's like `attach_loaded` does; `close` lets go of them unrecorded."""

    ifindex: int
    node_netns: str | None
    attached: dict[str, Link | ClsactAttachment]  # direction -> attachment

    def program_ids(self) -> dict[str, int | None]:
        """direction -> id of the program attached there."""
        found: dict[str, int | None] = {}
        with _netns(self.node_netns):
            for direction, a in self.attached.items():
                found[direction] = a.info().prog_id if isinstance(a, Link) else a.program_id()
        return found

    def record(self, pin_dir: str, ep_id: int) -> str:
        """Record the attachments as endpoint `ep_id`'s (any record it had is ended
        first); returns the mode, "tcx" or "clsact"."""
        directory = links_dir(pin_dir, ep_id)
        os.makedirs(directory, exist_ok=True)
        for direction, attached in self.attached.items():
            path = os.path.join(directory, direction)
            old = _recorded(path)
            if old is not None:
                _forget(path, old, direction)
            if isinstance(attached, Link):
                attached.pin(path)
            else:
                os.symlink(ClsactRecord(self.ifindex, self.node_netns).text(), path)
        self.close()
        kinds = {type(a) for a in self.attached.values()}
        return ATTACH_TCX if kinds == {Link} else ATTACH_CLSACT

    def close(self) -> None:
        """Drop our handles: an unrecorded tcx link ends here; clsact filters stay until
        their device goes (delete the device to end them)."""
        for attached in self.attached.values():
            attached.close()


def attach_ahead(
    obj: BpfObject, ifindex: int, node_netns: str | None = None, mode: str = "auto"
) -> HeldAttachment:
    """Attach the programs of `obj` (load_endpoint) to `ifindex`, a device of `node_netns`
    that no endpoint records yet, without recording them: see HeldAttachment."""
    if mode not in TC_MODES:
        raise ValueError(f"attach mode must be one of {', '.join(TC_MODES)}, not {mode!r}")
    held = HeldAttachment(ifindex, node_netns, {})
    try:
        with _netns(node_netns):
            for direction, prog_name in HOOKS.items():
                held.attached[direction] = attach_tc(
                    obj.program(prog_name), ifindex, direction, mode, slot=CLSACT_SLOT
                )
    except BaseException:
        held.close()
        raise
    return held


def _peek(path: str) -> Attached | None:
    found = _recorded(path)
    if isinstance(found, Link):
        found.close()
    return found


def detach_endpoint(pin_dir: str, ep_id: int) -> bool:
    """Detach the endpoint's programs and remove their records; False when there were none."""
    directory = links_dir(pin_dir, ep_id)
    found = False
    for direction in HOOKS:
        path = os.path.join(directory, direction)
        old = _recorded(path)
        if old is not None:
            _forget(path, old, direction)
            found = True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}-new")  # left by an agent that died while attaching
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(directory)
    return found


def detach_all_endpoints(pin_dir: str) -> int:
    """Detach every endpoint's programs recorded under `pin_dir`, one by one; returns how
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


def attached_programs(pin_dir: str, ep_id: int) -> dict[str, int]:
    """direction -> id of the program attached there now (directions without one left
    out: not recorded, a defunct link, or a clsact slot that is empty)."""
    found = {}
    for direction in HOOKS:
        old = _recorded(os.path.join(links_dir(pin_dir, ep_id), direction))
        if isinstance(old, Link):
            with old:
                info = old.info()
                prog_id = info.prog_id if old.ifindex else None
        elif old is not None:
            prog_id = old.program_id(direction)
        else:
            prog_id = None
        if prog_id:
            found[direction] = prog_id
    return found


def attach_mode(pin_dir: str, ep_id: int) -> str | None:
    """How the endpoint's programs are recorded: "tcx", "clsact", or None (not at all, or
    a mix an interrupted mode switch left)."""
    kinds = {type(_peek(os.path.join(links_dir(pin_dir, ep_id), d))) for d in HOOKS}
    if kinds == {Link}:
        return ATTACH_TCX
    if kinds == {ClsactRecord}:
        return ATTACH_CLSACT
    return None


def is_attached(pin_dir: str, ep_id: int) -> bool:
    """Both programs are attached (to a device that still exists), and they are ours."""
    programs = attached_programs(pin_dir, ep_id)
    for direction, prog_name in HOOKS.items():
        info = program_info_by_id(programs[direction]) if direction in programs else None
        if info is None or info.name != prog_name[:15]:  # the kernel keeps 15 characters
            return False
    return True


def build_tags(pin_dir: str) -> dict[str, str]:
    """direction -> tag of the program this build would attach (the same for every
    endpoint: the tag leaves map references and load-time constants out)."""
    with load_endpoint(pin_dir, 1, "0.0.0.0") as obj:
        return {d: program_info(obj.program(name).fd).tag for d, name in HOOKS.items()}


def runs_build(pin_dir: str, ep_id: int, tags: Mapping[str, str], node_maps: set[int]) -> bool:
    """The endpoint's programs are those of the build with these `tags` (build_tags) and
    use the node maps pinned now (`node_maps`: their ids), not ones a migration replaced."""
    programs = attached_programs(pin_dir, ep_id)
    for direction in HOOKS:
        info = program_info_by_id(programs[direction]) if direction in programs else None
        if info is None or info.tag != tags[direction]:
            return False
        for map_id in set(info.map_ids) - node_maps:
            if map_name(map_id) in NODE_MAPS:
                return False  # a node map that is no longer pinned: the old layout
    return True
