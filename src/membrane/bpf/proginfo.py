"""What the kernel tells about a loaded program (struct bpf_prog_info): its id, name, tag
and the maps it uses. The tag is a hash of the program's instructions with map references
blanked, so two loads of one build share it whatever their maps and load-time constants,
and a different build has another: it says whether an attached program is the one we
would load now."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from membrane.bpf import _libbpf as L
from membrane.bpf.errors import BpfError


class _ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info, up to the name."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


@dataclass(frozen=True)
class ProgramInfo:
    id: int
    name: str
    tag: str  # hex, as bpftool prints it
    map_ids: tuple[int, ...]


def _info(fd: int, info: _ProgInfo) -> None:
    size = ctypes.c_uint32(ctypes.sizeof(info))
    ret = L.lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
    if ret:
        raise BpfError("bpf_obj_get_info_by_fd(program)", L.errno_of(ret))


def program_info(fd: int) -> ProgramInfo:
    info = _ProgInfo()
    _info(fd, info)  # tells how many maps there are
    ids = (ctypes.c_uint32 * info.nr_map_ids)()
    info = _ProgInfo(nr_map_ids=len(ids), map_ids=ctypes.addressof(ids))
    _info(fd, info)
    return ProgramInfo(info.id, info.name.decode(), bytes(info.tag).hex(), tuple(ids))


def program_info_by_id(prog_id: int) -> ProgramInfo | None:
    """The program with this id, or None when it is gone."""
    fd = L.lib.bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return None
    try:
        return program_info(fd)
    finally:
        os.close(fd)
