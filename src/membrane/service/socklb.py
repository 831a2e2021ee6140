"""The socket LB's programs (bpf/sock_lb.bpf.c) on a cgroup v2 directory (--cgroup-root),
with the service maps pinned beside the agent's node maps.

Links are pinned, so sockets keep being translated while the agent is down. A restarted
agent adopts them: a pinned link gets the new build's program swapped in (bpf_link_update,
no moment without one) instead of a second attachment.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

from membrane.bpf import BpfObject, Map
from membrane.bpf.errors import BpfError
from membrane.bpf.fs import cgroup2_root
from membrane.bpf.links import Link, attach_cgroup
from membrane.errors import UserError
from membrane.service.maps import MAP_NAMES, ServiceMaps

log = logging.getLogger("membrane.service")
OBJECT = "sock_lb"
PIN_SUBDIR = "services"

# program -> (enum bpf_attach_type, family)
HOOKS = {
    "sock_connect4": (10, 4),  # BPF_CGROUP_INET4_CONNECT
    "sock_sendmsg4": (14, 4),  # BPF_CGROUP_UDP4_SENDMSG
    "sock_recvmsg4": (19, 4),  # BPF_CGROUP_UDP4_RECVMSG
    "sock_getpeername4": (29, 4),  # BPF_CGROUP_INET4_GETPEERNAME
    "sock_connect6": (11, 6),
    "sock_sendmsg6": (15, 6),
    "sock_recvmsg6": (20, 6),
    "sock_getpeername6": (30, 6),
}


def default_cgroup_root() -> str:
    """Where cgroup2 is mounted (read from /proc/mounts)."""
    return str(cgroup2_root())


def check_cgroup_root(path: str) -> str:
    """--cgroup-root: a directory of a cgroup2 mount."""
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "cgroup.procs")):
        raise UserError("cgroup-root", f"{path} is not a cgroup v2 directory")
    return os.path.abspath(path)


@dataclass
class SocketLb:
    """The service maps (created or adopted at start) and the socket LB's hooks, attached
    with the first service (`attach`) or adopted at start when pinned."""

    pin_dir: str
    cgroup: str  # "": the cgroup2 mount's root, found when the hooks attach
    families: tuple[int, ...]
    maps: ServiceMaps
    hooks: dict[str, str] = field(default_factory=dict)  # program -> "attached"/"adopted"/why

    @classmethod
    def start(cls, bpf_dir: str, cgroup: str, families: tuple[int, ...]) -> SocketLb:
        pin_dir = os.path.join(bpf_dir, PIN_SUBDIR)
        os.makedirs(os.path.join(pin_dir, "links"), exist_ok=True)
        lb = cls(pin_dir, cgroup, families, ServiceMaps(lambda name: _pinned(pin_dir, name)))
        if os.listdir(os.path.join(pin_dir, "links")):
            lb.attach()  # adopt: the new build's programs into the pinned links
        return lb

    def attach(self) -> None:
        """Load the programs (their maps are the pinned ones) and attach each to the cgroup,
        or swap it into its pinned link. Once per agent run."""
        if self.hooks:
            return
        cgroup = self.cgroup or default_cgroup_root()
        with BpfObject.open(OBJECT) as obj:
            obj.pin_maps(self.pin_dir, names=list(MAP_NAMES))
            obj.load()
            for name, (attach_type, family) in HOOKS.items():
                if family in self.families:
                    self.hooks[name] = _attach(obj, name, attach_type, cgroup, self.pin_dir)
        log.info("socket LB", extra={"fields": {"cgroup": cgroup, **self.hooks}})

    def close(self) -> None:
        self.maps.close()


def _pinned(pin_dir: str, name: str) -> Map:
    """A service map by its pin, created (with every other) from the object when missing."""
    path = os.path.join(pin_dir, name)
    if not os.path.exists(path):
        with BpfObject.open(OBJECT) as obj:
            for prog in obj.programs.values():
                prog.autoload = False
            obj.pin_maps(pin_dir, names=list(MAP_NAMES))
            obj.load()
    return Map.from_pin(path)


def _attach(obj: BpfObject, name: str, attach_type: int, cgroup: str, pin_dir: str) -> str:
    pin = os.path.join(pin_dir, "links", name)
    prog = obj.program(name)
    if os.path.exists(pin):
        with Link.from_pin(pin) as link:
            link.update(prog)
        return "adopted"
    try:
        link = attach_cgroup(prog, cgroup, attach_type)
    except BpfError as err:
        if name == "sock_connect4":
            raise  # without it there is no socket LB
        log.warning(
            "socket LB hook not attached", extra={"fields": {"program": name, "why": str(err)}}
        )
        return f"not attached: {err}"
    with contextlib.closing(link):
        link.pin(pin)
    return "attached"
