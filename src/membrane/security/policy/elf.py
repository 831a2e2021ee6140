"""The file offset of a function symbol in an ELF executable or shared object: where a
uprobe goes. Resolved at apply time, so a symbol that is not there is the user's error
(exit 2 naming the field), not a failure after half the policy is loaded."""

from __future__ import annotations

import struct

SHT_SYMTAB, SHT_DYNSYM = 2, 11
STT_FUNC, STT_GNU_IFUNC = 2, 10


class ElfError(ValueError):
    pass


def symbol_offset(path: str, symbol: str) -> int:
    """File offset of function `symbol` (.symtab, else .dynsym): its address in the
    section that holds it, minus the section's address, plus the section's file offset."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ElfError(f"{path}: {err.strerror}") from None
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ElfError(f"{path} is not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
    ]
    # (name, type, flags, addr, offset, size, link, info, addralign, entsize)
    for wanted in (SHT_SYMTAB, SHT_DYNSYM):
        for sec in sections:
            if sec[1] != wanted:
                continue
            strtab = sections[sec[6]]
            for i in range(sec[5] // 24):
                name_off, info, _, shndx, value, _ = struct.unpack_from(
                    "<IBBHQQ", data, sec[4] + i * 24
                )
                if info & 0xF not in (STT_FUNC, STT_GNU_IFUNC) or not value or not shndx:
                    continue
                start = strtab[4] + name_off
                name = data[start : data.index(b"\0", start)].decode(errors="replace")
                if name == symbol or name.split("@")[0] == symbol:
                    holder = sections[shndx]
                    return value - holder[3] + holder[4]
    raise ElfError(f"{path} has no function symbol {symbol!r}")
