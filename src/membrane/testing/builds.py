"""Other builds of the BPF objects, for upgrade tests: the endpoint object compiled again
with extra compiler flags or with a changed struct, into a directory an agent can be
pointed at (MEMBRANE_BPF_DIR) beside links to every other object of this build.

The compiler flags are the Makefile's own (BPF_CFLAGS), read from it, so a variant differs
from `make bpf`'s object only in what the test asks for."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from membrane.bpf.object import OBJECTS_ENV, objects_dir

REPO = Path(__file__).resolve().parents[3]
__all__ = ["OBJECTS_ENV", "build_c_program", "build_endpoint_variant", "grow_struct"]


def _makefile_cflags() -> list[str]:
    """BPF_CFLAGS as make expands it."""
    rule = "print-bpf-cflags: ; @echo $(BPF_CFLAGS)"
    argv = ["make", "-s", "--no-print-directory", "-C", str(REPO), "--eval", rule]
    done = subprocess.run([*argv, "print-bpf-cflags"], capture_output=True, text=True, check=True)
    return done.stdout.split()


def _include(flag: str, source: Path) -> str:
    """An -I flag of the Makefile (relative to the repository) for the copy at `source`."""
    path = flag[2:]
    if path == "bpf" or path.startswith("bpf/"):
        return f"-I{source / path[4:]}"
    return flag if path.startswith("/") else f"-I{REPO / path}"


def grow_struct(header: Path, struct: str, field: str) -> None:
    """Put `field` (a C declaration) first in `struct`: every other field moves."""
    text = header.read_text()
    opening = f"struct {struct} {{\n"
    if opening not in text:
        raise RuntimeError(f"no struct {struct} in {header}")
    header.write_text(text.replace(opening, f"{opening}\t{field};\n", 1))


def build_endpoint_variant(
    dest: Path, extra_cflags: Sequence[str] = (), grow: Sequence[tuple[str, str]] = ()
) -> Path:
    """Build endpoint.bpf.o into `dest` from a copy of bpf/ (each (struct, field) of
    `grow` applied to bpf/abi/endpoint.h), compiled with the Makefile's flags plus
    `extra_cflags`; link this build's other objects beside it. Returns `dest`."""
    source = dest / "src"
    shutil.copytree(REPO / "bpf", source)
    for struct, field in grow:
        grow_struct(source / "abi" / "endpoint.h", struct, field)
    flags = [_include(f, source) if f.startswith("-I") else f for f in _makefile_cflags()]
    for obj in objects_dir().glob("*.bpf.o"):
        if obj.name != "endpoint.bpf.o":
            (dest / obj.name).symlink_to(obj)
    target = ["-c", str(source / "endpoint.bpf.c"), "-o", str(dest / "endpoint.bpf.o")]
    subprocess.run(["clang", *flags, *extra_cflags, *target], check=True, capture_output=True)
    return dest


def build_c_program(source: Path, dest: Path) -> Path:
    """A user-space helper (a benchmark's client or server) compiled from `source` with the
    system C compiler (cc, else clang) into the directory `dest`. Returns the executable."""
    compiler = shutil.which("cc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or clang): setup installs clang")
    out = dest / source.stem
    argv = [compiler, "-O2", "-Wall", "-o", str(out), str(source)]
    subprocess.run(argv, check=True, capture_output=True, text=True)
    return out
