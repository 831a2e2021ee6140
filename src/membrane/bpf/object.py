"""BPF objects and programs: open, configure (load-time constants, sizes, pins), load."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from membrane.bpf import _libbpf as L
from membrane.bpf.btf import Btf
from membrane.bpf.errors import BpfError, LoadError, captured_log
from membrane.bpf.maps import Map

OBJECTS_ENV = "MEMBRANE_BPF_DIR"


def objects_dir() -> Path:
    """Where the built `*.bpf.o` files live (`make bpf` puts them in the package)."""
    override = os.environ.get(OBJECTS_ENV)
    return Path(override) if override else Path(__file__).resolve().parent.parent / "bpfobj"


def object_path(name: str) -> Path:
    """Path of the built object `name` (`filter_xdp` → `.../filter_xdp.bpf.o`)."""
    path = Path(name) if name.endswith(".o") else objects_dir() / f"{name}.bpf.o"
    if not path.exists():
        raise BpfError(f"BPF object {path} is missing: build it with `make bpf`")
    return path


class Program:
    """One program of an object; valid while its object is open."""

    def __init__(self, obj: BpfObject, ptr: int) -> None:
        self.obj = obj
        self._ptr = ptr
        self.name: str = L.lib.bpf_program__name(ptr).decode()
        self.section: str = L.lib.bpf_program__section_name(ptr).decode()

    @property
    def ptr(self) -> int:
        return self._ptr

    @property
    def fd(self) -> int:
        fd = L.lib.bpf_program__fd(self._ptr)
        if fd < 0:
            raise BpfError(f"program {self.name} is not loaded")
        return fd

    @property
    def type(self) -> int:
        return L.lib.bpf_program__type(self._ptr)

    @property
    def autoload(self) -> bool:
        return bool(L.lib.bpf_program__autoload(self._ptr))

    @autoload.setter
    def autoload(self, value: bool) -> None:
        L.lib.bpf_program__set_autoload(self._ptr, value)

    def pin(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ret = L.lib.bpf_obj_pin(self.fd, path.encode())
        if ret:
            raise BpfError(f"pin program {self.name} at {path}", L.errno_of(ret))

    def __repr__(self) -> str:
        return f"Program({self.name!r}, section={self.section!r})"


@dataclass(frozen=True)
class MapDeclaration:
    type: int
    flags: int
    key_size: int
    value_size: int
    key_type: Any
    value_type: Any


class BpfObject:
    """An ELF BPF object. Configure between `open` and `load`; use as a context manager.

    >>> obj = BpfObject.open("filter_xdp")
    >>> obj.set_config(enable_drop_dst=True)
    >>> obj.pin_maps("/sys/fs/bpf/membrane/x")   # reuses maps already pinned there
    >>> obj.load()
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with captured_log() as lines:
            self._h = L.lib.bpf_object__open_file(str(path).encode(), None)
        if not self._h:
            raise LoadError(f"open {path}", ctypes.get_errno(), "".join(lines))
        self.btf = Btf(L.lib.bpf_object__btf(self._h), owned=False)
        self.loaded = False
        self._maps: dict[str, Map] = {}
        # The maps' key and value types as this object declares them, read before load: a
        # map reused from a pin gets the type ids of the object that created it, which
        # mean other types (or nothing) in this object's BTF.
        self._declared_types: dict[str, tuple[int, int]] = {
            name: (L.lib.bpf_map__btf_key_type_id(ptr), L.lib.bpf_map__btf_value_type_id(ptr))
            for name, ptr in self._iter_map_ptrs()
        }
        self.programs: dict[str, Program] = {p.name: p for p in self._iter_programs()}

    @classmethod
    def open(cls, name_or_path: str | Path) -> BpfObject:
        return cls(object_path(str(name_or_path)))

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the object's fds; pinned maps, programs and links stay in the kernel."""
        for m in self._maps.values():
            m.fd = -1  # libbpf owns these fds
        self._maps.clear()
        if self._h:
            L.lib.bpf_object__close(self._h)
            self._h = None

    # ---- iteration -----------------------------------------------------------------------
    def _iter_programs(self) -> Iterator[Program]:
        ptr = L.lib.bpf_object__next_program(self._h, None)
        while ptr:
            yield Program(self, ptr)
            ptr = L.lib.bpf_object__next_program(self._h, ptr)

    def _iter_map_ptrs(self) -> Iterator[tuple[str, int]]:
        ptr = L.lib.bpf_object__next_map(self._h, None)
        while ptr:
            yield L.lib.bpf_map__name(ptr).decode(), ptr
            ptr = L.lib.bpf_object__next_map(self._h, ptr)

    def _map_ptr(self, name: str) -> int:
        ptr = L.lib.bpf_object__find_map_by_name(self._h, name.encode())
        if not ptr:
            raise KeyError(f"{self.path.name} has no map {name!r}")
        return ptr

    def program(self, name: str) -> Program:
        try:
            return self.programs[name]
        except KeyError:
            raise KeyError(f"{self.path.name} has no program {name!r}") from None

    # ---- configuration before load -------------------------------------------------------
    def _internal_map(self, section: str) -> int:
        for name, ptr in self._iter_map_ptrs():
            if L.lib.bpf_map__is_internal(ptr) and name.endswith(section):
                return ptr
        raise KeyError(f"{self.path.name} has no {section} section")

    def config_names(self) -> list[str]:
        return sorted(self.btf.datasec_vars(".rodata"))

    def set_config(self, **values: Any) -> None:
        """Set `const volatile` globals by name; the verifier then sees them as constants."""
        if self.loaded:
            raise BpfError("load-time constants can only be set before load()")
        ptr = self._internal_map(".rodata")
        size = ctypes.c_size_t()
        base = L.lib.bpf_map__initial_value(ptr, ctypes.byref(size))
        variables = self.btf.datasec_vars(".rodata")
        for name, value in values.items():
            if name not in variables:
                raise KeyError(
                    f"{self.path.name} has no load-time constant {name!r} "
                    f"(it has: {', '.join(sorted(variables)) or 'none'})"
                )
            info = variables[name]
            ctype = self.btf.ctype(self.btf.type(info.type_id).size_or_type)
            raw = (
                bytes(value)
                if isinstance(value, bytes | ctypes.Structure | ctypes.Array)
                else bytes(ctype(value))
            )
            if len(raw) != info.size:
                raise ValueError(f"{name}: {len(raw)} bytes given, the variable has {info.size}")
            ctypes.memmove(base + info.offset, raw, info.size)

    def get_config(self, name: str) -> Any:
        ptr = self._internal_map(".rodata")
        size = ctypes.c_size_t()
        base = L.lib.bpf_map__initial_value(ptr, ctypes.byref(size))
        info = self.btf.datasec_var(".rodata", name)
        ctype = self.btf.ctype(self.btf.type(info.type_id).size_or_type)
        obj = ctype.from_buffer_copy(ctypes.string_at(base + info.offset, info.size))
        return obj.value if isinstance(obj, ctypes._SimpleCData) else obj

    def set_max_entries(self, map_name: str, entries: int) -> None:
        ret = L.lib.bpf_map__set_max_entries(self._map_ptr(map_name), entries)
        if ret:
            raise BpfError(f"set max_entries of {map_name}", L.errno_of(ret))

    def set_autocreate(self, map_name: str, create: bool) -> None:
        """Whether load() creates this map (an object loaded only for some of its maps)."""
        ret = L.lib.bpf_map__set_autocreate(self._map_ptr(map_name), create)
        if ret:
            raise BpfError(f"set autocreate of {map_name}", L.errno_of(ret))

    def map_declaration(self, name: str) -> MapDeclaration:
        """The map as the object declares it (before load: what load would create)."""
        ptr = self._map_ptr(name)
        key_id, value_id = self._declared_types[name]
        return MapDeclaration(
            type=L.lib.bpf_map__type(ptr),
            flags=L.lib.bpf_map__map_flags(ptr),
            key_size=L.lib.bpf_map__key_size(ptr),
            value_size=L.lib.bpf_map__value_size(ptr),
            key_type=self.btf.ctype(key_id) if key_id else None,
            value_type=self.btf.ctype(value_id) if value_id else None,
        )

    def pin_maps(self, directory: str, names: list[str] | None = None) -> None:
        """Pin maps under `directory` at load; maps already pinned there are reused, so a
        reloaded program keeps its state."""
        os.makedirs(directory, exist_ok=True)
        for name, ptr in self._iter_map_ptrs():
            if L.lib.bpf_map__is_internal(ptr) or (names is not None and name not in names):
                continue
            self.pin_map(name, os.path.join(directory, name))

    def pin_map(self, name: str, path: str) -> None:
        """Pin one map at an explicit path (for maps shared between objects)."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ret = L.lib.bpf_map__set_pin_path(self._map_ptr(name), path.encode())
        if ret:
            raise BpfError(f"set pin path of {name}", L.errno_of(ret))

    def load(self) -> BpfObject:
        with captured_log() as lines:
            ret = L.lib.bpf_object__load(self._h)
        if ret:
            raise LoadError(f"load {self.path.name}", L.errno_of(ret), "".join(lines))
        self.loaded = True
        return self

    # ---- after load ------------------------------------------------------------------------
    def map(self, name: str) -> Map:
        if name not in self._maps:
            if not self.loaded:
                raise BpfError(f"map {name}: object is not loaded")
            ptr = self._map_ptr(name)
            fd = L.lib.bpf_map__fd(ptr)
            key_id, value_id = self._declared_types[name]
            self._maps[name] = Map(
                fd,
                name=name,
                key_type=self.btf.ctype(key_id) if key_id else None,
                value_type=self.btf.ctype(value_id) if value_id else None,
            )
        return self._maps[name]

    def map_names(self) -> list[str]:
        return [n for n, p in self._iter_map_ptrs() if not L.lib.bpf_map__is_internal(p)]
