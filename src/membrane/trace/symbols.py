"""Stack addresses to function names: kernel ones through /proc/kallsyms, user ones through
the process's /proc/PID/maps and the ELF symbol tables (.symtab, .dynsym) of the files it
maps.

Processes are read while they live (`Symbolizer.snapshot`), because a profile is symbolized
after the run, when short-lived processes are gone. A snapshot only reads the mappings and
keeps each file not seen before open, through /proc/PID/map_files, which reaches the very
file the process mapped even when it has been deleted or lives in another mount namespace
(a container). Files are parsed at the end, once each, and only those that an address to
name falls into; names are decoded from the string tables only for the symbols found.
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
_UNDERSCORES_COUNTED = 8  # aliases differ by a few leading underscores, never more
_NO_ADDRS = np.zeros(0, dtype=np.uint64)
_NO_OFFSETS = np.zeros(0, dtype=np.int64)
_NAME_ENDS = bytes.maketrans(b"\n\t", b"\0\0")  # kallsyms lines as NUL-ended names


class StringTable:
    """Names as offsets into ELF string tables, decoded only when asked for: a library has
    tens of thousands of functions, a profile looks up a few of them."""

    def __init__(self, data: bytes, offsets: np.ndarray) -> None:
        self.data = data
        self.offsets = offsets.astype(np.int64, copy=False)

    @classmethod
    def concat(cls, tables: Sequence[StringTable]) -> StringTable:
        shift, datas, offsets = 0, [], []
        for table in tables:
            datas.append(table.data)
            offsets.append(table.offsets + shift)
            shift += len(table.data)
        return cls(b"".join(datas), np.concatenate(offsets) if offsets else _NO_OFFSETS)

    def take(self, idx: np.ndarray) -> StringTable:
        return StringTable(self.data, self.offsets[idx])

    def lengths(self) -> np.ndarray:
        raw = np.frombuffer(self.data, dtype=np.uint8)
        nuls = np.append(np.flatnonzero(raw == 0), len(raw))
        return nuls[np.searchsorted(nuls, self.offsets)] - self.offsets

    def leading_underscores(self, lengths: np.ndarray) -> np.ndarray:
        raw = np.frombuffer(self.data, dtype=np.uint8)
        count = np.zeros(len(self.offsets), dtype=np.int64)
        if not len(raw):
            return count
        running = np.ones(len(self.offsets), dtype=bool)
        for i in range(_UNDERSCORES_COUNTED):
            at = np.minimum(self.offsets + i, len(raw) - 1)
            running &= (lengths > i) & (raw[at] == ord("_"))
            count += running
        return count

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> str:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        start = int(self.offsets[i])
        end = self.data.find(b"\0", start)
        return self.data[start : end if end >= 0 else None].decode(errors="replace")


class SymbolTable:
    """Function start addresses with their names; an address belongs to the function that
    starts at or below it and has not ended (a symbol without a size reaches the next)."""

    def __init__(
        self, starts: np.ndarray, ends: np.ndarray, names: Sequence[str] | StringTable
    ) -> None:
        self.starts = starts
        self.ends = ends
        self.names = names

    @classmethod
    def build(cls, entries: Iterable[tuple[int, int, str, int]]) -> SymbolTable:
        """From (address, size, name, preference) tuples (see from_arrays)."""
        items = list(entries)
        names = [e[2] for e in items]
        lengths = np.array([len(n) for n in names], dtype=np.int64)
        return cls.from_arrays(
            np.array([e[0] for e in items], dtype=np.uint64),
            np.array([e[1] for e in items], dtype=np.uint64),
            np.array([e[3] for e in items], dtype=np.int64),
            names,
            lengths,
            lengths - np.array([len(n.lstrip("_")) for n in names], dtype=np.int64),
        )

    @classmethod
    def from_strings(
        cls, addrs: np.ndarray, sizes: np.ndarray, prefs: np.ndarray, names: StringTable
    ) -> SymbolTable:
        lengths = names.lengths()
        underscores = names.leading_underscores(lengths)
        return cls.from_arrays(addrs, sizes, prefs, names, lengths, underscores)

    @classmethod
    def from_arrays(
        cls,
        addrs: np.ndarray,
        sizes: np.ndarray,
        prefs: np.ndarray,
        names: Sequence[str] | StringTable,
        lengths: np.ndarray,
        underscores: np.ndarray,
    ) -> SymbolTable:
        """Of several names at one address (aliases such as malloc and __libc_malloc,
        getpid and __getpid) the one people call wins: fewest leading underscores, then
        the lowest preference, then the shortest."""
        order = np.lexsort((lengths, prefs, underscores, addrs))
        first = np.ones(len(order), dtype=bool)
        first[1:] = addrs[order][1:] != addrs[order][:-1]
        keep = order[first]
        starts, sizes = addrs[keep], sizes[keep]
        following = np.append(starts[1:], starts[-1:] + np.uint64(_LAST_SYMBOL_SPAN))
        ends = np.where(sizes > 0, starts + sizes, following)
        if isinstance(names, StringTable):
            return cls(starts, ends, names.take(keep))
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

    def vaddrs(self, file_offsets: np.ndarray) -> np.ndarray:
        """vaddr of many offsets (uint64); 0, which names no function, where no segment
        holds the offset."""
        out = np.zeros(len(file_offsets), dtype=np.uint64)
        for offset, vaddr, size in self.segments:
            held = (file_offsets >= np.uint64(offset)) & (file_offsets < np.uint64(offset + size))
            out[held] = file_offsets[held] - np.uint64(offset) + np.uint64(vaddr)
        return out


def _binding_preference(info: np.ndarray) -> np.ndarray:
    binding = info >> 4
    return np.select([binding == _STB_GLOBAL, binding == _STB_WEAK], [0, 1], 2)


@dataclass(frozen=True)
class _Functions:
    """The function symbols of a file, as arrays (one row per symbol)."""

    addrs: np.ndarray
    sizes: np.ndarray
    prefs: np.ndarray
    names: StringTable

    @classmethod
    def concat(cls, parts: Sequence[_Functions]) -> _Functions:
        return cls(
            np.concatenate([p.addrs for p in parts]) if parts else _NO_ADDRS,
            np.concatenate([p.sizes for p in parts]) if parts else _NO_ADDRS,
            np.concatenate([p.prefs for p in parts]) if parts else _NO_OFFSETS,
            StringTable.concat([p.names for p in parts]),
        )

    def table(self) -> SymbolTable:
        return SymbolTable.from_strings(self.addrs, self.sizes, self.prefs, self.names)


def _read_elf(fd: int) -> tuple[_Functions, tuple, bytes | None] | None:
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
    parts = []
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
        _, _, _, _, str_offset, str_size, *_ = sections[sh_link]
        names = StringTable(os.pread(fd, str_size, str_offset), syms["name"])
        kind = syms["info"] & 0xF
        keep = (
            ((kind == _STT_FUNC) | (kind == _STT_GNU_IFUNC))
            & (syms["value"] != 0)
            & (syms["shndx"] != 0)
            & (syms["name"] < len(names.data))
        )
        keep[keep] = names.take(keep).lengths() > 0  # nameless symbols say nothing
        syms = syms[keep]
        parts.append(
            _Functions(
                syms["value"].astype(np.uint64),
                syms["size"].astype(np.uint64),
                _binding_preference(syms["info"]).astype(np.int64),
                names.take(keep),
            )
        )
    return _Functions.concat(parts), tuple(segments), build_id


def _build_id(notes: bytes) -> bytes | None:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
        name_end = pos + 12 + (namesz + 3) // 4 * 4
        if ntype == _NT_GNU_BUILD_ID and notes[pos + 12 : pos + 12 + namesz] == b"GNU\0":
            return notes[name_end : name_end + descsz]
        pos = name_end + (descsz + 3) // 4 * 4
    return None


def _parse(fd: int) -> tuple[_Functions, tuple, bytes | None] | None:
    try:
        return _read_elf(fd)
    except (OSError, ValueError, struct.error):
        return None


def read_elf(fd: int) -> ElfFile | None:
    """The functions of the ELF file open as `fd`, with those of its separate debug file
    (found by build id under /usr/lib/debug) when one is installed; None when it cannot be
    read as ELF."""
    parsed = _parse(fd)
    if parsed is None:
        return None
    functions, segments, build_id = parsed
    if build_id:
        hexid = build_id.hex()
        debug = os.path.join(_DEBUG_DIR, hexid[:2], hexid[2:] + ".debug")
        with contextlib.suppress(OSError):
            debug_fd = os.open(debug, os.O_RDONLY | os.O_CLOEXEC)
            try:
                extra = _parse(debug_fd)
            finally:
                os.close(debug_fd)
            if extra is not None:
                functions = _Functions.concat([functions, extra[0]])
    return ElfFile(functions.table(), segments)


def load_elf(path: str) -> ElfFile | None:
    """read_elf of the file at `path`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return read_elf(fd)
    finally:
        os.close(fd)


@cache
def kernel_symbols() -> SymbolTable:
    """Kernel text symbols of /proc/kallsyms (addresses read as 0 without CAP_SYSLOG)."""
    return parse_kallsyms(_read_proc("/proc/kallsyms") or b"")


def parse_kallsyms(data: bytes) -> SymbolTable:
    """The text symbols of kallsyms lines (`address type name[\tmodule]`), read with numpy:
    the file has over 100,000 lines, and addresses are all printed with the same width."""
    if not data.strip():
        return SymbolTable.build([])
    raw = np.frombuffer(data, dtype=np.uint8)
    width = data.index(b" ")
    ends = np.flatnonzero(raw == ord("\n"))
    if not len(ends) or ends[-1] != len(raw) - 1:
        ends = np.append(ends, len(raw))
    starts = np.append(0, ends[:-1] + 1)
    starts = starts[ends - starts > width + 3]  # address, space, type, space, a name
    digits = raw[starts[:, None] + np.arange(width)]
    nibbles = np.where(digits >= ord("a"), digits - ord("a") + 10, digits - ord("0"))
    shifts = np.arange(4 * (width - 1), -1, -4, dtype=np.uint64)
    addrs = np.bitwise_or.reduce(nibbles.astype(np.uint64) << shifts, axis=1)
    kinds = raw[starts + width + 1]
    text = np.isin(kinds, np.frombuffer(b"tTwW", dtype=np.uint8)) & (addrs != 0)
    prefs = np.where(np.isin(kinds, np.frombuffer(b"TW", dtype=np.uint8)), 0, 1)
    # the names end where their lines do, or at the tab before a module's name
    names = StringTable(data.translate(_NAME_ENDS), starts[text] + width + 3)
    return SymbolTable.from_strings(
        addrs[text], np.zeros(int(text.sum()), dtype=np.uint64), prefs[text], names
    )


FileKey = tuple[str, int]  # (device as /proc/PID/maps writes it, inode): one mapped file


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    offset: int
    name: str  # the path in /proc/PID/maps, or [vdso] and the like
    file: FileKey | None  # the file mapped; None for anonymous memory, [vdso], ...


@dataclass(frozen=True)
class _Image:
    exe: tuple[int, int] | None  # (st_dev, st_ino) of /proc/PID/exe when it was read
    starts: np.ndarray
    ends: np.ndarray
    mappings: list[Mapping]


class Symbolizer:
    """Names for the addresses of kernel and user stacks.

    User addresses need the mappings of the process that ran them, read while it lived:
    `snapshot(pid, image)` reads them, `user(pid, addrs, image)` and `names(...)` use them.
    `image` tells apart the programs one pid runs one after the other (exec replaces every
    mapping); callers that do not know it keep the default.

    A snapshot is cheap: it reads /proc/PID/maps and opens each file it has not seen yet
    (through /proc/PID/map_files, which reaches the very file the process mapped even when
    it has been deleted since or lives in another mount namespace), but parses nothing.
    A file's symbols are read when an address in it is first looked up, once per file, so
    a profile of a busy machine pays only for the files its samples fell into. Close the
    symbolizer (or use it as a context manager) to close the files it keeps open.
    """

    def __init__(self) -> None:
        self._opened: dict[FileKey, int] = {}  # kept open, not parsed yet
        self._files: dict[FileKey, ElfFile | None] = {}  # parsed (None: not ELF)
        self._images: dict[tuple[int, int], _Image] = {}

    def __enter__(self) -> Symbolizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._opened.values():
            os.close(fd)
        self._opened.clear()

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
        text = _read_proc(f"/proc/{pid}/maps")
        if text is None:
            return None
        try:
            st = os.stat(f"/proc/{pid}/exe")
            exe: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:  # a kernel thread has no executable
            exe = None
        mappings = []
        for line in text.split(b"\n"):
            # start-end perms offset dev inode [path]; only executable mappings matter
            parts = line.split(None, 5)
            if len(parts) < 5 or parts[1][2:3] != b"x":
                continue
            start, end = (int(x, 16) for x in parts[0].split(b"-"))
            name = parts[5].decode(errors="replace") if len(parts) == 6 else ""
            key = None
            if name and not name.startswith("["):
                key = (parts[3].decode(), int(parts[4]))
                self._keep(key, pid, start, end, name)
            mappings.append(Mapping(start, end, int(parts[2], 16), name, key))
        mappings.sort(key=lambda m: m.start)
        starts = np.array([m.start for m in mappings], dtype=np.uint64)
        ends = np.array([m.end for m in mappings], dtype=np.uint64)
        return _Image(exe, starts, ends, mappings)

    def _keep(self, key: FileKey, pid: int, start: int, end: int, path: str) -> None:
        """Open the file behind a mapping while the process still has it mapped."""
        if key in self._opened or key in self._files:
            return
        for candidate in (
            f"/proc/{pid}/map_files/{start:x}-{end:x}",
            f"/proc/{pid}/root{path}",
            path,
        ):
            with contextlib.suppress(OSError):
                self._opened[key] = os.open(candidate, os.O_RDONLY | os.O_CLOEXEC)
                return
        self._files[key] = None

    def _elf(self, key: FileKey) -> ElfFile | None:
        if key not in self._files:
            fd = self._opened.pop(key)
            try:
                self._files[key] = read_elf(fd)
            finally:
                os.close(fd)
        return self._files[key]

    def outside(self, pid: int, image: int, targets: np.ndarray) -> bool:
        """Whether some of the addresses lie outside every executable mapping read for the
        image (a library loaded after the snapshot, or no snapshot at all)."""
        read = self._images.get((pid, image))
        if read is None or not read.mappings:  # (a process read while it exec'd or exited)
            return bool(len(targets))
        idx = np.searchsorted(read.starts, targets, side="right") - 1
        return not bool(np.all((idx >= 0) & (targets < read.ends[np.maximum(idx, 0)])))

    def names(self, pid: int, image: int, targets: np.ndarray) -> list[str]:
        """Names of the user addresses `targets` (uint64, each the exact byte to name) of
        process `pid` running `image`: one lookup per mapping they fall into."""
        names = [UNKNOWN] * len(targets)
        read = self._images.get((pid, image))
        if read is None or not len(targets) or not read.mappings:
            return names
        idx = np.searchsorted(read.starts, targets, side="right") - 1
        inside = (idx >= 0) & (targets < read.ends[np.maximum(idx, 0)])
        for i in np.unique(idx[inside]).tolist():
            rows = np.flatnonzero(inside & (idx == i))
            for row, name in zip(
                rows.tolist(), self._in_mapping(read.mappings[i], targets[rows]), strict=True
            ):
                names[row] = name
        return names

    def _in_mapping(self, mapping: Mapping, addrs: np.ndarray) -> list[str]:
        found: list[str | None] = [None] * len(addrs)
        elf = self._elf(mapping.file) if mapping.file is not None else None
        if elf is not None:
            offsets = addrs - np.uint64(mapping.start) + np.uint64(mapping.offset)
            found = elf.symbols.lookup(elf.vaddrs(offsets))
        if not mapping.name:
            fallback = UNKNOWN
        else:
            base = os.path.basename(mapping.name)
            fallback = base if base.startswith("[") else f"[{base}]"
        return [name or fallback for name in found]

    def user(self, pid: int, addrs: Sequence[int], image: int = 0) -> list[str]:
        """Names of a user stack (innermost first) of process `pid` running `image`."""
        return self.names(pid, image, return_targets(addrs))

    @staticmethod
    def kernel(addrs: Sequence[int]) -> list[str]:
        """Names of a kernel stack (innermost first)."""
        return Symbolizer.kernel_names(return_targets(addrs))

    @staticmethod
    def kernel_names(targets: np.ndarray) -> list[str]:
        """Names of the kernel addresses `targets` (uint64, each the exact byte to name)."""
        if not len(targets):
            return []
        with contextlib.suppress(OSError):
            return [n or UNKNOWN for n in kernel_symbols().lookup(targets)]
        return [UNKNOWN] * len(targets)


def _read_proc(path: str) -> bytes | None:
    """A /proc file whole (plain os calls: it is read for every process sampled)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except OSError:  # the process went away while we read
        return None
    finally:
        os.close(fd)
    return b"".join(chunks)


def return_targets(addrs: Sequence[int] | np.ndarray) -> np.ndarray:
    """The bytes to name for a stack, innermost first: callers' frames hold return
    addresses, which may already be past the call's function (a call at the very end of
    it), so each is looked up one byte before."""
    targets = np.array(addrs, dtype=np.uint64)
    targets[1:] -= np.uint64(1)
    return targets


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
