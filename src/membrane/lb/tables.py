"""The LB's maps (bpf/abi/lb.h) as operations: VIPs, backends and Maglev tables.

Every change keeps the datapath consistent at each step:
- a backend's record is written before any table names it, and cleared only after the
  table that no longer names it is in force;
- a service's table is never edited in place: a whole new inner map is built and filled,
  then swapped in with one update of lb_tables (readers see the old or the new table).
Used by the manager (pinned maps) and by the datapath tests (maps of a loaded object).
"""

from __future__ import annotations

import ctypes
import ipaddress
import mmap
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from membrane.abi import LB_MAX_BACKENDS, LB_MAX_VIPS
from membrane.bpf import BpfError, Map
from membrane.bpf import _libbpf as L
from membrane.bpf.maps import F_MMAPABLE, possible_cpus
from membrane.errors import UserError
from membrane.filter.rules import IPAddress, address_bytes
from membrane.lb.frontend import Vip
from membrane.lb.maglev import build_table

BPF_MAP_TYPE_ARRAY = 2
BPF_F_INNER_MAP = 1 << 12  # as lb_xdp.bpf.c's struct lb_table: inner maps differ in size


class _MapCreateOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("btf_fd", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
        ("numa_node", ctypes.c_uint32),
        ("map_ifindex", ctypes.c_uint32),
    ]


L.lib.bpf_map_create.restype = ctypes.c_int
L.lib.bpf_map_create.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint32,
    ctypes.c_uint32,
    ctypes.c_uint32,
    ctypes.c_void_p,
]


def new_table(entries: np.ndarray) -> Map:
    """A new inner table (u32 backend ids), filled through its memory in one copy (a batch
    update of 16,381 entries cost ~9 ms), not yet visible to the datapath."""
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=BPF_F_INNER_MAP | F_MMAPABLE)
    fd = L.lib.bpf_map_create(
        BPF_MAP_TYPE_ARRAY, b"lb_table", 4, 4, len(entries), ctypes.byref(opts)
    )
    if fd < 0:
        raise BpfError("create a Maglev table map", L.errno_of(fd))
    table = Map(fd, owns_fd=True)
    # an element of an array map is rounded up to 8 bytes: u32 ids sit at even u32 slots
    with table.mmap() as memory:
        view = np.frombuffer(memory, dtype=np.uint32)
        view[0 : 2 * len(entries) : 2] = entries
        del view  # the mapping closes only once no array refers to it
    return table


def map_by_id(map_id: int) -> Map:
    fd = L.lib.bpf_map_get_fd_by_id(map_id)
    if fd < 0:
        raise BpfError(f"open map id {map_id}", L.errno_of(fd))
    return Map(fd, owns_fd=True)


@dataclass
class Backend:
    id: int
    addr: IPAddress
    weight: int
    packets: int = 0
    bytes: int = 0


@dataclass
class Service:
    vip: Vip
    id: int  # index into lb_tables
    table_size: int
    backends: list[Backend]


def _addr(raw: bytes, family: int) -> IPAddress:
    return ipaddress.ip_address(bytes(raw[:4]) if family == 4 else bytes(raw[:16]))


class LbTables:
    """The maps of one LB, opened by name through `open_map` (pinned or an object's)."""

    def __init__(self, open_map: Callable[[str], Map]) -> None:
        self.vips = open_map("lb_vips")
        self.tables = open_map("lb_tables")
        self.backends = open_map("lb_backends")
        self.backend_stats = open_map("lb_backend_stats")
        self.stats = open_map("lb_stats")
        self.config = open_map("lb_config")
        self.conntrack = open_map("lb_conntrack")
        self.nexthop = open_map("lb_nexthop")
        self._backends_memory: mmap.mmap | None = None

    # ---- reading -------------------------------------------------------------------------
    def _vip_key(self, vip: Vip) -> ctypes.Structure:
        return self.vips.key_type(
            addr=(ctypes.c_uint8 * 16)(*address_bytes(vip.addr)),
            port=vip.port,
            protocol=vip.protocol,
            family=vip.addr.version,
        )

    def lookup_vip(self, vip: Vip) -> ctypes.Structure | None:
        return self.vips.lookup(self._vip_key(vip))

    def _backend_records(self) -> np.ndarray:
        """All of lb_backends as a numpy record array, copied from the map's memory (a
        batch read of its 65,536 entries cost ~20 ms)."""
        if self._backends_memory is None:
            self._backends_memory = self.backends.mmap()
        dtype = np.dtype(self.backends.value_type)
        return np.frombuffer(
            self._backends_memory, dtype=dtype, count=self.backends.max_entries
        ).copy()

    def _service(self, vip: Vip, value: ctypes.Structure, records: np.ndarray) -> Service:
        mine = np.nonzero(records["service"] == value.service)[0]
        backends = [
            Backend(
                int(i),
                _addr(records["addr"][i].tobytes(), int(records["family"][i])),
                int(records["weight"][i]),
            )
            for i in mine
        ]
        return Service(vip, value.service, value.table_size, backends)

    def services(self, with_stats: bool = False) -> list[Service]:
        records = self._backend_records()
        found = []
        for key, value in self.vips.lookup_batch():
            vip = Vip(_addr(bytes(key.addr), key.family), key.port, key.protocol)
            svc = self._service(vip, value, records)
            if with_stats:
                for b in svc.backends:
                    per_cpu = self.backend_stats.lookup(b.id)
                    b.packets = sum(c.packets for c in per_cpu)
                    b.bytes = sum(c.bytes for c in per_cpu)
            found.append(svc)
        return sorted(found, key=lambda s: (s.vip.addr.version, s.vip.addr, s.vip.port))

    def service(self, vip: Vip, field: str = "VIP") -> Service:
        value = self.lookup_vip(vip)
        if value is None:
            raise UserError(field, f"no VIP {vip} (see `membrane lb list`)")
        return self._service(vip, value, self._backend_records())

    def table(self, service_id: int) -> np.ndarray:
        """The service's Maglev table as the datapath reads it (backend ids)."""
        map_id = self.tables.lookup(service_id)
        if map_id is None:
            return np.zeros(0, dtype=np.uint32)
        with map_by_id(
            int.from_bytes(map_id, "little") if isinstance(map_id, bytes) else map_id
        ) as t:
            _, raw = t.lookup_batch_raw(chunk=t.max_entries)
        return np.frombuffer(raw, dtype=np.uint32)

    # ---- changing ------------------------------------------------------------------------
    def add_vip(self, vip: Vip, table_size: int) -> Service:
        if self.lookup_vip(vip) is not None:
            raise UserError("VIP", f"{vip} exists already")
        used = {v.service for _, v in self.vips.lookup_batch()}
        free = next((i for i in range(1, LB_MAX_VIPS) if i not in used), None)
        if free is None:
            raise UserError("VIP", f"this LB holds {LB_MAX_VIPS - 1} VIPs, the most it can")
        svc = Service(vip, free, table_size, [])
        # no table yet (delete_vip removed the id's last one): the datapath drops the
        # VIP's packets as having no backend
        self.vips.update(
            self._vip_key(vip), self.vips.value_type(service=free, table_size=table_size)
        )
        return svc

    def delete_vip(self, vip: Vip) -> None:
        svc = self.service(vip)
        self.vips.delete(self._vip_key(vip))  # from here its traffic passes untouched
        self.tables.delete(svc.id)
        for b in svc.backends:
            self._free_backend(b.id)

    def set_backend(self, vip: Vip, addr: IPAddress, weight: int) -> Backend:
        """Add a backend (or change its weight)."""
        return self.set_backends(vip, [(addr, weight)])[0]

    def set_backends(self, vip: Vip, wanted: list[tuple[IPAddress, int]]) -> list[Backend]:
        """Add backends (or change their weights), then publish one new table."""
        svc = self.service(vip)
        records = self._backend_records()
        free = iter(np.flatnonzero(records["service"][1:] == 0) + 1)
        by_addr = {b.addr: b for b in svc.backends}
        result = []
        for addr, weight in wanted:
            backend = by_addr.get(addr)
            if backend is None:
                backend_id = next(free, None)
                if backend_id is None:
                    raise UserError(
                        "ADDR", f"this LB holds {LB_MAX_BACKENDS - 1} backends, the most it can"
                    )
                backend = by_addr[addr] = Backend(int(backend_id), addr, weight)
                self.backend_stats.update(backend.id, [bytes(16)] * possible_cpus())
                # no next hop cached from the id's previous backend
                self.nexthop.update(backend.id, [bytes(self.nexthop.value_size)] * possible_cpus())
                svc.backends.append(backend)
            backend.weight = weight
            self._write_backend(backend, svc.id)  # first the record, then a table naming it
            result.append(backend)
        self._publish(svc)
        return result

    def remove_backend(self, vip: Vip, addr: IPAddress) -> None:
        svc = self.service(vip)
        gone = [b for b in svc.backends if b.addr == addr]
        if not gone:
            raise UserError("ADDR", f"{addr} is not a backend of {vip}")
        svc.backends = [b for b in svc.backends if b.addr != addr]
        self._publish(svc)  # first a table without it; its flows then re-pick
        self._free_backend(gone[0].id)

    def _write_backend(self, b: Backend, service_id: int) -> None:
        value = self.backends.value_type(
            addr=(ctypes.c_uint8 * 16)(*address_bytes(b.addr)),
            service=service_id,
            weight=b.weight,
            family=b.addr.version,
        )
        self.backends.update(b.id, value)

    def _free_backend(self, backend_id: int) -> None:
        self.backends.update(backend_id, bytes(self.backends.value_size))

    def _publish(self, svc: Service) -> None:
        """Build the service's Maglev table and switch the datapath to it. The kernel
        returns from the switch only once no program still reads the old table (it waits
        for an RCU grace period on map-in-map updates), so what the old table named can be
        freed right after."""
        names = [str(b.addr) for b in svc.backends]
        owners = build_table(names, svc.table_size, [b.weight for b in svc.backends])
        ids = np.array([b.id for b in svc.backends] + [0], dtype=np.uint32)
        entries = ids[owners]  # -1 (no backend) indexes the trailing 0
        with new_table(entries) as table:
            self.tables.update(svc.id, table.fd)

    def set_sources(self, src4: IPAddress | None, src6: IPAddress | None, **meta: int) -> None:
        value = self.config.value_type(**meta)
        if src4 is not None:
            value.src4 = (ctypes.c_uint8 * 4)(*src4.packed)
        if src6 is not None:
            value.src6 = (ctypes.c_uint8 * 16)(*src6.packed)
        self.config.update(0, value)

    def totals(self) -> dict[str, dict[str, int]]:
        from membrane.abi import LbStat

        out = {}
        for stat in LbStat:
            if stat == LbStat.MAX:
                continue
            per_cpu = self.stats.lookup(int(stat))
            out[stat.name.lower().replace("_", "-")] = {
                "packets": sum(c.packets for c in per_cpu),
                "bytes": sum(c.bytes for c in per_cpu),
            }
        return out
