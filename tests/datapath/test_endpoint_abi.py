"""The numbers membrane.datapath.abi spells out are the ones bpf/abi/endpoint.h defines
(structs need no such check: Python builds them from the objects' BTF)."""

from __future__ import annotations

import re
from enum import IntEnum, IntFlag
from pathlib import Path

import pytest

from membrane.datapath import abi

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "abi" / "endpoint.h"


def c_enum(name: str) -> dict[str, int]:
    """Members of `enum name { ... }` in the header, prefix kept."""
    body = re.search(rf"enum {name} \{{(.*?)\}};", HEADER.read_text(), re.S)
    assert body, f"enum {name} is not in {HEADER}"
    text = re.sub(r"/\*.*?\*/", "", body.group(1), flags=re.S)
    return {m[1]: int(m[2]) for m in re.finditer(r"(\w+)\s*=\s*(\d+)", text)}


@pytest.mark.parametrize(
    ("c_name", "prefix", "py"),
    [
        ("ep_direction", "EP_DIR_", abi.Direction),
        ("reserved_identity", "IDENTITY_", abi.Identity),
        ("ct_flags", "CT_", abi.CtFlag),
        ("drop_reason", "DROP_", abi.DropReason),
        ("flow_event_type", "FLOW_EVENT_", abi.FlowEventType),
        ("flow_match", "FLOW_MATCH_", abi.FlowMatch),
    ],
)
def test_enums_match_the_header(c_name: str, prefix: str, py: type[IntEnum | IntFlag]) -> None:
    assert c_enum(c_name) == {prefix + m.name: int(m.value) for m in py}


def test_policy_key_bits_match_the_header() -> None:
    text = HEADER.read_text()
    for name in ("FIXED", "PROTO", "FULL"):
        value = re.search(rf"#define POLICY_KEY_{name}_BITS (\d+)", text)
        assert value and int(value.group(1)) == getattr(abi, f"POLICY_KEY_{name}_BITS")
