"""One source for every number shared with the kernel: the enums of bpf/abi/*.h.

The chain is header -> objects' BTF (ABI_EXPORT_ENUM) -> membrane.abi (generated from the
BTF by `make bpf`). Each link is checked against the previous one, so a C value that
changes without Python following (or a stale build) fails here; and no Python module may
spell one of those numbers out again. Needs the built objects, not root.
"""

from __future__ import annotations

import ast
import re
import socket
from enum import Enum
from pathlib import Path

import pytest

from membrane import abi
from membrane.bpf.btf import Btf
from membrane.bpf.object import objects_dir

ROOT = Path(__file__).resolve().parents[2]
HEADERS = sorted((ROOT / "bpf" / "abi").glob("*.h"))
OBJECTS = sorted(objects_dir().glob("*.bpf.o"))


def header_enums(header: Path) -> dict[str, dict[str, int]]:
    """tag -> enumerators of every `enum tag { ... };` in a header. Values are integer
    literals or IPPROTO_* names (resolved through libc: the kernel's numbers too)."""
    text = re.sub(r"/\*.*?\*/", "", header.read_text(), flags=re.S)
    out = {}
    for tag, body in re.findall(r"enum (\w+) \{(.*?)\};", text, re.S):
        values = {}
        for name, value in re.findall(r"(\w+)\s*=\s*([-\w]+)", body):
            values[name] = getattr(socket, value) if value.startswith("IPPROTO_") else int(value)
        out[tag] = values
    return out


HEADER_ENUMS = {tag: values for h in HEADERS for tag, values in header_enums(h).items()}


@pytest.fixture(scope="module")
def exported() -> dict[str, dict[str, dict[str, int]]]:
    """object name -> the enums its BTF exports."""
    if not OBJECTS:
        pytest.skip(f"no BPF objects in {objects_dir()}: run `make bpf`")
    out = {}
    for obj in OBJECTS:
        btf = Btf.from_file(obj)
        try:
            out[obj.name] = btf.exported_enums()
        finally:
            btf.close()
    return out


def test_the_headers_have_enums() -> None:
    """Guards the parser above: an empty result would make every test below vacuous."""
    assert {"ep_direction", "reserved_identity", "drop_reason", "filter_hook"} <= set(HEADER_ENUMS)
    assert HEADER_ENUMS["profile_abi"]["PROFILE_NO_STACK"] == -1


def test_every_enum_of_the_headers_is_exported(exported: dict) -> None:
    in_btf = {tag for enums in exported.values() for tag in enums}
    assert set(HEADER_ENUMS) <= in_btf, "add ABI_EXPORT_ENUM(tag) after the enum"


def test_objects_carry_the_headers_values(exported: dict) -> None:
    """A mismatch means a stale object: `make bpf`."""
    for obj, enums in exported.items():
        for tag, values in enums.items():
            assert values == HEADER_ENUMS[tag], f"{obj}: enum {tag}"


def test_python_follows_the_objects(exported: dict) -> None:
    """Every exported enum is in membrane.abi with exactly the objects' enumerators."""
    for obj, enums in exported.items():
        for tag, values in enums.items():
            assert tag in abi.SOURCES, f"{obj}: enum {tag} is not in membrane.abi: `make bpf`"
            cls, prefix = abi.SOURCES[tag]
            if cls is None:
                python = {name: getattr(abi, name, None) for name in values}
            else:
                python = {prefix + m.name: m.value for m in cls.__members__.values()}
            assert python == values, f"{obj}: enum {tag} (membrane.abi is stale: `make bpf`)"


def test_python_has_nothing_the_objects_lack(exported: dict) -> None:
    in_btf = {tag for enums in exported.values() for tag in enums}
    assert set(abi.SOURCES) == in_btf


# ---- no hand copies ------------------------------------------------------------------
def _abi_numbers() -> dict[str, int]:
    """C name -> value of every enumerator the headers share."""
    return {name: v for values in HEADER_ENUMS.values() for name, v in values.items()}


def _int_assignments(tree: ast.Module) -> list[tuple[str, int, int]]:
    """(name, value, line) of module- and class-level assignments of integer literals,
    including `A, B = 1, 2`."""
    found = []
    bodies = [tree.body] + [n.body for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    for body in bodies:
        for node in body:
            if not isinstance(node, ast.Assign | ast.AnnAssign) or node.value is None:
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                pairs = [(target, node.value)]
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    pairs = list(zip(target.elts, node.value.elts, strict=False))
                for name, value in pairs:
                    number = _literal_int(value)
                    if isinstance(name, ast.Name) and number is not None:
                        found.append((name.id, number, node.lineno))
    return found


def _literal_int(node: ast.expr) -> int | None:
    try:
        value = ast.literal_eval(node)
    except ValueError:
        return None
    return value if type(value) is int else None


def _copies(name: str, value: int, numbers: dict[str, int]) -> str | None:
    """The C enumerator a Python name copies: the same value under the same name, or a
    name the C one ends with (DROP_POLICY_DENY as POLICY_DENY, _ARG_CUT for EXEC_ARG_CUT)."""
    bare = name.strip("_")
    for c_name, c_value in numbers.items():
        if c_value == value and (c_name == bare or c_name.endswith("_" + bare)):
            return c_name
    return None


def test_no_module_spells_out_an_abi_number() -> None:
    numbers = _abi_numbers()
    generated = {e.__name__ for e, _ in abi.SOURCES.values() if e is not None}
    copies = []
    for path in sorted((ROOT / "src" / "membrane").rglob("*.py")):
        if path == Path(abi.__file__):
            continue
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(ROOT)
        for name, value, line in _int_assignments(tree):
            if c_name := _copies(name, value, numbers):
                copies.append(f"{where}:{line}: {name} = {value} copies {c_name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name in generated:
                copies.append(f"{where}:{node.lineno}: class {node.name} twins membrane.abi")
    assert not copies, "import them from membrane.abi instead:\n" + "\n".join(copies)


def test_the_guard_sees_copies() -> None:
    tree = ast.parse("class X:\n    POLICY_DENY = 181\n_ARGS_MORE, _ARG_CUT = 1, 2\nY = 181\n")
    numbers = _abi_numbers()
    found = {n for n, v, _ in _int_assignments(tree) if _copies(n, v, numbers)}
    assert found == {"POLICY_DENY", "_ARGS_MORE", "_ARG_CUT"}


def test_generated_classes_are_enums() -> None:
    for cls, _ in abi.SOURCES.values():
        assert cls is None or issubclass(cls, Enum)
