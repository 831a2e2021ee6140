"""The node maps: one set per agent, pinned under its bpffs directory and shared by every
endpoint program (each endpoint's object reuses them at load).

Creating them means loading endpoint.bpf.o with no programs, so libbpf creates and pins
the maps exactly as the programs declare them; adopting them after a restart only opens
the pins, so conntrack, policy and counters survive the agent.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np

from membrane.bpf import BpfObject, Btf, Map
from membrane.bpf.fs import ensure_bpffs
from membrane.bpf.maps import MapInfo, map_info, obj_get
from membrane.datapath.abi import ENDPOINT_OBJECT, NODE_MAPS
from membrane.datapath.service_nat import skip_service_maps
from membrane.errors import UserError

log = logging.getLogger(__name__)


class NodeMapFull(UserError):
    """A change would need more entries in a node map than it holds: refused before the
    first write, so nothing changes (the kernel would fail the write part of the way)."""

    def __init__(self, name: str, needed: int, size: int, hint: str = "") -> None:
        self.name, self.needed, self.size, self.hint = name, needed, size, hint
        super().__init__(f"{name} map", self.shortfall())

    def shortfall(self) -> str:
        """The numbers, and that nothing was changed."""
        hint = f" ({self.hint})" if self.hint else ""
        return (
            f"needs {self.needed:,} {self.name} map entries at its peak, the map holds "
            f"{self.size:,}{hint}; nothing was changed"
        )


def pinned_map_infos(pin_dir: str) -> dict[str, MapInfo]:
    """What the kernel says of each node map pinned under `pin_dir` (missing ones left
    out)."""
    infos = {}
    for name in NODE_MAPS:
        try:
            fd = obj_get(os.path.join(pin_dir, name))
        except FileNotFoundError:
            continue
        try:
            infos[name] = map_info(fd)
        finally:
            os.close(fd)
    return infos


def pinned_sizes(pin_dir: str) -> dict[str, int]:
    """max_entries of the node maps pinned under `pin_dir` (missing ones left out). An
    object reusing a pinned map must declare the same size, or libbpf refuses it."""
    return {name: info.max_entries for name, info in pinned_map_infos(pin_dir).items()}


def _create_missing(pin_dir: str, sizes: Mapping[str, int]) -> None:
    """Load the object without programs: libbpf creates the maps not pinned yet (with
    `sizes`) and pins them, and reuses those already pinned."""
    with BpfObject.open(ENDPOINT_OBJECT) as obj:
        for prog in obj.programs.values():
            prog.autoload = False
        skip_service_maps(obj)
        for name, size in sizes.items():
            obj.set_max_entries(name, size)
        obj.pin_maps(pin_dir, names=list(NODE_MAPS))
        obj.load()


@dataclass
class NodeMaps:
    """Open handles on the pinned node maps, typed from their BTF."""

    pin_dir: str
    btf: Btf  # of the object that created `ct`; it holds struct flow_event too
    ipcache: Map
    ipcache6: Map
    endpoints: Map
    policy: Map
    ct: Map
    ct6: Map
    drops: Map
    forwards: Map
    monitor_config: Map
    events: Map
    events_lost: Map

    @classmethod
    def open(cls, pin_dir: str, sizes: Mapping[str, int] | None = None) -> NodeMaps:
        """Create the maps under `pin_dir` (sizes: map name -> max_entries, used only for
        maps created now) or adopt those already pinned there."""
        unknown = set(sizes or {}) - set(NODE_MAPS)
        if unknown:
            raise ValueError(f"no node maps named {', '.join(sorted(unknown))}")
        ensure_bpffs()
        existing = pinned_sizes(pin_dir)
        for name, size in (sizes or {}).items():
            if existing.get(name, size) != size:
                log.warning(
                    "node map %s under %s keeps its %d entries (asked for %d): resizing "
                    "would drop its state",
                    name,
                    pin_dir,
                    existing[name],
                    size,
                )
        if len(existing) < len(NODE_MAPS):
            _create_missing(pin_dir, {**(sizes or {}), **existing})
        fds = {name: obj_get(os.path.join(pin_dir, name)) for name in NODE_MAPS}
        # Maps created by one load share one BTF: parse each BTF once. (The ring buffer
        # has none: it is declared without key and value types.)
        btfs: dict[int, Btf] = {}
        maps = {}
        for name, fd in fds.items():
            btf_id = map_info(fd).btf_id
            if btf_id and btf_id not in btfs:
                btfs[btf_id] = Btf.from_kernel_id(btf_id)
            maps[name] = Map(fd, name=name, owns_fd=True, btf=btfs.get(btf_id))
        return cls(pin_dir=pin_dir, btf=btfs[map_info(fds["ct"]).btf_id], **maps)

    def maps(self) -> dict[str, Map]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in NODE_MAPS}

    def sizes(self) -> dict[str, int]:
        return {name: m.max_entries for name, m in self.maps().items()}

    def flow_event_dtype(self) -> np.dtype:
        """numpy dtype of `struct flow_event`, for RingBuffer(maps.events, dtype=...)."""
        return self.btf.dtype("flow_event")

    def close(self) -> None:
        """Close our handles; the pinned maps stay (remove the pin directory to free them)."""
        for m in self.maps().values():
            m.close()

    def __enter__(self) -> NodeMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
