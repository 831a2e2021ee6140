"""A tracepoint's record layout, from its tracefs `format` file: where each field is, how
big, signed or not, and its C type (which says whether it points to a string or to a
sockaddr). TracingPolicy args name fields by their index in this list, common fields
included, as Tetragon numbers them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from membrane.bpf.fs import ensure_tracefs

_FIELD = re.compile(
    r"field:(?P<decl>[^;]+);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);"
    r"\s*signed:(?P<signed>\d+);"
)


@dataclass(frozen=True)
class TracepointField:
    index: int
    name: str
    ctype: str
    offset: int
    size: int
    signed: bool

    @property
    def is_pointer(self) -> bool:
        return "*" in self.ctype

    @property
    def is_data_loc(self) -> bool:
        """A string kept in the record itself (`__data_loc char[]`)."""
        return self.ctype.startswith("__data_loc")


def tracepoint_fields(subsystem: str, event: str) -> list[TracepointField] | None:
    """The fields of `subsystem/event`, or None when this kernel has no such tracepoint."""
    path = f"{ensure_tracefs()}/events/{subsystem}/{event}/format"
    try:
        with open(path) as f:
            text = f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None
    fields = []
    for m in _FIELD.finditer(text):
        decl = m["decl"].strip()
        ctype, _, name = decl.rpartition(" ")
        name = name.split("[")[0].lstrip("*")
        if "*" in name or decl.endswith("*"):
            ctype += " *"
        fields.append(
            TracepointField(
                len(fields), name, ctype, int(m["offset"]), int(m["size"]), m["signed"] == "1"
            )
        )
    return fields
