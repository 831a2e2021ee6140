"""Raw ctypes declarations for the system libbpf.so.1 (libbpf 1.1 ABI).

Only this module touches libbpf symbols directly. Every function returning a pointer has
`restype = c_void_p` (the int default truncates 64-bit pointers). libbpf 1.x returns
NULL + errno for pointers and -errno for ints.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char_p,
    c_int,
    c_long,
    c_size_t,
    c_uint32,
    c_uint64,
    c_void_p,
)

lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

# Enum values from the kernel UAPI that the loader needs by number.
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
BPF_F_LOCK = 4

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0

BPF_TC_INGRESS, BPF_TC_EGRESS = 1, 2


class TestRunOpts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_uint32),
        ("data_size_out", c_uint32),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint32),
        ("ctx_size_out", c_uint32),
        ("retval", c_uint32),
        ("repeat", c_int),
        ("duration", c_uint32),
        ("flags", c_uint32),
        ("cpu", c_uint32),
        ("batch_size", c_uint32),
    ]


class LinkCreateOpts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("flags", c_uint32),
        ("iter_info", c_void_p),
        ("iter_info_len", c_uint32),
        ("target_btf_id", c_uint32),
        ("cookie", c_uint64),  # first word of the perf_event/tracing union
        ("_union_rest", c_uint64 * 4),
    ]


class LinkUpdateOpts(Structure):
    _fields_ = [("sz", c_size_t), ("flags", c_uint32), ("old_prog_fd", c_uint32)]


class UprobeOpts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("ref_ctr_offset", c_size_t),
        ("bpf_cookie", c_uint64),
        ("retprobe", c_bool),
        ("func_name", c_char_p),
    ]


class TcHook(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("ifindex", c_int),
        ("attach_point", c_int),
        ("parent", c_uint32),
    ]


class TcOpts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("prog_fd", c_int),
        ("flags", c_uint32),
        ("prog_id", c_uint32),
        ("handle", c_uint32),
        ("priority", c_uint32),
    ]


class MapBatchOpts(Structure):
    _fields_ = [("sz", c_size_t), ("elem_flags", c_uint64), ("flags", c_uint64)]


class BtfType(Structure):
    """struct btf_type; kind-specific records follow it in memory."""

    _fields_ = [("name_off", c_uint32), ("info", c_uint32), ("size_or_type", c_uint32)]


def _declare(name: str, restype: object, *argtypes: object) -> None:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


PrintFn = CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)

_P = c_void_p
for _name, _res, _args in [
    ("libbpf_set_print", _P, [PrintFn]),
    ("libbpf_num_possible_cpus", c_int, []),
    ("libbpf_probe_bpf_prog_type", c_int, [c_int, _P]),
    ("libbpf_probe_bpf_map_type", c_int, [c_int, _P]),
    ("libbpf_probe_bpf_helper", c_int, [c_int, c_int, _P]),
    # objects
    ("bpf_object__open_file", _P, [c_char_p, _P]),
    ("bpf_object__load", c_int, [_P]),
    ("bpf_object__close", None, [_P]),
    ("bpf_object__name", c_char_p, [_P]),
    ("bpf_object__btf", _P, [_P]),
    ("bpf_object__next_program", _P, [_P, _P]),
    ("bpf_object__next_map", _P, [_P, _P]),
    ("bpf_object__find_program_by_name", _P, [_P, c_char_p]),
    ("bpf_object__find_map_by_name", _P, [_P, c_char_p]),
    # programs
    ("bpf_program__name", c_char_p, [_P]),
    ("bpf_program__section_name", c_char_p, [_P]),
    ("bpf_program__fd", c_int, [_P]),
    ("bpf_program__set_autoload", c_int, [_P, c_bool]),
    ("bpf_program__autoload", c_bool, [_P]),
    ("bpf_program__type", c_int, [_P]),
    ("bpf_program__set_type", c_int, [_P, c_int]),
    ("bpf_program__expected_attach_type", c_int, [_P]),
    ("bpf_program__set_expected_attach_type", c_int, [_P, c_int]),
    ("bpf_program__set_attach_target", c_int, [_P, c_int, c_char_p]),
    ("bpf_program__pin", c_int, [_P, c_char_p]),
    ("bpf_program__attach", _P, [_P]),
    ("bpf_program__attach_tracepoint", _P, [_P, c_char_p, c_char_p]),
    ("bpf_program__attach_raw_tracepoint", _P, [_P, c_char_p]),
    ("bpf_program__attach_uprobe_opts", _P, [_P, c_int, c_char_p, c_size_t, _P]),
    ("bpf_program__attach_kprobe", _P, [_P, c_bool, c_char_p]),
    ("bpf_program__attach_perf_event", _P, [_P, c_int]),
    ("bpf_program__attach_cgroup", _P, [_P, c_int]),
    # links
    ("bpf_link__fd", c_int, [_P]),
    ("bpf_link__pin", c_int, [_P, c_char_p]),
    ("bpf_link__unpin", c_int, [_P]),
    ("bpf_link__disconnect", None, [_P]),
    ("bpf_link__destroy", c_int, [_P]),
    ("bpf_link__detach", c_int, [_P]),
    ("bpf_link__update_program", c_int, [_P, _P]),
    ("bpf_link_create", c_int, [c_int, c_int, c_int, _P]),
    ("bpf_link_update", c_int, [c_int, c_int, _P]),
    ("bpf_link_detach", c_int, [c_int]),
    ("bpf_iter_create", c_int, [c_int]),
    # maps
    ("bpf_map__name", c_char_p, [_P]),
    ("bpf_map__fd", c_int, [_P]),
    ("bpf_map__type", c_int, [_P]),
    ("bpf_map__key_size", c_uint32, [_P]),
    ("bpf_map__value_size", c_uint32, [_P]),
    ("bpf_map__max_entries", c_uint32, [_P]),
    ("bpf_map__map_flags", c_uint32, [_P]),
    ("bpf_map__set_max_entries", c_int, [_P, c_uint32]),
    ("bpf_map__set_pin_path", c_int, [_P, c_char_p]),
    ("bpf_map__set_autocreate", c_int, [_P, c_bool]),
    ("bpf_map__pin_path", c_char_p, [_P]),
    ("bpf_map__is_internal", c_bool, [_P]),
    ("bpf_map__initial_value", _P, [_P, POINTER(c_size_t)]),
    ("bpf_map__btf_key_type_id", c_uint32, [_P]),
    ("bpf_map__btf_value_type_id", c_uint32, [_P]),
    ("bpf_map_lookup_elem", c_int, [c_int, _P, _P]),
    ("bpf_map_update_elem", c_int, [c_int, _P, _P, c_uint64]),
    ("bpf_map_delete_elem", c_int, [c_int, _P]),
    ("bpf_map_get_next_key", c_int, [c_int, _P, _P]),
    ("bpf_map_lookup_batch", c_int, [c_int, _P, _P, _P, _P, POINTER(c_uint32), _P]),
    ("bpf_map_update_batch", c_int, [c_int, _P, _P, POINTER(c_uint32), _P]),
    ("bpf_map_delete_batch", c_int, [c_int, _P, POINTER(c_uint32), _P]),
    ("bpf_obj_pin", c_int, [c_int, c_char_p]),
    ("bpf_obj_get", c_int, [c_char_p]),
    ("bpf_obj_get_info_by_fd", c_int, [c_int, _P, POINTER(c_uint32)]),
    ("bpf_prog_get_fd_by_id", c_int, [c_uint32]),
    ("bpf_map_get_fd_by_id", c_int, [c_uint32]),
    # test run, XDP, tc
    ("bpf_prog_test_run_opts", c_int, [c_int, _P]),
    ("bpf_xdp_attach", c_int, [c_int, c_int, c_uint32, _P]),
    ("bpf_xdp_detach", c_int, [c_int, c_uint32, _P]),
    ("bpf_xdp_query_id", c_int, [c_int, c_int, POINTER(c_uint32)]),
    ("bpf_tc_hook_create", c_int, [_P]),
    ("bpf_tc_hook_destroy", c_int, [_P]),
    ("bpf_tc_attach", c_int, [_P, _P]),
    ("bpf_tc_detach", c_int, [_P, _P]),
    ("bpf_tc_query", c_int, [_P, _P]),
    # BTF
    ("btf__parse", _P, [c_char_p, _P]),
    ("btf__load_vmlinux_btf", _P, []),
    ("btf__load_from_kernel_by_id", _P, [c_uint32]),
    ("btf__free", None, [_P]),
    ("btf__type_cnt", c_uint32, [_P]),
    ("btf__find_by_name_kind", c_int, [_P, c_char_p, c_uint32]),
    ("btf__type_by_id", _P, [_P, c_uint32]),
    ("btf__name_by_offset", c_char_p, [_P, c_uint32]),
    ("btf__resolve_size", ctypes.c_int64, [_P, c_uint32]),
]:
    _declare(_name, _res, *_args)

libc.vsnprintf.restype = c_int
libc.vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]
libc.syscall.restype = c_long


def errno_of(ret: int | None) -> int:
    """The errno of a failed libbpf call: -ret for ints, errno for NULL pointers."""
    if ret is None or ret == 0:
        return ctypes.get_errno() or 1
    return -ret if ret < 0 else ret


def strerror(err: int) -> str:
    return os.strerror(err)
