"""The ELF symbol reader and address lookup, checked against binutils' nm on a program the
test compiles (with clang, which the setup installs for BPF), and on this live process."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from membrane.trace.symbols import (
    UNKNOWN,
    StringTable,
    Symbolizer,
    SymbolTable,
    demangle,
    load_elf,
    parse_kallsyms,
    return_targets,
)

SOURCE = """
volatile unsigned long sink;
static void helper_static(void) { sink++; }
void membrane_symbol_a(void) { helper_static(); sink += 2; }
int main(void) { membrane_symbol_a(); return 0; }
"""

needs_cc = pytest.mark.skipif(
    not (shutil.which("clang") and shutil.which("nm")),
    reason="needs clang and binutils (scripts/setup.sh installs them)",
)


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("symbols")
    (tmp / "prog.c").write_text(SOURCE)
    subprocess.run(["clang", "-O0", "-o", str(tmp / "prog"), str(tmp / "prog.c")], check=True)
    return tmp / "prog"


def nm_functions(path: Path) -> dict[str, int]:
    out = subprocess.run(
        ["nm", "--defined-only", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return {
        name: int(addr, 16)
        for addr, kind, name in (
            line.split() for line in out.splitlines() if len(line.split()) == 3
        )
        if kind in "tT"
    }


@needs_cc
def test_functions_and_addresses_match_nm(program: Path) -> None:
    elf = load_elf(str(program))
    assert elf is not None
    nm = nm_functions(program)
    for name in ("main", "membrane_symbol_a", "helper_static"):
        addr = nm[name]
        assert elf.symbols.lookup(np.array([addr, addr + 3], dtype=np.uint64)) == [name, name]
    # a PIE's text is mapped from its file offset: offset -> address is the identity here
    assert elf.vaddr(nm["main"]) == nm["main"]


@needs_cc
def test_stripped_file_still_has_its_dynamic_symbols(program: Path, tmp_path: Path) -> None:
    stripped = tmp_path / "stripped"
    shutil.copy(program, stripped)
    subprocess.run(["strip", str(stripped)], check=True)
    elf = load_elf(str(stripped))
    assert elf is not None and "helper_static" not in elf.symbols.names
    assert load_elf(str(tmp_path)) is None and load_elf("/proc/self/status") is None


def test_lookup_prefers_global_short_names_and_respects_sizes() -> None:
    table = SymbolTable.build(
        [
            (0x1000, 0x10, "__libc_malloc", 0),
            (0x1000, 0x10, "malloc", 0),
            (0x1000, 0x10, "local_alias", 2),
            (0x2000, 0, "sizeless", 0),
            (0x3000, 8, "last", 0),
        ]
    )
    addrs = np.array([0xFFF, 0x1000, 0x100F, 0x1010, 0x2FFF, 0x3007, 0x3008], dtype=np.uint64)
    assert table.lookup(addrs) == [None, "malloc", "malloc", None, "sizeless", "last", None]
    assert SymbolTable.build([]).lookup(addrs[:1]) == [None]


def test_string_table_names_are_read_where_they_start() -> None:
    """ELF string tables share suffixes: a name may start inside another one."""
    data = b"\0__libc_malloc\0malloc_x\0_x\0"
    offsets = np.array([1, 8, 3, 15, 24], dtype=np.int64)  # malloc is a suffix
    names = StringTable(data, offsets)
    lengths = names.lengths()
    assert [names[i] for i in range(len(names))] == [
        "__libc_malloc",
        "malloc",
        "libc_malloc",
        "malloc_x",
        "_x",
    ]
    assert lengths.tolist() == [13, 6, 11, 8, 2]
    assert names.leading_underscores(lengths).tolist() == [2, 0, 0, 0, 1]
    assert "malloc" in names and "free" not in names
    both = StringTable.concat([names.take(np.array([1])), StringTable(b"\0free\0", offsets[:1])])
    assert list(both) == ["malloc", "free"]


def test_tables_from_string_tables_pick_aliases_like_tables_from_names() -> None:
    data = b"\0__libc_malloc\0malloc\0local_alias\0sizeless\0"
    names = StringTable(data, np.array([1, 15, 22, 34], dtype=np.int64))
    table = SymbolTable.from_strings(
        np.array([0x1000, 0x1000, 0x1000, 0x2000], dtype=np.uint64),
        np.array([0x10, 0x10, 0x10, 0], dtype=np.uint64),
        np.array([0, 0, 2, 0], dtype=np.int64),
        names,
    )
    addrs = np.array([0x1000, 0x100F, 0x1010, 0x2FFF], dtype=np.uint64)
    assert table.lookup(addrs) == ["malloc", "malloc", None, "sizeless"]


def test_kallsyms_text_symbols_with_modules_and_hidden_addresses() -> None:
    data = (
        b"ffffffff81000000 T _stext\n"
        b"ffffffff81000000 T startup_64\n"
        b"ffffffff81000100 t __local_helper\n"
        b"ffffffff81000200 D some_data\n"
        b"ffffffff81000300 W weak_one\n"
        b"ffffffffc0001000 t mod_func\t[some_mod]\n"
        b"0000000000000000 T hidden\n"  # what a reader without CAP_SYSLOG sees
    )
    table = parse_kallsyms(data)
    addrs = np.array([0xFFFFFFFF81000010, 0xFFFFFFFF81000100, 0xFFFFFFFF81000300], np.uint64)
    assert table.lookup(addrs) == ["startup_64", "__local_helper", "weak_one"]
    assert list(table.names) == ["startup_64", "__local_helper", "weak_one", "mod_func"]
    assert parse_kallsyms(data.rstrip(b"\n")).lookup(addrs[:1]) == ["startup_64"]
    assert len(parse_kallsyms(b"")) == 0


def test_return_addresses_are_named_by_the_call_before_them() -> None:
    assert return_targets([0x10, 0x20, 0x30]).tolist() == [0x10, 0x1F, 0x2F]
    assert return_targets([]).tolist() == []


def test_user_frames_of_a_live_process_resolve_through_its_mappings() -> None:
    symbolizer = Symbolizer()
    assert symbolizer.snapshot(os.getpid())
    assert not symbolizer.snapshot(2**22 + 1)  # above pid_max: no such process
    getpid = ctypes.cast(ctypes.CDLL(None).getpid, ctypes.c_void_p).value
    assert getpid
    # innermost frame: the address itself; callers' frames: return addresses (one past)
    assert symbolizer.user(os.getpid(), [getpid, getpid + 1]) == ["getpid", "getpid"]
    assert symbolizer.user(os.getpid(), [8]) == [UNKNOWN]
    assert symbolizer.user(2**22 + 1, [getpid]) == [UNKNOWN]


def test_an_image_read_without_executable_mappings_names_nothing() -> None:
    """A process read while it exits (or execs) may show no mappings at all."""
    symbolizer = Symbolizer()
    kthreadd = 2  # a kernel thread: its maps are empty
    assert symbolizer.snapshot(kthreadd)
    addrs = np.array([0x1000, 0x2000], dtype=np.uint64)
    assert symbolizer.outside(kthreadd, 0, addrs)
    assert symbolizer.names(kthreadd, 0, addrs) == [UNKNOWN, UNKNOWN]


def test_images_of_one_pid_are_kept_apart() -> None:
    """After an exec a pid's addresses mean something else: each image has its mappings."""
    symbolizer = Symbolizer()
    getpid = ctypes.cast(ctypes.CDLL(None).getpid, ctypes.c_void_p).value
    assert getpid and symbolizer.snapshot(os.getpid(), image=7)
    assert symbolizer.user(os.getpid(), [getpid], image=7) == ["getpid"]
    assert symbolizer.user(os.getpid(), [getpid], image=8) == [UNKNOWN]  # never read
    assert symbolizer.refresh(os.getpid(), image=7)  # same executable: read again
    assert not symbolizer.refresh(2**22 + 1)


@pytest.mark.skipif(not shutil.which("c++filt"), reason="needs binutils' c++filt")
def test_demangle_cxx_and_rust_names_only() -> None:
    names = [
        "_ZNSt6vectorIiSaIiEE9push_backERKi",
        "main",
        "_RNvNtCs1234_3std2rt10lang_start",
        "_Znot_really_mangled",
    ]
    assert demangle(names) == {
        "_ZNSt6vectorIiSaIiEE9push_backERKi": "std::vector<int, std::allocator<int> >"
        "::push_back(int const&)",
        "_RNvNtCs1234_3std2rt10lang_start": "std[3c1c0]::rt::lang_start",
    }
    assert demangle(["main", "malloc"]) == {}
