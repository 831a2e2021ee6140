"""A new build of the endpoint datapath meeting the node maps an older build left pinned.

Programs are the agent's business at adoption (membrane.agent.endpoints): a program whose
tag differs from the build's, or that still uses a node map no longer pinned, gets the new
program swapped in (bpf_link_update, or the same clsact slot).

Maps are this module's. A pinned node map whose layout changed (map type or flags, key or
value size, or the BTF layout of its key or value struct) cannot be reused by the new
object. `NodeMapMigration.start` creates it anew from the new object, copies every entry
field by field, matched by name (new fields start at zero, dropped ones stay behind), and
pins it in the old one's place, before any program is swapped. The old map lives on,
pinned under <pin_dir>/upgrade/<name>-old, for the old programs still attached; once every
endpoint runs the new programs, `finish` copies what they added meanwhile (connections
opened during the swap: entries the new map lacks) and lets the old map go. So established
connections keep their conntrack entries and policy is enforced throughout.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as E
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

from membrane.bpf import BpfError, BpfObject, Map
from membrane.bpf import _libbpf as L
from membrane.bpf.maps import RINGBUF
from membrane.datapath.abi import ENDPOINT_OBJECT, NODE_MAPS
from membrane.datapath.nodemaps import pinned_map_infos, pinned_sizes
from membrane.datapath.service_nat import skip_service_maps

log = logging.getLogger(__name__)

STAGING = "upgrade"  # under the pin directory (bpffs names cannot hold dots)
_OLD = "-old"


def layout(ctype: Any) -> Any:
    """What decides how bytes are read: field names, offsets, sizes and kinds, recursively
    (a struct's own name and its padding do not matter)."""
    if ctype is None:
        return None
    if issubclass(ctype, ctypes.Structure | ctypes.Union):
        return (
            ctypes.sizeof(ctype),
            tuple(
                (name, getattr(ctype, name).offset, layout(ftype))
                for name, ftype, *_ in ctype._fields_
                if not name.startswith("_pad")
            ),
        )
    if issubclass(ctype, ctypes.Array):
        return (ctype._length_, layout(ctype._type_))
    return (ctypes.sizeof(ctype), getattr(ctype, "_type_", None))


@dataclass(frozen=True)
class MapLayout:
    type: int
    flags: int
    key_size: int
    value_size: int
    key: Any
    value: Any


def _pinned_layout(path: str) -> MapLayout:
    with Map.from_pin(path) as m:
        return MapLayout(
            m.type, m.flags, m.key_size, m.value_size, layout(m.key_type), layout(m.value_type)
        )


def _object_layouts(obj: BpfObject) -> dict[str, MapLayout]:
    out = {}
    for name in NODE_MAPS:
        d = obj.map_declaration(name)
        out[name] = MapLayout(
            d.type, d.flags, d.key_size, d.value_size, layout(d.key_type), layout(d.value_type)
        )
    return out


def _differs(have: MapLayout, want: MapLayout) -> bool:
    sizes = (have.type, have.flags, have.key_size, have.value_size)
    if sizes != (want.type, want.flags, want.key_size, want.value_size):
        return True
    pairs = ((have.key, want.key), (have.value, want.value))
    return any(h is not None and w is not None and h != w for h, w in pairs)


def changed_node_maps(pin_dir: str) -> list[str]:
    """Node maps pinned under `pin_dir` whose layout the endpoint object (as built now)
    declares differently. A side without BTF types compares by sizes alone."""
    with BpfObject.open(ENDPOINT_OBJECT) as obj:
        wanted = _object_layouts(obj)
    return [
        name
        for name in NODE_MAPS
        if os.path.exists(os.path.join(pin_dir, name))
        and _differs(_pinned_layout(os.path.join(pin_dir, name)), wanted[name])
    ]


# ---- copying entries between layouts -----------------------------------------------------
def translate(value: Any, ctype: Any) -> Any:
    """`value` (read with the old layout) as a `ctype` (the new one): fields by name,
    array elements by index, scalars as they are; what the new layout adds is zero."""
    if issubclass(ctype, ctypes.Structure | ctypes.Union):
        new = ctype()
        old_fields = {name for name, *_ in getattr(type(value), "_fields_", ())}
        for name, ftype, *_ in ctype._fields_:
            if name in old_fields and not name.startswith("_pad"):
                setattr(new, name, translate(getattr(value, name), ftype))
        return new
    if issubclass(ctype, ctypes.Array):
        new = ctype()
        if isinstance(value, ctypes.Array):
            for i in range(min(len(value), len(new))):
                new[i] = translate(value[i], ctype._type_)
        return new
    if isinstance(value, ctypes.Structure | ctypes.Union | ctypes.Array):
        return ctype()  # a scalar that used to be a record: nothing to carry
    return value


def _convert(value: Any, ctype: Any, size: int) -> Any:
    """An entry's key or value for the new map; without BTF types, its bytes cut or
    zero-padded to the new size."""
    if ctype is not None and not isinstance(value, bytes):
        return translate(value, ctype)
    raw = value if isinstance(value, bytes) else bytes(value)
    raw = (raw + bytes(size))[:size]
    return raw if ctype is None else ctype.from_buffer_copy(raw)


def _pairs(src: Map, dst: Map) -> list[tuple[Any, Any]]:
    pairs = []
    for key, value in src.lookup_batch():
        new_key = _convert(key, dst.key_type, dst.key_size)
        if src.percpu:
            new_value: Any = [_convert(v, dst.value_type, dst.value_size) for v in value]
        else:
            new_value = _convert(value, dst.value_type, dst.value_size)
        pairs.append((new_key, new_value))
    return pairs


def copy_entries(src: Map, dst: Map, only_missing: bool = False) -> int:
    """Copy every entry of `src` into `dst`, translated to `dst`'s layout; with
    `only_missing`, entries `dst` already has are left as they are. Returns how many
    were written. Ring buffers carry nothing."""
    if RINGBUF in (src.type, dst.type):
        return 0
    pairs = _pairs(src, dst)
    if not only_missing:
        return dst.update_batch(pairs)
    written = 0
    for key, value in pairs:
        try:
            dst.update(key, value, L.BPF_NOEXIST)
            written += 1
        except BpfError as err:
            if err.errno != E.EEXIST:
                raise
    return written


# ---- the migration -------------------------------------------------------------------------
@dataclass
class NodeMapMigration:
    """Node maps re-created for a new layout; the old ones kept until `finish`."""

    pin_dir: str
    retired: dict[str, Map] = field(default_factory=dict)

    @property
    def staging(self) -> str:
        return os.path.join(self.pin_dir, STAGING)

    @classmethod
    def start(cls, pin_dir: str) -> NodeMapMigration:
        """Migrate every node map under `pin_dir` whose layout changed (none: nothing
        happens). Run it before the node maps are opened and the programs adopted."""
        migration = cls(pin_dir)
        migration._recover()
        changed = changed_node_maps(pin_dir) if os.path.isdir(pin_dir) else []
        if changed:
            migration._migrate(changed)
        return migration

    def _recover(self) -> None:
        """What an agent that died during a migration left: a new map not pinned in place
        yet is dropped (made again), an old map whose place was taken gives its entries
        the new map lacks and goes (programs still using it are swapped at adoption)."""
        if not os.path.isdir(self.staging):
            return
        for entry in sorted(os.listdir(self.staging)):
            path = os.path.join(self.staging, entry)
            name = entry.removesuffix(_OLD)
            live = os.path.join(self.pin_dir, name)
            if entry.endswith(_OLD) and not os.path.exists(live):
                os.rename(path, live)
            elif entry.endswith(_OLD):
                with Map.from_pin(path) as old, Map.from_pin(live) as new:
                    copy_entries(old, new, only_missing=True)
                os.unlink(path)
            else:
                os.unlink(path)
        shutil.rmtree(self.staging, ignore_errors=True)

    def _migrate(self, names: list[str]) -> None:
        os.makedirs(self.staging, exist_ok=True)
        sizes = pinned_sizes(self.pin_dir)
        with BpfObject.open(ENDPOINT_OBJECT) as obj:
            for prog in obj.programs.values():
                prog.autoload = False
            skip_service_maps(obj)
            for name in NODE_MAPS:
                if name in names:
                    obj.set_max_entries(name, sizes[name])
                    obj.pin_map(name, os.path.join(self.staging, name))
                else:
                    obj.set_autocreate(name, False)  # the pinned one stays
            obj.load()
        for name in names:
            live = os.path.join(self.pin_dir, name)
            new_path = os.path.join(self.staging, name)
            old = Map.from_pin(live, name=name)
            with Map.from_pin(new_path, name=name) as new:
                copied = copy_entries(old, new)
            # The old pin steps aside and the new map takes its place: from here on the
            # agent and every program loaded later use the new one.
            os.rename(live, os.path.join(self.staging, name + _OLD))
            os.rename(new_path, live)
            self.retired[name] = old
            log.info(
                "node map migrated to a new layout",
                extra={"fields": {"map": name, "entries": copied}},
            )

    def finish(self) -> None:
        """Every endpoint runs the new programs: carry over what the old ones added since
        the copy, and let the old maps go."""
        for name, old in self.retired.items():
            with old, Map.from_pin(os.path.join(self.pin_dir, name), name=name) as new:
                copy_entries(old, new, only_missing=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.staging, name + _OLD))
        self.retired.clear()
        shutil.rmtree(self.staging, ignore_errors=True)


def pinned_map_ids(pin_dir: str) -> dict[str, int]:
    """name -> id of the node maps pinned under `pin_dir`."""
    return {name: info.id for name, info in pinned_map_infos(pin_dir).items()}
