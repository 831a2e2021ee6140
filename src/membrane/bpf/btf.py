"""BTF reader: types of a BPF object (or of the kernel) as ctypes and numpy types.

The C headers in `bpf/abi/` are the single source of the structs shared with Python; clang
puts them into each object's BTF, and this module turns them into Python types, so the two
sides cannot drift.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from membrane.bpf import _libbpf as L
from membrane.bpf.errors import BpfError

INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_MODIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}
_INT_SIGNED, _INT_CHAR, _INT_BOOL = 1, 2, 4
ABI_ENUM_PREFIX = "__abi_enum_"  # ABI_EXPORT_ENUM(tag) declares `enum tag *__abi_enum_tag`


@dataclass(frozen=True)
class BtfType:
    id: int
    kind: int
    name: str
    vlen: int
    kflag: bool
    size_or_type: int  # size for sized kinds, referenced type id for the others


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int


@dataclass(frozen=True)
class SecInfo:
    type_id: int
    offset: int
    size: int


class Btf:
    """A parsed BTF blob. Owns the libbpf handle when created from a file or the kernel."""

    def __init__(self, handle: int, owned: bool) -> None:
        if not handle:
            raise BpfError("no BTF available", ctypes.get_errno())
        self._h = handle
        self._owned = owned
        # Held here: a Btf cached in a module is freed at interpreter exit, when the
        # modules' globals (L among them) may already be gone.
        self._free = L.lib.btf__free
        self._ctypes: dict[int, Any] = {}

    @classmethod
    def from_file(cls, path: str | Path) -> Btf:
        return cls(L.lib.btf__parse(str(path).encode(), None), owned=True)

    @classmethod
    def from_kernel_id(cls, btf_id: int) -> Btf:
        return cls(L.lib.btf__load_from_kernel_by_id(btf_id), owned=True)

    def close(self) -> None:
        if self._owned and self._h:
            self._free(self._h)
        self._h = 0

    def __del__(self) -> None:
        self.close()

    # ---- raw access -------------------------------------------------------------------
    def type(self, type_id: int) -> BtfType:
        ptr = L.lib.btf__type_by_id(self._h, type_id)
        if not ptr:
            raise BpfError(f"BTF type id {type_id} does not exist")
        raw = L.BtfType.from_address(ptr)
        name = L.lib.btf__name_by_offset(self._h, raw.name_off) or b""
        return BtfType(
            id=type_id,
            kind=(raw.info >> 24) & 0x1F,
            name=name.decode(),
            vlen=raw.info & 0xFFFF,
            kflag=bool(raw.info >> 31),
            size_or_type=raw.size_or_type,
        )

    def _trailing(self, type_id: int, count: int) -> ctypes.Array:
        ptr = L.lib.btf__type_by_id(self._h, type_id)
        return (ctypes.c_uint32 * count).from_address(ptr + ctypes.sizeof(L.BtfType))

    def members(self, type_id: int) -> list[Member]:
        t = self.type(type_id)
        words = self._trailing(type_id, 3 * t.vlen)
        out = []
        for i in range(t.vlen):
            name_off, mtype, offset = words[3 * i : 3 * i + 3]
            name = (L.lib.btf__name_by_offset(self._h, name_off) or b"").decode()
            bits, size = (offset & 0xFFFFFF, offset >> 24) if t.kflag else (offset, 0)
            out.append(Member(name, mtype, bits, size))
        return out

    def secinfos(self, type_id: int) -> list[SecInfo]:
        t = self.type(type_id)
        words = self._trailing(type_id, 3 * t.vlen)
        return [SecInfo(*words[3 * i : 3 * i + 3]) for i in range(t.vlen)]

    def array(self, type_id: int) -> tuple[int, int]:
        """(element type id, number of elements) of an ARRAY type."""
        elem, _index, nelems = self._trailing(type_id, 3)
        return elem, nelems

    def find(self, name: str, kind: int) -> int:
        type_id = L.lib.btf__find_by_name_kind(self._h, name.encode(), kind)
        if type_id < 0:
            raise KeyError(name)
        return type_id

    def resolve(self, type_id: int) -> BtfType:
        """Skip typedefs and qualifiers."""
        t = self.type(type_id)
        while t.kind in _MODIFIERS:
            t = self.type(t.size_or_type)
        return t

    def size(self, type_id: int) -> int:
        size = L.lib.btf__resolve_size(self._h, type_id)
        if size < 0:
            raise BpfError(f"cannot size BTF type {type_id}", -size)
        return size

    def datasec_var(self, section: str, variable: str) -> SecInfo:
        """Where `variable` lives inside a data section such as `.rodata`."""
        sec_id = self.find(section, DATASEC)
        for info in self.secinfos(sec_id):
            if self.type(info.type_id).name == variable:
                return info
        raise KeyError(f"{variable} is not in {section}")

    def enum(self, name: str) -> dict[str, int]:
        """Enumerators of `enum name`. A 32-bit enum's values are read as C ints: clang 14
        records no signedness, and ABI enums fit a signed 32-bit int (bpf/abi/export.h)."""
        try:
            type_id = self.find(name, ENUM)
        except KeyError:
            type_id = self.find(name, ENUM64)
        return self._enumerators(type_id)

    def _enumerators(self, type_id: int) -> dict[str, int]:
        t = self.type(type_id)
        names: list[int] = []
        values: list[int] = []
        if t.kind == ENUM:
            words = self._trailing(type_id, 2 * t.vlen)
            names, values = list(words[0::2]), [_int32(v) for v in words[1::2]]
        elif t.kind == ENUM64:
            words = self._trailing(type_id, 3 * t.vlen)
            names = list(words[0::3])
            values = [lo | hi << 32 for lo, hi in zip(words[1::3], words[2::3], strict=True)]
            if t.kflag:
                values = [v - (1 << 64) if v >= 1 << 63 else v for v in values]
        else:
            raise BpfError(f"BTF type {t.name or t.id} is not an enum")
        return {
            (L.lib.btf__name_by_offset(self._h, n) or b"").decode(): v
            for n, v in zip(names, values, strict=True)
        }

    def exported_enums(self) -> dict[str, dict[str, int]]:
        """tag -> enumerators of every enum the object exports with ABI_EXPORT_ENUM
        (bpf/abi/export.h): each is the target of a global `__abi_enum_<tag>` pointer."""
        out = {}
        for var, info in self.datasec_vars(".bss").items():
            if var.startswith(ABI_ENUM_PREFIX):
                pointer = self.type(self.type(info.type_id).size_or_type)
                enum = self.resolve(pointer.size_or_type)
                out[enum.name] = self._enumerators(enum.id)
        return out

    def datasec_vars(self, section: str) -> dict[str, SecInfo]:
        try:
            sec_id = self.find(section, DATASEC)
        except KeyError:
            return {}
        return {self.type(i.type_id).name: i for i in self.secinfos(sec_id)}

    # ---- Python types -----------------------------------------------------------------
    def ctype(self, type_id: int) -> Any:
        """The ctypes type equal in size and layout to a BTF type."""
        if type_id not in self._ctypes:
            self._ctypes[type_id] = self._build_ctype(type_id)
        return self._ctypes[type_id]

    def struct(self, name: str) -> Any:
        """A ctypes.Structure generated from the struct `name`."""
        return self.ctype(self.find(name, STRUCT))

    def _build_ctype(self, type_id: int) -> Any:
        t = self.resolve(type_id)
        if t.kind == INT:
            encoding = self._trailing(t.id, 1)[0] >> 24
            if encoding & _INT_BOOL:
                return ctypes.c_bool
            if (encoding & _INT_CHAR or t.name == "char") and t.size_or_type == 1:
                return ctypes.c_char
            signed = bool(encoding & _INT_SIGNED)
            return _INT_CTYPES[(t.size_or_type, signed)]
        if t.kind in (ENUM, ENUM64):
            return _INT_CTYPES[(t.size_or_type, False)]
        if t.kind == PTR:
            return ctypes.c_uint64
        if t.kind == FLOAT:
            return ctypes.c_float if t.size_or_type == 4 else ctypes.c_double
        if t.kind == ARRAY:
            elem, n = self.array(t.id)
            return self.ctype(elem) * n
        if t.kind in (STRUCT, UNION):
            return self._build_record(t)
        raise BpfError(f"BTF kind {t.kind} of type {t.name or t.id} has no Python equivalent")

    def _build_record(self, t: BtfType) -> Any:
        fields: list[tuple[str, Any]] = []
        anonymous: list[str] = []
        cursor = 0
        for index, m in enumerate(self.members(t.id)):
            if m.bitfield_size or m.bit_offset % 8:
                raise BpfError(f"{t.name}.{m.name}: bitfields are not allowed in ABI structs")
            offset = m.bit_offset // 8
            if t.kind == STRUCT and offset > cursor:
                fields.append((f"_pad{cursor}", ctypes.c_uint8 * (offset - cursor)))
            name = m.name or f"_anon{index}"
            if not m.name:
                anonymous.append(name)
            ctype = self.ctype(m.type_id)
            fields.append((name, ctype))
            cursor = offset + ctypes.sizeof(ctype) if t.kind == STRUCT else 0
        if t.kind == STRUCT and t.size_or_type > cursor:
            fields.append((f"_pad{cursor}", ctypes.c_uint8 * (t.size_or_type - cursor)))
        base = ctypes.Structure if t.kind == STRUCT else ctypes.Union
        attrs: dict[str, Any] = {"_pack_": 1, "_fields_": fields}
        if anonymous:
            attrs["_anonymous_"] = anonymous
        cls = type(t.name or f"anon_{t.id}", (base,), attrs)
        if ctypes.sizeof(cls) != t.size_or_type:
            raise BpfError(
                f"struct {t.name}: built {ctypes.sizeof(cls)} bytes, BTF says {t.size_or_type}"
            )
        return cls

    def dtype(self, name: str) -> np.dtype:
        """A numpy structured dtype for struct `name` (for bulk decoding of events)."""
        return ctype_dtype(self.struct(name))


_INT_CTYPES = {
    (1, False): ctypes.c_uint8,
    (1, True): ctypes.c_int8,
    (2, False): ctypes.c_uint16,
    (2, True): ctypes.c_int16,
    (4, False): ctypes.c_uint32,
    (4, True): ctypes.c_int32,
    (8, False): ctypes.c_uint64,
    (8, True): ctypes.c_int64,
    (16, False): ctypes.c_uint8 * 16,
    (16, True): ctypes.c_uint8 * 16,
}


def _int32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


def ctype_dtype(ctype: Any) -> np.dtype:
    """The numpy structured dtype laid out like a ctypes type (padding left out)."""
    if isinstance(ctype, type) and issubclass(ctype, ctypes.Structure | ctypes.Union):
        names, formats, offsets = [], [], []
        for fname, ftype in ctype._fields_:
            if fname.startswith("_pad"):
                continue
            field = getattr(ctype, fname)
            sub = ctype_dtype(ftype)
            if fname in getattr(ctype, "_anonymous_", ()) and sub.names:
                for sname in sub.names:
                    sdt, soff = sub.fields[sname][:2]
                    names.append(sname)
                    formats.append(sdt)
                    offsets.append(field.offset + soff)
                continue
            names.append(fname)
            formats.append(sub)
            offsets.append(field.offset)
        return np.dtype(
            {
                "names": names,
                "formats": formats,
                "offsets": offsets,
                "itemsize": ctypes.sizeof(ctype),
            }
        )
    if isinstance(ctype, type) and issubclass(ctype, ctypes.Array):
        if ctype._type_ is ctypes.c_char:
            return np.dtype(f"S{ctype._length_}")
        return np.dtype((ctype_dtype(ctype._type_), (ctype._length_,)))
    return np.dtype(ctype)


@cache
def kernel_btf() -> Btf:
    """The running kernel's BTF (for CO-RE-aware checks and the feature probe)."""
    return Btf(L.lib.btf__load_vmlinux_btf(), owned=True)
