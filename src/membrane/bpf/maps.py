"""BPF maps as Python objects: typed lookup/update/delete/iterate, batches, per-CPU values, pins.

Key and value types come from the map's BTF when it has one (maps declared with `__type`),
so callers read and write the same structs the C code uses.
"""

from __future__ import annotations

import ctypes
import errno as E
import mmap
import os
from collections.abc import Iterable, Iterator
from functools import cache
from typing import Any

from membrane.bpf import _libbpf as L
from membrane.bpf.btf import Btf
from membrane.bpf.errors import BpfError

HASH, ARRAY, PROG_ARRAY, PERF_EVENT_ARRAY, PERCPU_HASH, PERCPU_ARRAY = 1, 2, 3, 4, 5, 6
STACK_TRACE, LRU_HASH, LRU_PERCPU_HASH, LPM_TRIE, RINGBUF = 7, 9, 10, 11, 27
PERCPU_TYPES = {PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH, 21}  # 21: percpu cgroup storage
F_MMAPABLE = 1 << 10
_NO_BATCH = {E.EINVAL, E.ENOTSUP, E.EOPNOTSUPP, E.ENOSYS}


class MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


@cache
def possible_cpus() -> int:
    n = L.lib.libbpf_num_possible_cpus()
    if n <= 0:
        raise BpfError("cannot count possible CPUs", -n)
    return n


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    ret = L.lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
    if ret:
        raise BpfError("bpf_obj_get_info_by_fd(map)", L.errno_of(ret))
    return info


def map_name(map_id: int) -> str | None:
    """The name of the map with this id (as the kernel keeps it, 15 characters), or None
    when it is gone."""
    fd = L.lib.bpf_map_get_fd_by_id(map_id)
    if fd < 0:
        return None
    try:
        return map_info(fd).name.decode()
    finally:
        os.close(fd)


def obj_get(path: str) -> int:
    """Open a pinned BPF object; raises FileNotFoundError when nothing is pinned there."""
    fd = L.lib.bpf_obj_get(path.encode())
    if fd < 0:
        err = L.errno_of(fd)
        if err == E.ENOENT:
            raise FileNotFoundError(path)
        raise BpfError(f"open pinned object {path}", err)
    return fd


class Map:
    """A BPF map by file descriptor. Owns the fd when it opened it itself."""

    def __init__(
        self,
        fd: int,
        *,
        name: str | None = None,
        key_type: Any = None,
        value_type: Any = None,
        owns_fd: bool = False,
        btf: Btf | None = None,
    ) -> None:
        info = map_info(fd)
        self.fd = fd
        self.id = info.id
        self.name = name or info.name.decode()
        self.type = info.type
        self.key_size = info.key_size
        self.value_size = info.value_size
        self.max_entries = info.max_entries
        self.flags = info.map_flags
        self.percpu = info.type in PERCPU_TYPES
        self._owns_fd = owns_fd
        if (key_type is None or value_type is None) and info.btf_id:
            btf = btf or Btf.from_kernel_id(info.btf_id)
            if key_type is None and info.btf_key_type_id:
                key_type = btf.ctype(info.btf_key_type_id)
            if value_type is None and info.btf_value_type_id:
                value_type = btf.ctype(info.btf_value_type_id)
        self.key_type = key_type
        self.value_type = value_type
        self._stride = (self.value_size + 7) // 8 * 8
        self._value_buf_size = self._stride * possible_cpus() if self.percpu else self.value_size

    @classmethod
    def from_pin(cls, path: str, **kw: Any) -> Map:
        return cls(obj_get(path), owns_fd=True, **kw)

    def close(self) -> None:
        if self._owns_fd and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Map:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Map({self.name!r}, type={self.type}, max_entries={self.max_entries})"

    # ---- conversions --------------------------------------------------------------------
    def _raw(self, obj: Any, size: int, what: str) -> bytes:
        """`obj` (bytes, a ctypes value or an int) as exactly `size` bytes."""
        if isinstance(obj, bytes):
            raw = obj
        elif isinstance(
            obj,
            bytearray
            | memoryview
            | ctypes.Structure
            | ctypes.Union
            | ctypes.Array
            | ctypes._SimpleCData,
        ):
            raw = bytes(obj)
        elif isinstance(obj, int):
            raw = obj.to_bytes(size, "little", signed=obj < 0)
        else:
            raise TypeError(f"{self.name}: cannot use {type(obj).__name__} as map {what}")
        if len(raw) != size:
            raise ValueError(f"{self.name}: {what} is {len(raw)} bytes, map wants {size}")
        return raw

    def _raw_value(self, value: Any) -> bytes:
        if not self.percpu:
            return self._raw(value, self.value_size, "value")
        values = value if isinstance(value, list | tuple) else [value] * possible_cpus()
        if len(values) != possible_cpus():
            raise ValueError(f"{self.name}: need one value per possible CPU ({possible_cpus()})")
        pad = bytes(self._stride - self.value_size)
        return b"".join(self._raw(v, self.value_size, "value") + pad for v in values)

    def _encode(self, obj: Any, size: int, what: str) -> ctypes.Array:
        return ctypes.create_string_buffer(self._raw(obj, size, what), size)

    def _encode_value(self, value: Any) -> ctypes.Array:
        return ctypes.create_string_buffer(self._raw_value(value), self._value_buf_size)

    @staticmethod
    def _decode(raw: bytes, ctype: Any) -> Any:
        if ctype is None:
            return raw
        obj = ctype.from_buffer_copy(raw)
        return obj.value if isinstance(obj, ctypes._SimpleCData) else obj

    def _decode_key(self, raw: bytes) -> Any:
        return self._decode(raw, self.key_type)

    def _decode_value(self, raw: bytes) -> Any:
        if not self.percpu:
            return self._decode(raw[: self.value_size], self.value_type)
        return [
            self._decode(
                raw[i * self._stride : i * self._stride + self.value_size], self.value_type
            )
            for i in range(possible_cpus())
        ]

    # ---- element operations -------------------------------------------------------------
    def lookup(self, key: Any) -> Any:
        """The value for `key` (a list per CPU for per-CPU maps), or None when absent."""
        k = self._encode(key, self.key_size, "key")
        v = ctypes.create_string_buffer(self._value_buf_size)
        ret = L.lib.bpf_map_lookup_elem(self.fd, k, v)
        if ret:
            err = L.errno_of(ret)
            if err == E.ENOENT:
                return None
            raise BpfError(f"lookup in map {self.name}", err)
        return self._decode_value(v.raw)

    def update(self, key: Any, value: Any, flags: int = L.BPF_ANY) -> None:
        k = self._encode(key, self.key_size, "key")
        v = self._encode_value(value)
        ret = L.lib.bpf_map_update_elem(self.fd, k, v, flags)
        if ret:
            raise BpfError(f"update of map {self.name}", L.errno_of(ret))

    def delete(self, key: Any) -> bool:
        """Delete `key`; False when it was not there."""
        k = self._encode(key, self.key_size, "key")
        ret = L.lib.bpf_map_delete_elem(self.fd, k)
        if ret:
            err = L.errno_of(ret)
            if err == E.ENOENT:
                return False
            raise BpfError(f"delete from map {self.name}", err)
        return True

    def _raw_keys(self) -> Iterator[bytes]:
        prev = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while True:
            ret = L.lib.bpf_map_get_next_key(self.fd, prev, nxt)
            if ret:
                err = L.errno_of(ret)
                if err == E.ENOENT:
                    return
                raise BpfError(f"iterate map {self.name}", err)
            raw = nxt.raw
            yield raw
            prev = ctypes.create_string_buffer(raw, self.key_size)

    def keys(self) -> Iterator[Any]:
        for raw in self._raw_keys():
            yield self._decode_key(raw)

    def items(self) -> Iterator[tuple[Any, Any]]:
        """Iterate (key, value); entries deleted meanwhile are skipped."""
        v = ctypes.create_string_buffer(self._value_buf_size)
        for raw in list(self._raw_keys()):
            k = ctypes.create_string_buffer(raw, self.key_size)
            if L.lib.bpf_map_lookup_elem(self.fd, k, v) == 0:
                yield self._decode_key(raw), self._decode_value(v.raw)

    def __iter__(self) -> Iterator[Any]:
        return self.keys()

    def __len__(self) -> int:
        return sum(1 for _ in self._raw_keys())

    # ---- batches ------------------------------------------------------------------------
    def update_batch(self, pairs: Iterable[tuple[Any, Any]], flags: int = L.BPF_ANY) -> int:
        """Write many entries in one syscall (element by element where the map type lacks
        batch support). Returns the number written."""
        pairs = list(pairs)
        if not pairs:
            return 0
        keys = b"".join(self._raw(k, self.key_size, "key") for k, _ in pairs)
        vals = b"".join(self._raw_value(v) for _, v in pairs)
        return self.update_batch_raw(keys, vals, flags)

    def update_batch_raw(self, keys: bytes, values: bytes, flags: int = L.BPF_ANY) -> int:
        """`update_batch` of keys and values already laid out as the map stores them,
        back to back (for callers that encode thousands at once)."""
        n = len(keys) // self.key_size
        if len(keys) != n * self.key_size or len(values) != n * self._value_buf_size:
            raise ValueError(f"{self.name}: {n} keys need {n * self._value_buf_size} value bytes")
        if not n:
            return 0
        count = ctypes.c_uint32(n)
        opts = L.MapBatchOpts(sz=ctypes.sizeof(L.MapBatchOpts), elem_flags=flags)
        ret = L.lib.bpf_map_update_batch(
            self.fd, keys, values, ctypes.byref(count), ctypes.byref(opts)
        )
        if ret == 0:
            return n
        err = L.errno_of(ret)
        if err not in _NO_BATCH or count.value:
            raise BpfError(f"batch update of map {self.name}", err)
        size, vsize = self.key_size, self._value_buf_size
        for i in range(n):
            key, value = keys[i * size : (i + 1) * size], values[i * vsize : (i + 1) * vsize]
            ret = L.lib.bpf_map_update_elem(self.fd, key, value, flags)
            if ret:
                raise BpfError(f"update of map {self.name}", L.errno_of(ret))
        return n

    def delete_batch(self, keys: Iterable[Any]) -> int:
        """Delete many keys; returns how many existed."""
        return self.delete_batch_raw(b"".join(self._raw(k, self.key_size, "key") for k in keys))

    def delete_batch_raw(self, keys: bytes) -> int:
        """`delete_batch` of keys laid out as the map stores them; returns how many
        existed. One syscall for all of them where the map type has batch operations (the
        kernel stops at a missing key: the rest go again after it)."""
        size = self.key_size
        if len(keys) % size:
            raise ValueError(f"{self.name}: keys are not a multiple of {size} bytes")
        deleted, start, n = 0, 0, len(keys) // size
        opts = L.MapBatchOpts(sz=ctypes.sizeof(L.MapBatchOpts))
        while start < n:
            count = ctypes.c_uint32(n - start)
            ret = L.lib.bpf_map_delete_batch(
                self.fd, keys[start * size :], ctypes.byref(count), ctypes.byref(opts)
            )
            deleted += count.value
            start += count.value
            if ret == 0:
                break
            err = L.errno_of(ret)
            if err == E.ENOENT:
                start += 1  # the key at `start` was not there
                continue
            if err in _NO_BATCH and not count.value:
                return deleted + sum(
                    1 for i in range(start, n) if self.delete(keys[i * size : (i + 1) * size])
                )
            raise BpfError(f"batch delete from map {self.name}", err)
        return deleted

    def lookup_batch(self, chunk: int = 4096) -> list[tuple[Any, Any]]:
        """Read the whole map with BPF_MAP_LOOKUP_BATCH (iteration where unsupported)."""
        keys, values = self.lookup_batch_raw(chunk)
        ksize, vsize = self.key_size, self._value_buf_size
        return [
            (
                self._decode_key(keys[i * ksize : (i + 1) * ksize]),
                self._decode_value(values[i * vsize : (i + 1) * vsize]),
            )
            for i in range(len(keys) // ksize)
        ]

    def lookup_batch_raw(self, chunk: int = 4096) -> tuple[bytes, bytes]:
        """The whole map as keys and values laid out as the map stores them, back to back
        (for callers that decode thousands at once, e.g. with numpy): one syscall per
        `chunk` entries, element by element where the map type has no batch operations."""
        key_parts: list[bytes] = []
        value_parts: list[bytes] = []
        token_in = None
        token_out = ctypes.create_string_buffer(max(self.key_size, 8))
        keys = ctypes.create_string_buffer(self.key_size * chunk)
        vals = ctypes.create_string_buffer(self._value_buf_size * chunk)
        opts = L.MapBatchOpts(sz=ctypes.sizeof(L.MapBatchOpts))
        while True:
            count = ctypes.c_uint32(chunk)
            ret = L.lib.bpf_map_lookup_batch(
                self.fd, token_in, token_out, keys, vals, ctypes.byref(count), ctypes.byref(opts)
            )
            err = L.errno_of(ret) if ret else 0
            if err and err != E.ENOENT:
                if err in _NO_BATCH and not key_parts:
                    return self._items_raw()
                raise BpfError(f"batch lookup of map {self.name}", err)
            key_parts.append(keys.raw[: count.value * self.key_size])
            value_parts.append(vals.raw[: count.value * self._value_buf_size])
            if err == E.ENOENT:
                return b"".join(key_parts), b"".join(value_parts)
            token_in = token_out
            token_out = ctypes.create_string_buffer(max(self.key_size, 8))

    def _items_raw(self) -> tuple[bytes, bytes]:
        keys, values = [], []
        v = ctypes.create_string_buffer(self._value_buf_size)
        for raw in list(self._raw_keys()):
            k = ctypes.create_string_buffer(raw, self.key_size)
            if L.lib.bpf_map_lookup_elem(self.fd, k, v) == 0:
                keys.append(raw)
                values.append(v.raw)
        return b"".join(keys), b"".join(values)

    def clear(self) -> int:
        """Delete every entry (arrays cannot delete: zero them). Returns entries touched."""
        if self.type in (ARRAY, PERCPU_ARRAY):
            zero = bytes(self.value_size)
            for i in range(self.max_entries):
                self.update(i, [zero] * possible_cpus() if self.percpu else zero)
            return self.max_entries
        return self.delete_batch(list(self._raw_keys()))

    # ---- memory -------------------------------------------------------------------------
    def mmap(self) -> mmap.mmap:
        """The live memory of a BPF_F_MMAPABLE array: its elements back to back, each
        rounded up to 8 bytes. Reads and writes reach what programs read without a syscall
        (an aligned store of up to 8 bytes is seen whole or not at all)."""
        if self.type != ARRAY or not self.flags & F_MMAPABLE:
            raise BpfError(f"map {self.name} is not a BPF_F_MMAPABLE array", E.EINVAL)
        return mmap.mmap(
            self.fd,
            self._stride * self.max_entries,
            mmap.MAP_SHARED,
            mmap.PROT_READ | mmap.PROT_WRITE,
        )

    # ---- pinning ------------------------------------------------------------------------
    def pin(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ret = L.lib.bpf_obj_pin(self.fd, path.encode())
        if ret:
            raise BpfError(f"pin map {self.name} at {path}", L.errno_of(ret))
