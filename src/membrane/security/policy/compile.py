"""A TracingPolicy -> one plan per hook: the load-time configuration of its program
(struct sp_hook_config, as a dict of the C field names) and the entries of its value maps.

Everything the kernel will be asked is checked here, before anything loads: the
tracepoint exists and its fields have the types the args claim, the uprobe's binary has the
symbol, kprobes may load, Override has a way to refuse the call. Any problem is a UserError
naming the field path; a policy is compiled whole or not at all.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from membrane import abi
from membrane.abi import SpAction, SpArgType, SpHookKind, SpOp, SpSetOp
from membrane.errors import UserError
from membrane.security.policy.elf import ElfError, symbol_offset
from membrane.security.policy.model import ArgSpec, Selector, TracingPolicy
from membrane.security.policy.tracefs import TracepointField, tracepoint_fields

COMMON_FIELDS = 4  # common_type, common_flags, common_preempt_count, common_pid
# Hooks whose call an Override refuses through the cgroup sock_addr hooks (EPERM).
OVERRIDE_EVENTS = {("syscalls", "sys_enter_connect"), ("syscalls", "sys_enter_sendto")}
EPERM = 1

INT_TYPES = {
    "int": True, "int8": True, "int16": True, "int32": True, "int64": True, "long": True,
    "uint8": False, "uint16": False, "uint32": False, "uint64": False, "size_t": False,
    "fd": True,
}  # fmt: skip
# Bytes each integer type means (a syscall tracepoint stores every argument in 8).
INT_WIDTHS = {"int": 4, "int8": 1, "int16": 2, "int32": 4, "uint8": 1, "uint16": 2,
              "uint32": 4, "fd": 4}  # fmt: skip
STRING_TYPES = ("string", "filename")
SOCKADDR_TYPES = ("sockaddr",)
STRING_CODES = (SpArgType.STRING, SpArgType.DATA_LOC_STRING, SpArgType.KERNEL_STRING)
STRING_OPS = {"Equal", "NotEqual", "Prefix", "NotPrefix", "Postfix", "NotPostfix"}
INT_OPS = {"Equal", "NotEqual", "GT", "LT", "GreaterThan", "LessThan", "Mask"}
SOCK_OPS = {"DPort", "NotDPort", "DAddr", "NotDAddr", "Family", "NotFamily"}
_OP_CODES = {
    "Equal": SpOp.EQUAL, "NotEqual": SpOp.NOT_EQUAL, "Prefix": SpOp.PREFIX,
    "NotPrefix": SpOp.NOT_PREFIX, "Postfix": SpOp.POSTFIX, "NotPostfix": SpOp.NOT_POSTFIX,
    "GT": SpOp.GT, "GreaterThan": SpOp.GT, "LT": SpOp.LT, "LessThan": SpOp.LT,
    "Mask": SpOp.MASK, "DPort": SpOp.DPORT, "NotDPort": SpOp.NOT_DPORT, "DAddr": SpOp.DADDR,
    "NotDAddr": SpOp.NOT_DADDR, "Family": SpOp.FAMILY, "NotFamily": SpOp.NOT_FAMILY,
}  # fmt: skip
_NS_CODES = {"Uts": 0, "Ipc": 1, "Mnt": 2, "Net": 3, "Cgroup": 4, "User": 5, "PidForChildren": 6}
_NS_PROC = {"Uts": "uts", "Ipc": "ipc", "Mnt": "mnt", "Net": "net", "Cgroup": "cgroup",
            "User": "user", "PidForChildren": "pid_for_children"}  # fmt: skip
_CAP_SETS = {"Effective": 0, "Inheritable": 1, "Permitted": 2}
_FAMILIES = {"AF_INET": 2, "AF_INET6": 10}
_ACTION_CODES = {
    "Sigkill": SpAction.SIGKILL,
    "Signal": SpAction.SIGNAL,
    "Override": SpAction.OVERRIDE,
    "Post": SpAction.POST,
    "NoPost": SpAction.NOPOST,
}
# How strongly a selector acts, for the event's action: the first of these it has.
_ACTION_ORDER = ("Sigkill", "Signal", "Override", "Post")


@dataclass(frozen=True)
class ArgInfo:
    """One argument as the events show it."""

    index: int  # as the policy numbers it
    type: SpArgType
    label: str


@dataclass
class HookPlan:
    """One program to load: where it attaches, its configuration and its map entries."""

    policy: str  # the policy's key
    where: str  # its field path, for errors found at load
    kind: SpHookKind
    target: tuple[str, ...]  # (subsystem, event) or (path, symbol)
    offset: int  # uprobe: the symbol's file offset
    config: dict[str, Any]
    args: tuple[ArgInfo, ...]
    strings: list[tuple[int, bytes, int]] = field(default_factory=list)  # id, data, bits
    binaries: list[tuple[int, int, int]] = field(default_factory=list)  # id, dev, ino
    selector_actions: list[int] = field(default_factory=list)  # per selector
    message: str = ""
    tags: tuple[str, ...] = ()

    @property
    def hook_type(self) -> str:
        return self.kind.name.lower()

    @property
    def target_text(self) -> str:
        if self.kind == SpHookKind.KPROBE:
            return self.target[0]
        first, second = self.target
        return f"{first}/{second}" if self.kind == SpHookKind.TRACEPOINT else f"{first}:{second}"

    @property
    def overrides(self) -> bool:
        return bool(self.config["has_override"])


Feature = Callable[[str], bool]


def compile_policy(policy: TracingPolicy, where: str, supports: Feature) -> list[HookPlan]:
    """Every hook of `policy`; `supports` answers feature-probe names (membrane.bpf.probe)."""
    spec = policy.spec
    plans = []
    for i, kp in enumerate(spec.kprobes):
        at = f"{where}: spec.kprobes[{i}]"
        if not supports("kprobe"):
            raise UserError(
                at,
                "kprobes cannot be attached on this kernel (`membrane probe` shows kprobe "
                "unsupported); use a tracepoint (e.g. syscalls/sys_enter_*) instead",
            )
        if kp.return_ or kp.returnArg is not None:
            raise UserError(f"{at}.return", "kretprobes are not supported by Membrane")
        func = _kernel_function(kp.call, kp.syscall, f"{at}.call")
        args = [_kprobe_arg(a, kp.syscall, f"{at}.args[{j}]") for j, a in enumerate(kp.args)]
        plan = _plan(policy, at, SpHookKind.KPROBE, (func,), 0, args, kp)
        plan.config["syscall"] = int(kp.syscall)
        _selectors(plan, kp.selectors, args, at, False, supports)
        plans.append(plan)
    for i, tp in enumerate(spec.tracepoints):
        at = f"{where}: spec.tracepoints[{i}]"
        fields = tracepoint_fields(tp.subsystem, tp.event)
        if fields is None:
            raise UserError(
                f"{at}.event", f"this kernel has no tracepoint {tp.subsystem}/{tp.event}"
            )
        args = [_tracepoint_arg(a, fields, f"{at}.args[{j}]") for j, a in enumerate(tp.args)]
        overridable = (tp.subsystem, tp.event) in OVERRIDE_EVENTS
        plan = _plan(policy, at, SpHookKind.TRACEPOINT, (tp.subsystem, tp.event), 0, args, tp)
        _selectors(plan, tp.selectors, args, at, overridable, supports)
        plans.append(plan)
    for i, up in enumerate(spec.uprobes):
        at = f"{where}: spec.uprobes[{i}]"
        path = os.path.realpath(up.path)
        if not os.path.isfile(path):
            raise UserError(f"{at}.path", f"{up.path} does not exist")
        args = [_uprobe_arg(a, f"{at}.args[{j}]") for j, a in enumerate(up.args)]
        for k, symbol in enumerate(up.symbols):
            try:
                offset = symbol_offset(path, symbol)
            except ElfError as err:
                raise UserError(f"{at}.symbols[{k}]", str(err)) from None
            plan = _plan(policy, at, SpHookKind.UPROBE, (path, symbol), offset, args, up)
            _selectors(plan, up.selectors, args, at, False, supports)
            plans.append(plan)
    return plans


# ---- args -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Arg:
    index: int
    type: SpArgType
    offset: int
    size: int  # ints: bytes; strings: slot
    label: str


def _tracepoint_arg(arg: ArgSpec, fields: list[TracepointField], at: str) -> _Arg:
    if arg.index >= len(fields):
        raise UserError(f"{at}.index", f"the tracepoint has fields 0..{len(fields) - 1}")
    f = fields[arg.index]
    if arg.index < COMMON_FIELDS:
        raise UserError(f"{at}.index", f"field {arg.index} ({f.name}) is a common field")
    kind = arg.type
    if f.is_data_loc:
        if kind not in ("auto", *STRING_TYPES):
            raise UserError(f"{at}.type", f"{f.name} is a string ({f.ctype}), not {kind}")
        return _Arg(arg.index, SpArgType.DATA_LOC_STRING, f.offset, 0, arg.label)
    if kind == "auto":
        kind = (
            "string" if f.is_pointer and "char" in f.ctype
            else "sockaddr" if f.is_pointer and "sockaddr" in f.ctype
            else ("int64" if f.signed else "uint64")
        )  # fmt: skip
    if kind in STRING_TYPES or kind in SOCKADDR_TYPES:
        if not f.is_pointer:
            raise UserError(f"{at}.type", f"{kind} needs a pointer field; {f.name} is {f.ctype}")
        return _Arg(arg.index, _type_code(kind), f.offset, 0, arg.label)
    if kind not in INT_TYPES:
        raise UserError(f"{at}.type", f"{kind!r} is not a supported argument type")
    if f.size not in (1, 2, 4, 8):
        raise UserError(f"{at}.index", f"field {f.name} is {f.size} bytes, not an integer")
    size = min(f.size, INT_WIDTHS.get(kind, 8))
    return _Arg(arg.index, _type_code(kind), f.offset, size, arg.label)


def _kernel_function(call: str, syscall: bool, at: str) -> str:
    """The symbol to attach to: `call` as given, or for a syscall its x86-64 wrapper
    (sys_openat, openat -> __x64_sys_openat), if the kernel can probe it."""
    from membrane.bpf.fs import ensure_tracefs

    try:
        with open(f"{ensure_tracefs()}/available_filter_functions") as f:
            known = {line.split()[0] for line in f if line.strip()}
    except OSError:  # a locked-down kernel hides it: its text symbols, then
        try:
            with open("/proc/kallsyms") as f:
                known = {p[2] for p in (line.split() for line in f) if p[1] in "Tt"}
        except OSError as err:
            raise UserError(at, f"cannot list the kernel's functions: {err.strerror}") from None
    candidates = [call]
    if syscall and not call.startswith("__x64_"):
        candidates.append("__x64_" + (call if call.startswith("sys_") else f"sys_{call}"))
    for name in candidates:
        if name in known:
            return name
    raise UserError(at, f"the kernel has no probe-able function {' or '.join(candidates)}")


def _kprobe_arg(arg: ArgSpec, syscall: bool, at: str) -> _Arg:
    if arg.index >= abi.SP_MAX_ARGS:
        raise UserError(f"{at}.index", f"a kprobe reads arguments 0..{abi.SP_MAX_ARGS - 1}")
    kind = "int64" if arg.type == "auto" else arg.type
    if kind in STRING_TYPES:
        code = SpArgType.STRING if syscall else SpArgType.KERNEL_STRING
        return _Arg(arg.index, code, arg.index, 0, arg.label)
    if kind in SOCKADDR_TYPES and syscall:
        return _Arg(arg.index, SpArgType.SOCKADDR, arg.index, 0, arg.label)
    if kind not in INT_TYPES:
        raise UserError(f"{at}.type", f"{kind!r} is not a supported kprobe argument type")
    return _Arg(arg.index, _type_code(kind), arg.index, 8, arg.label)


def _uprobe_arg(arg: ArgSpec, at: str) -> _Arg:
    if arg.index >= abi.SP_MAX_ARGS:
        raise UserError(f"{at}.index", f"a uprobe reads parameters 0..{abi.SP_MAX_ARGS - 1}")
    kind = "int64" if arg.type == "auto" else arg.type
    if kind not in INT_TYPES and kind not in STRING_TYPES:
        raise UserError(f"{at}.type", f"{kind!r} is not a supported uprobe argument type")
    return _Arg(arg.index, _type_code(kind), arg.index, 8, arg.label)


def _type_code(kind: str) -> SpArgType:
    if kind in STRING_TYPES:
        return SpArgType.STRING
    if kind in SOCKADDR_TYPES:
        return SpArgType.SOCKADDR
    return SpArgType.INT if INT_TYPES[kind] else SpArgType.UINT


def _plan(
    policy: TracingPolicy,
    at: str,
    kind: SpHookKind,
    target: tuple[str, ...],
    offset: int,
    args: list[_Arg],
    hook: Any,
) -> HookPlan:
    if len({a.index for a in args}) != len(args):
        raise UserError(f"{at}.args", "names an argument twice")
    specs, slot = [], 0
    for j, a in enumerate(args):
        size = a.size
        if a.type in STRING_CODES:
            if slot == 2:
                raise UserError(f"{at}.args[{j}]", "a hook reads at most two string arguments")
            size, slot = slot, slot + 1
        if a.type == SpArgType.SOCKADDR and any(b.type == SpArgType.SOCKADDR for b in args[:j]):
            raise UserError(f"{at}.args[{j}]", "a hook reads at most one sockaddr argument")
        specs.append({"offset": a.offset, "size": size, "type": int(a.type)})
    config = {
        "kind": int(kind),
        "nargs": len(args),
        "nselectors": 0,
        "scoped": int(policy.namespace is not None),
        "has_override": 0,
        "syscall": 0,
        "args": specs,
        "selectors": [],
    }
    return HookPlan(
        policy=policy.key,
        where=at,
        kind=kind,
        target=target,
        offset=offset,
        config=config,
        args=tuple(ArgInfo(a.index, a.type, a.label) for a in args),
        message=hook.message,
        tags=tuple(hook.tags),
    )


# ---- selectors ----------------------------------------------------------------------------
def _selectors(
    plan: HookPlan,
    selectors: list[Selector],
    args: list[_Arg],
    at: str,
    overridable: bool,
    supports: Feature,
) -> None:
    by_index = {a.index: (j, a) for j, a in enumerate(args)}
    ids = iter(range(1, 1 << 30))
    for s, sel in enumerate(selectors):
        here = f"{at}.selectors[{s}]"
        out: dict[str, Any] = {"args": [], "ns": [], "caps": []}
        for k, m in enumerate(sel.matchArgs):
            where = f"{here}.matchArgs[{k}]"
            if m.index not in by_index:
                raise UserError(
                    f"{where}.index", f"argument {m.index} is not among the hook's args"
                )
            position, arg = by_index[m.index]
            out["args"].append(_arg_filter(plan, m.operator, m.values, position, arg, where, ids))
        for b in sel.matchBinaries:
            binaries_id = next(ids)
            out["binaries_op"] = int(_SET_OPS[b.operator])
            out["binaries_id"] = binaries_id
            if "Prefix" in b.operator:
                _binary_prefixes(plan, binaries_id, b.values, f"{here}.matchBinaries[0]")
                continue
            for k, path in enumerate(b.values):
                try:
                    st = os.stat(path)  # follows symlinks: the binary itself
                except OSError as err:
                    raise UserError(
                        f"{here}.matchBinaries[0].values[{k}]", f"{path}: {err.strerror}"
                    ) from None
                plan.binaries.append((binaries_id, _kernel_dev(st.st_dev), st.st_ino))
        for p in sel.matchPIDs:
            if len(p.values) > abi.SP_MAX_VALUES:
                raise UserError(f"{here}.matchPIDs[0].values", f"at most {abi.SP_MAX_VALUES} pids")
            out["pids_op"] = int(SpSetOp.IN if p.operator == "In" else SpSetOp.NOT_IN)
            out["npids"] = len(p.values)
            out["pids"] = list(p.values)
            out["pids_follow_forks"] = int(p.followForks)
        for k, n in enumerate(sel.matchNamespaces):
            where = f"{here}.matchNamespaces[{k}]"
            out["ns"].append(
                {
                    "ns": _NS_CODES[n.namespace],
                    "op": int(SpSetOp.IN if n.operator == "In" else SpSetOp.NOT_IN),
                    "nvalues": len(n.values),
                    "values": [
                        _ns_inode(n.namespace, v, f"{where}.values[{j}]")
                        for j, v in enumerate(n.values)
                    ],
                }
            )
            if len(n.values) > abi.SP_MAX_VALUES:
                raise UserError(f"{where}.values", f"at most {abi.SP_MAX_VALUES} values")
        for k, c in enumerate(sel.matchCapabilities):
            mask = 0
            for j, name in enumerate(c.values):
                mask |= 1 << _capability(name, f"{here}.matchCapabilities[{k}].values[{j}]")
            out["caps"].append(
                {"set": _CAP_SETS[c.type],
                 "op": int(SpSetOp.IN if c.operator == "In" else SpSetOp.NOT_IN), "mask": mask}
            )  # fmt: skip
        _actions(plan, sel, out, here, overridable, supports)
        out["nargs"], out["nns"], out["ncaps"] = len(out["args"]), len(out["ns"]), len(out["caps"])
        plan.config["selectors"].append(out)
    plan.config["nselectors"] = len(selectors)


def _actions(
    plan: HookPlan,
    sel: Selector,
    out: dict[str, Any],
    here: str,
    overridable: bool,
    supports: Feature,
) -> None:
    names = [a.action for a in sel.matchActions] or ["Post"]
    out["post"] = int("NoPost" not in names)
    for k, action in enumerate(sel.matchActions):
        where = f"{here}.matchActions[{k}]"
        if action.action == "Sigkill":
            out["signal"] = 9
        elif action.action == "Signal":
            out["signal"] = action.argSig
        elif action.action == "Override":
            if not overridable:
                raise UserError(
                    f"{where}.action",
                    "Override needs error injection (kprobes with bpf_override_return), "
                    "which Membrane does not use; it refuses only connect/sendto "
                    "(syscalls/sys_enter_connect, sys_enter_sendto with a sockaddr arg)",
                )
            if not any(
                t == int(SpArgType.SOCKADDR) for t in (a["type"] for a in plan.config["args"])
            ):
                raise UserError(f"{where}.action", "Override on connect needs a sockaddr argument")
            if action.argError not in (None, -EPERM):
                raise UserError(
                    f"{where}.argError", f"the cgroup hook can only refuse with EPERM (-{EPERM})"
                )
            if not supports("cgroup_connect4"):
                raise UserError(f"{where}.action", "cgroup connect hooks cannot attach here")
            out["override"] = 1
            plan.config["has_override"] = 1
    if sum(n in ("Sigkill", "Signal") for n in names) > 1:
        raise UserError(f"{here}.matchActions", "one Sigkill or Signal per selector")
    strongest = next((n for n in _ACTION_ORDER if n in names), "NoPost")
    code = _ACTION_CODES
    out["action"] = int(code[strongest])
    plan.selector_actions.append(int(code[strongest]))


def _arg_filter(
    plan: HookPlan,
    operator: str,
    values: list[str],
    position: int,
    arg: _Arg,
    where: str,
    ids: Any,
) -> dict[str, Any]:
    op = _OP_CODES[operator]
    out: dict[str, Any] = {"arg": position, "op": int(op), "nvalues": 0, "map_id": 0, "values": []}
    if arg.type in STRING_CODES:
        if operator not in STRING_OPS:
            raise UserError(f"{where}.operator", f"{operator} does not apply to a string argument")
        map_id = next(ids)
        out["map_id"] = map_id
        postfix = "Postfix" in operator
        exact = operator in ("Equal", "NotEqual")
        if not postfix:
            lead = _common_prefix([v.encode() + (b"\0" if exact else b"") for v in values])[:8]
            out["lead_len"] = len(lead)
            out["lead"] = int.from_bytes(lead.ljust(8, b"\0"), "little")
        for j, v in enumerate(values):
            raw = v.encode()
            if len(raw) >= abi.SP_LPM_STR:
                raise UserError(f"{where}.values[{j}]", f"longer than {abi.SP_LPM_STR - 1} bytes")
            if postfix:
                raw = raw[::-1]
            if exact:
                raw += b"\0"  # only the whole string matches
            plan.strings.append((map_id, raw, len(raw) * 8))
        return out
    if arg.type == SpArgType.SOCKADDR:
        if operator not in SOCK_OPS:
            raise UserError(
                f"{where}.operator", f"{operator} does not apply to a sockaddr argument"
            )
        if operator in ("DAddr", "NotDAddr"):
            map_id = next(ids)
            out["map_id"] = map_id
            for j, v in enumerate(values):
                try:
                    net = ipaddress.ip_network(v, strict=False)
                except ValueError:
                    raise UserError(
                        f"{where}.values[{j}]", f"{v!r} is not an address or CIDR"
                    ) from None
                if net.version == 4:
                    mapped = b"\0" * 10 + b"\xff\xff" + net.network_address.packed
                    plan.strings.append((map_id, mapped, 96 + net.prefixlen))
                else:
                    plan.strings.append((map_id, net.network_address.packed, net.prefixlen))
            return out
        if operator in ("Family", "NotFamily"):
            ints = [_family(v, f"{where}.values[{j}]") for j, v in enumerate(values)]
        else:
            ints = [_int(v, f"{where}.values[{j}]", 0, 65535) for j, v in enumerate(values)]
        return _with_values(out, ints, where)
    if operator not in INT_OPS:
        raise UserError(f"{where}.operator", f"{operator} does not apply to an integer argument")
    if operator in ("GT", "LT", "GreaterThan", "LessThan") and len(values) != 1:
        raise UserError(f"{where}.values", f"{operator} takes exactly one value")
    signed = arg.type == SpArgType.INT
    low, high = (-(1 << 63), (1 << 63) - 1) if signed else (0, (1 << 64) - 1)
    ints = [
        _int(v, f"{where}.values[{j}]", low, high) & ((1 << 64) - 1) for j, v in enumerate(values)
    ]
    return _with_values(out, ints, where)


_SET_OPS = {
    "In": SpSetOp.IN,
    "NotIn": SpSetOp.NOT_IN,
    "Prefix": SpSetOp.PREFIX,
    "NotPrefix": SpSetOp.NOT_PREFIX,
}


def _binary_prefixes(plan: HookPlan, binaries_id: int, values: list[str], where: str) -> None:
    """Path prefixes of executables, their directories' symlinks resolved (the kernel
    walks the real path: /bin/ is /usr/bin/ where /bin links there)."""
    for k, value in enumerate(values):
        if not value.startswith("/"):
            raise UserError(f"{where}.values[{k}]", f"{value!r} is not an absolute path")
        head, tail = os.path.split(value)
        resolved = os.path.join(os.path.realpath(head), tail).encode()
        if len(resolved) >= abi.SP_LPM_STR:
            raise UserError(f"{where}.values[{k}]", f"longer than {abi.SP_LPM_STR - 1} bytes")
        plan.strings.append((binaries_id, resolved, len(resolved) * 8))


def _common_prefix(values: list[bytes]) -> bytes:
    first = min(values)
    last = max(values)
    n = 0
    while n < len(first) and first[n] == last[n]:
        n += 1
    return first[:n]


def _with_values(out: dict[str, Any], ints: list[int], where: str) -> dict[str, Any]:
    if len(ints) > abi.SP_MAX_VALUES:
        raise UserError(f"{where}.values", f"at most {abi.SP_MAX_VALUES} values")
    out["nvalues"], out["values"] = len(ints), ints
    return out


def _int(text: str, where: str, low: int, high: int) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise UserError(where, f"{text!r} is not an integer") from None
    if not low <= value <= high:
        raise UserError(where, f"{value} is not between {low} and {high}")
    return value


def _family(text: str, where: str) -> int:
    if text in _FAMILIES:
        return _FAMILIES[text]
    return _int(text, where, 0, 65535)


def _ns_inode(namespace: str, value: str, where: str) -> int:
    if value == "host_ns":
        try:
            return os.stat(f"/proc/1/ns/{_NS_PROC[namespace]}").st_ino
        except PermissionError:  # a sandbox hides init's: the agent runs in the host's
            return os.stat(f"/proc/self/ns/{_NS_PROC[namespace]}").st_ino
    return _int(value, where, 1, (1 << 32) - 1)


def _capability(name: str, where: str) -> int:
    import re

    from membrane.bpf.probe import CAPABILITIES

    known = {**_CAPABILITY_NUMBERS, **CAPABILITIES}
    if name in known:
        return known[name]
    if re.fullmatch(r"\d+", name) and int(name) < 64:
        return int(name)
    raise UserError(where, f"{name!r} is not a capability name (CAP_...)")


# linux/capability.h
_CAPABILITY_NUMBERS = {
    name: number
    for number, name in enumerate(
        [
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_DAC_READ_SEARCH",
            "CAP_FOWNER",
            "CAP_FSETID",
            "CAP_KILL",
            "CAP_SETGID",
            "CAP_SETUID",
            "CAP_SETPCAP",
            "CAP_LINUX_IMMUTABLE",
            "CAP_NET_BIND_SERVICE",
            "CAP_NET_BROADCAST",
            "CAP_NET_ADMIN",
            "CAP_NET_RAW",
            "CAP_IPC_LOCK",
            "CAP_IPC_OWNER",
            "CAP_SYS_MODULE",
            "CAP_SYS_RAWIO",
            "CAP_SYS_CHROOT",
            "CAP_SYS_PTRACE",
            "CAP_SYS_PACCT",
            "CAP_SYS_ADMIN",
            "CAP_SYS_BOOT",
            "CAP_SYS_NICE",
            "CAP_SYS_RESOURCE",
            "CAP_SYS_TIME",
            "CAP_SYS_TTY_CONFIG",
            "CAP_MKNOD",
            "CAP_LEASE",
            "CAP_AUDIT_WRITE",
            "CAP_AUDIT_CONTROL",
            "CAP_SETFCAP",
            "CAP_MAC_OVERRIDE",
            "CAP_MAC_ADMIN",
            "CAP_SYSLOG",
            "CAP_WAKE_ALARM",
            "CAP_BLOCK_SUSPEND",
            "CAP_AUDIT_READ",
            "CAP_PERFMON",
            "CAP_BPF",
            "CAP_CHECKPOINT_RESTORE",
        ]
    )
}


def _kernel_dev(st_dev: int) -> int:
    """stat's dev_t -> the kernel's s_dev (MAJOR << 20 | MINOR)."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)
