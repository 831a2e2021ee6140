"""x86_64 syscall names <-> numbers, for the syscall tools.

The kernel exposes no name-to-number table at run time (tracefs lists the names, BTF has
neither; since 6.9 x86 dispatches through a switch, so there is no sys_call_table to read
either). The authority is the UAPI header `asm/unistd_64.h` (linux-libc-dev): it is read at
run time when present, which is always the case where the BPF objects are built (clang
needs the same include directory). A package installed elsewhere carries the copy that
setup.py's build step generated from the build machine's header with `write_table()`. Nobody
types the list by hand. Numbers neither source knows (syscalls newer than the header) are
shown as numbers, and can be chosen by number.

Stdlib only: setup.py imports this module from the source tree at build time.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from membrane.errors import UserError

HEADER = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
GENERATED = Path(__file__).with_name("syscalls_x86_64.tsv")
_DEFINE = re.compile(r"^#define\s+__NR_(\w+)\s+(\d+)\s*$", re.MULTILINE)


class SyscallTable:
    """Both directions; the kernel's maps are keyed by number, people type names."""

    def __init__(self, numbers: dict[str, int]) -> None:
        self.numbers = numbers
        self.names = {nr: name for name, nr in numbers.items()}

    def name(self, nr: int) -> str:
        """The syscall's name, or its number when the table does not know it."""
        return self.names.get(nr, str(nr))

    def number(self, name: str, field: str = "SYSCALL") -> int:
        """The number of a syscall given by name (or as a number); UserError when unknown."""
        if name.isdigit():
            return int(name)
        if name not in self.numbers:
            close = sorted(n for n in self.numbers if name in n)[:5]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(field, f"{name!r} is not an x86_64 syscall{hint}")
        return self.numbers[name]


def parse_header(text: str) -> dict[str, int]:
    return {name: int(nr) for name, nr in _DEFINE.findall(text)}


def write_table(header: Path, out: Path) -> int:
    """Write the build-time copy (`nr<TAB>name` lines) from `header`; returns the count."""
    numbers = parse_header(header.read_text())
    if not numbers:
        raise ValueError(f"{header}: no __NR_ definitions")
    out.write_text(
        "".join(f"{nr}\t{name}\n" for name, nr in sorted(numbers.items(), key=lambda x: x[1]))
    )
    return len(numbers)


@cache
def table() -> SyscallTable:
    """The run-time header if present, else the packaged build-time copy."""
    if HEADER.exists():
        return SyscallTable(parse_header(HEADER.read_text()))
    if GENERATED.exists():
        rows = (line.split("\t") for line in GENERATED.read_text().splitlines() if line)
        return SyscallTable({name: int(nr) for nr, name in rows})
    raise UserError(
        "",
        f"no syscall table: install linux-libc-dev (for {HEADER}) or "
        "reinstall membrane from a wheel built with it",
    )
