#!/usr/bin/env python3
"""Writes src/membrane/abi.py: every number C shares with Python, read from the objects' BTF.

The C headers in bpf/abi/ are the one source. Each enum they export (ABI_EXPORT_ENUM, see
bpf/abi/export.h) is in the BTF of every object that includes the header; this script reads
those enums with `bpftool btf dump -j` and writes them as Python classes, named by the table
below. `make bpf` runs it after building the objects (stdlib only: no venv needed yet).

    python3 scripts/gen_abi.py src/membrane/bpfobj/*.bpf.o > src/membrane/abi.py

An exported enum missing from the table, or the same enum with other values in two objects
(a stale object), stops the build.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

EXPORT_PREFIX = "__abi_enum_"  # ABI_EXPORT_ENUM(tag) declares `enum tag *__abi_enum_tag`


class PyEnum(NamedTuple):
    c_name: str  # enum tag in bpf/abi/*.h
    py_name: str  # the Python class
    prefix: str  # what the class's member names drop from the enumerators' names
    base: str  # IntEnum or IntFlag
    doc: str


ENUMS = (
    PyEnum(
        "ep_direction",
        "Direction",
        "EP_DIR_",
        "IntEnum",
        "The pod's point of view: INGRESS is traffic to the pod.",
    ),
    PyEnum(
        "reserved_identity",
        "Identity",
        "IDENTITY_",
        "IntEnum",
        "Reserved identities (Cilium's numbers), and where endpoint and CIDR ones start.",
    ),
    PyEnum(
        "ip_proto",
        "IpProto",
        "IP_PROTO_",
        "IntEnum",
        "Layer-4 protocols the endpoint datapath reads ports of, and policies name.",
    ),
    PyEnum("ct_flags", "CtFlag", "CT_", "IntFlag", "ct_entry.flags."),
    PyEnum(
        "drop_reason",
        "DropReason",
        "DROP_",
        "IntEnum",
        "Why the endpoint datapath dropped a packet (Hubble's numbers where it has them).",
    ),
    PyEnum("flow_event_type", "FlowEventType", "FLOW_EVENT_", "IntEnum", "flow_event.h.type."),
    PyEnum("flow_match", "FlowMatch", "FLOW_MATCH_", "IntEnum", "What decided a flow's verdict."),
    PyEnum(
        "trace_mode",
        "TraceMode",
        "TRACE_MODE_",
        "IntEnum",
        "monitor_config.trace_mode: which forwarded packets are traced.",
    ),
    PyEnum("filter_stat", "FilterStat", "FILTER_STAT_", "IntEnum", "Index of filter_stats."),
    PyEnum(
        "filter_event_type",
        "FilterEventType",
        "FILTER_EVENT_",
        "IntEnum",
        "filter_event.hdr.type.",
    ),
    PyEnum("filter_hook", "FilterHook", "FILTER_HOOK_", "IntEnum", "Where a filter program runs."),
    PyEnum(
        "filter_xdp_mode",
        "FilterXdpMode",
        "FILTER_XDP_MODE_",
        "IntEnum",
        "How an XDP filter was attached.",
    ),
    PyEnum(
        "filter_feature",
        "FilterFeature",
        "FILTER_FEATURE_",
        "IntFlag",
        "What a loaded filter program enforces.",
    ),
    PyEnum(
        "trace_event_type",
        "TraceEventType",
        "TRACE_EVENT_",
        "IntEnum",
        "event_header.type of the trace tools' events.",
    ),
    PyEnum("exec_flags", "ExecFlag", "EXEC_", "IntFlag", "exec_event.flags."),
    PyEnum("lb_stat", "LbStat", "LB_STAT_", "IntEnum", "Index of lb_stats (membrane lb)."),
    PyEnum("svc_scope", "SvcScope", "SVC_SCOPE_", "IntEnum", "svc_frontend_key.scope."),
    PyEnum("svc_frontend_flag", "SvcFrontendFlag", "SVC_FE_", "IntFlag", "svc_frontend.flags."),
    PyEnum("svc_set_flag", "SvcSetFlag", "SVC_SET_", "IntFlag", "svc_set.flags."),
    PyEnum("svc_backend_state", "BackendState", "SVC_BACKEND_", "IntEnum", "svc_backend.state."),
    PyEnum("svc_sock_dir", "SvcSockDir", "SVC_SOCK_", "IntEnum", "svc_sock_key.dir."),
    PyEnum("svc_nat_dir", "SvcNatDir", "SVC_NAT_", "IntEnum", "svc_nat keys' dir."),
    PyEnum("np_mode", "NodePortMode", "NP_MODE_", "IntEnum", "nodeport.bpf.c's np_mode."),
    PyEnum("np_kind", "NodePortKind", "NP_KIND_", "IntEnum", "np_flow.kind."),
    PyEnum("np_stat", "NodePortStat", "NP_STAT_", "IntEnum", "np_stats indexes."),
    PyEnum("sec_proc_event_type", "SecProcEventType", "SEC_PROC_", "IntEnum", "Event types."),
    PyEnum("sec_proc_flags", "SecProcFlag", "SEC_PROC_", "IntFlag", "sec_proc_event.flags."),
    PyEnum("sp_hook_kind", "SpHookKind", "SP_HOOK_", "IntEnum", "sp_hook_config.kind."),
    PyEnum("sp_arg_type", "SpArgType", "SP_ARG_", "IntEnum", "sp_arg_spec.type."),
    PyEnum("sp_op", "SpOp", "SP_OP_", "IntEnum", "sp_arg_filter.op (matchArgs operators)."),
    PyEnum("sp_action", "SpAction", "SP_ACTION_", "IntEnum", "A TracingPolicy selector's action."),
    PyEnum("sp_set_op", "SpSetOp", "SP_SET_", "IntEnum", "In/NotIn of pids, binaries, ns, caps."),
)
# Enums that only carry constants: each enumerator becomes a module constant of its C name.
CONSTANTS = (
    "dir24_layout",
    "drop_monitor_abi",
    "event_abi",
    "filter_guard",
    "lb_limits",
    "np_limits",
    "policy_key_bits",
    "profile_abi",
    "sp_abi",
    "svc_limits",
    "sys_abi",
    "sec_proc_abi",
)

HEADER = '''"""Numbers shared with the kernel: the enums of bpf/abi/*.h, read from the BTF of the
built objects. Generated by scripts/gen_abi.py (`make bpf`): do not edit, change the header
and rebuild; tests/datapath/test_abi.py checks header, objects and this module agree."""

from enum import IntEnum, IntFlag
'''


def exported_enums(obj: Path) -> dict[str, dict[str, int]]:
    """tag -> {enumerator: value} of the enums `obj` exports."""
    out = subprocess.run(
        ["bpftool", "-j", "btf", "dump", "file", str(obj), "format", "raw"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    types = {t["id"]: t for t in json.loads(out)["types"]}
    found = {}
    for t in types.values():
        if t["kind"] != "VAR" or not t["name"].startswith(EXPORT_PREFIX):
            continue
        enum = types[types[t["type_id"]]["type_id"]]  # VAR -> PTR -> ENUM
        if enum["kind"] != "ENUM" or enum["size"] != 4:
            sys.exit(f"{obj}: {t['name']} does not point at a 4-byte enum")
        # clang 14 records no signedness: read the 32 bits as the int C gives them.
        found[enum["name"]] = {v["name"]: _int32(v["val"]) for v in enum["values"]}
    return found


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def merged(objects: list[Path]) -> dict[str, dict[str, int]]:
    enums: dict[str, dict[str, int]] = {}
    seen_in: dict[str, Path] = {}
    for obj in objects:
        for tag, values in exported_enums(obj).items():
            if tag in enums and enums[tag] != values:
                sys.exit(f"enum {tag} differs between {seen_in[tag]} and {obj}: rebuild both")
            enums[tag], seen_in[tag] = values, seen_in.get(tag, obj)
    return enums


def render(enums: dict[str, dict[str, int]]) -> str:
    named = {e.c_name for e in ENUMS} | set(CONSTANTS)
    if unknown := sorted(set(enums) - named):
        sys.exit(f"exported enums {unknown} have no Python name: add them to {__file__}")
    if missing := sorted(named - set(enums)):
        sys.exit(f"enums {missing} are named in {__file__} but no object exports them")
    parts = [HEADER]
    for e in ENUMS:
        lines = [f"class {e.py_name}({e.base}):", f'    """{e.doc}"""', ""]
        for c_name, value in enums[e.c_name].items():
            if not c_name.startswith(e.prefix):
                sys.exit(f"enum {e.c_name}: {c_name} does not start with {e.prefix}")
            lines.append(f"    {c_name.removeprefix(e.prefix)} = {value}")
        parts.append("\n\n" + "\n".join(lines) + "\n")
    parts.append("\n\n")
    for tag in CONSTANTS:
        parts.extend(f"{c_name} = {value}\n" for c_name, value in enums[tag].items())
    sources = [f'    "{e.c_name}": ({e.py_name}, "{e.prefix}"),\n' for e in ENUMS]
    sources += [f'    "{tag}": (None, ""),\n' for tag in CONSTANTS]
    parts.append(
        '\n# C enum -> (its class, the prefix members drop), or (None, "") when its\n'
        "# enumerators are the module constants of the same names.\n"
        "SOURCES: dict[str, tuple[type[IntEnum | IntFlag] | None, str]] = {\n"
        + "".join(sources)
        + "}\n"
    )
    return "".join(parts)


def main() -> None:
    objects = [Path(a) for a in sys.argv[1:]]
    if not objects:
        sys.exit(__doc__)
    sys.stdout.write(render(merged(objects)))


if __name__ == "__main__":
    main()
