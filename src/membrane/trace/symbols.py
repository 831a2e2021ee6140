"""Stack addresses to function names: kernel ones through /proc/kallsyms, user ones through
the process's /proc/PID/maps and the ELF symbol tables (.symtab, .dynsym) of the files it
maps.

Processes are read while they live (`Symbolizer.snapshot`), because a profile is symbolized
after the run, when short-lived processes are gone. Files are opened through
/proc/PID/map_files, which reaches the very file the process mapped even when it has been
deleted or lives in another mount namespace (a container); each file is parsed once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

UNKNOWN = "[unknown]"

# ELF constants (elf(5)); only 64-bit little-endian files (x86-64, aarch64) are read.
_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64, _ELFDATA2LSB = 2, 1
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHT_SYMTAB, _SHT_NOTE, _SHT_DYNSYM = 2, 7, 11
_PT_LOAD = 1
_STT_FUNC, _STT_GNU_IFUNC = 2, 10
_STB_LOCAL, _STB_GLOBAL, _STB_WEAK = 0, 1, 2
_NT_GNU_BUILD_ID = 3
_SYM_DTYPE = np.dtype(
    [
        ("name", "<u4"),
        ("info", "u1"),
        ("other", "u1"),
        ("shndx", "<u2"),
        ("value", "<u8"),
        ("size", "<u8"),
    ]
)
_DEBUG_DIR = "/usr/lib/debug/.build-id"
_LAST_SYMBOL_SPAN = 4096  # kallsyms gives no sizes: the last symbol gets this much
_NO_STARTS = np.zeros(0, dtype=np.uint64)


class SymbolTable:
    """Function start addresses with their names; an address belongs to the function that
    starts at or below it and has not ended (a symbol without a size reaches the next)."""

    def __init__(self, starts: np.ndarray, ends: np.ndarray, names: Sequence[str]) -> None:
        self.starts = starts
        self.ends = ends
        self.names = names

    @classmethod
    def build(cls, entries: Iterable[tuple[int, int, str, int]]) -> SymbolTable:
        """From (address, size, name, preference) tuples. Of several names at one address
        (aliases such as malloc and __libc_malloc, getpid and __getpid) the one people call
        wins: fewest leading underscores, then the lowest preference, then the shortest."""
        items = list(entries)
        names = [e[2] for e in items]
        addrs = np.array([e[0] for e in items], dtype=np.uint64)
        sizes = np.array([e[1] for e in items], dtype=np.uint64)
        prefs = np.array([e[3] for e in items], dtype=np.int64)
        lengths = np.array([len(n) for n in names], dtype=np.int64)
        underscores = lengths - np.array([len(n.lstrip("_")) for n in names], dtype=np.int64)
        order = np.lexsort((lengths, prefs, underscores, addrs))
        first = np.ones(len(order), dtype=bool)
        first[1:] = addrs[order][1:] != addrs[order][:-1]
        keep = order[first]
        starts, sizes = addrs[keep], sizes[keep]
        following = np.append(starts[1:], starts[-1:] + np.uint64(_LAST_SYMBOL_SPAN))
        ends = np.where(sizes > 0, starts + sizes, following)
        return cls(starts, ends, [names[i] for i in keep.tolist()])

    def __len__(self) -> int:
        return len(self.names)

    def lookup(self, addrs: np.ndarray) -> list[str | None]:
        if not len(self.names):
            return [None] * len(addrs)
        idx = np.searchsorted(self.starts, addrs, side="right") - 1
        safe = np.maximum(idx, 0)
        inside = (idx >= 0) & (addrs < self.ends[safe])
        return [
            self.names[i] if ok else None
            for i, ok in zip(safe.tolist(), inside.tolist(), strict=True)
        ]


@dataclass(frozen=True)
class ElfFile:
    """What symbolization needs of an ELF file: its functions and its loadable segments
    (file offset, virtual address, size), to turn a mapped file offset into an address."""

    symbols: SymbolTable
    segments: tuple[tuple[int, int, int], ...]

    def vaddr(self, file_offset: int) -> int | None:
        for offset, vaddr, size in self.segments:
            if offset <= file_offset < offset + size:
                return file_offset - offset + vaddr
        return None


def _binding_preference(info: np.ndarray) -> np.ndarray:
    binding = info >> 4
    return np.select([binding == _STB_GLOBAL, binding == _STB_WEAK], [0, 1], 2)


def _read_elf(fd: int) -> tuple[list[tuple[int, int, str, int]], tuple, bytes | None] | None:
    """Functions, PT_LOAD segments and GNU build id of the ELF file open as `fd`; None when
    it is not a 64-bit little-endian ELF file."""
    head = os.pread(fd, _EHDR.size, 0)
    if (
        len(head) < _EHDR.size
        or head[:4] != _ELF_MAGIC
        or head[4] != _ELFCLASS64
        or head[5] != _ELFDATA2LSB
    ):
        return None
    (_, _, _, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, _) = _EHDR.unpack(head)
    segments = []
    raw = os.pread(fd, phentsize * phnum, phoff)
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = _PHDR.unpack_from(raw, i * phentsize)
        if p_type == _PT_LOAD:
            segments.append((p_offset, p_vaddr, p_filesz))
    raw = os.pread(fd, shentsize * shnum, shoff) if shoff else b""
    sections = [_SHDR.unpack_from(raw, i * shentsize) for i in range(len(raw) // shentsize)]
    functions: list[tuple[int, int, str, int]] = []
    build_id = None
    for _, sh_type, _, _, sh_offset, sh_size, sh_link, _, _, sh_entsize in sections:
        if sh_type == _SHT_NOTE and build_id is None:
            build_id = _build_id(os.pread(fd, sh_size, sh_offset))
        if (
            sh_type not in (_SHT_SYMTAB, _SHT_DYNSYM)
            or sh_entsize != _SYM_DTYPE.itemsize
            or sh_link >= len(sections)
        ):
            continue
        syms = np.frombuffer(
            os.pread(fd, sh_size, sh_offset), dtype=_SYM_DTYPE, count=sh_size // sh_entsize
        )
        kind = syms["info"] & 0xF
        syms = syms[
            ((kind == _STT_FUNC) | (kind == _STT_GNU_IFUNC))
            & (syms["value"] != 0)
            & (syms["shndx"] != 0)
        ]
        _, _, _, _, str_offset, str_size, *_ = sections[sh_link]
        strings = os.pread(fd, str_size, str_offset)
        prefs = _binding_preference(syms["info"])
        for name_off, value, size, pref in zip(
            syms["name"].tolist(),
            syms["value"].tolist(),
            syms["size"].tolist(),
            prefs.tolist(),
            strict=True,
        ):
            end = strings.find(b"\0", name_off)
            name = strings[name_off : end if end >= 0 else None].decode(errors="replace")
            if name:
                functions.append((value, size, name, pref))
    return functions, tuple(segments), build_id


def _build_id(notes: bytes) -> bytes | None:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
        name_end = pos + 12 + (namesz + 3) // 4 * 4
        if ntype == _NT_GNU_BUILD_ID and notes[pos + 12 : pos + 12 + namesz] == b"GNU\0":
            return notes[name_end : name_end + descsz]
        pos = name_end + (descsz + 3) // 4 * 4
    return None


def load_elf(path: str, with_debug_file: bool = True) -> ElfFile | None:
    """The file's functions, with those of its separate debug file (found by build id
    under /usr/lib/debug) when one is installed; None when it cannot be read as ELF."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        parsed = _read_elf(fd)
    except (OSError, ValueError, struct.error):
        parsed = None
    finally:
        os.close(fd)
    if parsed is None:
        return None
    functions, segments, build_id = parsed
    if build_id and with_debug_file:
        hexid = build_id.hex()
        debug = os.path.join(_DEBUG_DIR, hexid[:2], hexid[2:] + ".debug")
        if os.path.exists(debug) and (extra := load_elf(debug, False)) is not None:
            functions += [
                (int(s), int(e - s), n, 0)
                for s, e, n in zip(
                    extra.symbols.starts, extra.symbols.ends, extra.symbols.names, strict=True
                )
            ]
    return ElfFile(SymbolTable.build(functions), segments)


@cache
def kernel_symbols() -> SymbolTable:
    """Kernel text symbols of /proc/kallsyms (addresses read as 0 without CAP_SYSLOG)."""
    entries = []
    with open("/proc/kallsyms", encoding="utf-8", errors="replace") as f:
        for line in f.read().splitlines():
            addr, kind, name = line.split(None, 3)[:3]
            if kind in ("t", "T", "w", "W") and (value := int(addr, 16)):
                entries.append((value, 0, name, 0 if kind in "TW" else 1))
    return SymbolTable.build(entries)


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    offset: int
    name: str  # the path in /proc/PID/maps, or [vdso] and the like
    elf: ElfFile | None


@dataclass(frozen=True)
class _Image:
    exe: tuple[int, int] | None  # (st_dev, st_ino) of /proc/PID/exe when it was read
    starts: np.ndarray
    mappings: list[Mapping]


class Symbolizer:
    """Names for the addresses of kernel and user stacks.

    User addresses need the mappings of the process that ran them, read while it lived:
    `snapshot(pid, image)` reads them, `user(pid, addrs, image)` uses them. `image` tells
    apart the programs one pid runs one after the other (exec replaces every mapping);
    callers that do not know it keep the default.
    """

    def __init__(self) -> None:
        self._files: dict[tuple[str, int], ElfFile | None] = {}
        self._images: dict[tuple[int, int], _Image] = {}

    def snapshot(self, pid: int, image: int = 0) -> bool:
        """Read the process's executable mappings now; False when it is gone."""
        read = self._read(pid)
        if read is None:
            return False
        self._images[(pid, image)] = read
        return True

    def refresh(self, pid: int, image: int = 0) -> bool:
        """Read the mappings again (for libraries loaded since the snapshot), unless the
        process is gone or runs another executable by now."""
        old = self._images.get((pid, image))
        read = self._read(pid)
        if read is None or (old is not None and read.exe != old.exe):
            return False
        self._images[(pid, image)] = read
        return True

    def _read(self, pid: int) -> _Image | None:
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
                lines = f.readlines()
        except OSError:
            return None
        try:
            st = os.stat(f"/proc/{pid}/exe")
            exe: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:  # a kernel thread has no executable
            exe = None
        mappings = []
        for line in lines:
            parts = line.split(maxsplit=5)
            if len(parts) < 5 or "x" not in parts[1]:
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            name = parts[5].strip() if len(parts) == 6 else ""
            elf = None
            if name and not name.startswith("["):
                elf = self._file(pid, start, end, name, parts[3], int(parts[4]))
            mappings.append(Mapping(start, end, int(parts[2], 16), name, elf))
        mappings.sort(key=lambda m: m.start)
        starts = np.array([m.start for m in mappings], dtype=np.uint64)
        return _Image(exe, starts, mappings)

    def _file(
        self, pid: int, start: int, end: int, path: str, dev: str, inode: int
    ) -> ElfFile | None:
        key = (dev, inode)
        if key not in self._files:
            elf = None
            for candidate in (
                f"/proc/{pid}/map_files/{start:x}-{end:x}",
                f"/proc/{pid}/root{path}",
                path,
            ):
                elf = load_elf(candidate)
                if elf is not None:
                    break
            self._files[key] = elf
        return self._files[key]

    def user(self, pid: int, addrs: Sequence[int], image: int = 0) -> list[str]:
        """Names of a user stack (innermost first) of process `pid` running `image`."""
        read = self._images.get((pid, image))
        starts, mappings = (read.starts, read.mappings) if read else (_NO_STARTS, [])
        names = []
        for depth, addr in enumerate(addrs):
            # Callers' frames hold return addresses, which may already be past the call's
            # function (a call at the very end of it): look up the byte before.
            target = addr - 1 if depth else addr
            i = int(np.searchsorted(starts, np.uint64(target), side="right")) - 1
            names.append(
                _in_mapping(mappings[i], target) if i >= 0 and target < mappings[i].end else UNKNOWN
            )
        return names

    @staticmethod
    def kernel(addrs: Sequence[int]) -> list[str]:
        """Names of a kernel stack (innermost first)."""
        if not addrs:
            return []
        targets = np.array([a - 1 if i else a for i, a in enumerate(addrs)], dtype=np.uint64)
        with contextlib.suppress(OSError):
            return [n or UNKNOWN for n in kernel_symbols().lookup(targets)]
        return [UNKNOWN] * len(addrs)


def _in_mapping(mapping: Mapping, addr: int) -> str:
    if mapping.elf is not None:
        vaddr = mapping.elf.vaddr(addr - mapping.start + mapping.offset)
        if vaddr is not None:
            name = mapping.elf.symbols.lookup(np.array([vaddr], dtype=np.uint64))[0]
            if name:
                return name
    if not mapping.name:
        return UNKNOWN
    base = os.path.basename(mapping.name)
    return base if base.startswith("[") else f"[{base}]"


def demangle(names: Iterable[str]) -> dict[str, str]:
    """C++ and Rust symbol names (_Z..., _R...) as people write them, through binutils'
    c++filt in one call when it is installed: {mangled: readable} for those it could read."""
    mangled = sorted({n for n in names if n.startswith(("_Z", "_R"))})
    tool = shutil.which("c++filt")
    if not mangled or tool is None:
        return {}
    try:
        out = subprocess.run(
            [tool],
            input="\n".join(mangled) + "\n",
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    if len(out) != len(mangled):
        return {}
    return {m: d for m, d in zip(mangled, out, strict=True) if d and d != m}
