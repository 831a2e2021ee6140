"""Hook programs in the kernel: one security_policy object per hook plan, its selectors as
load-time constants and its values in its own maps, attached and pinned; and the cgroup
sock_addr programs (security_policy_sock) that turn an Override into EPERM.

Every hook object shares three maps pinned under the node's `security/` directory: the
event ring, its lost counter and the deny tickets the cgroup hooks read. Links are pinned
too, so a policy keeps enforcing while the agent is down; a restarted agent attaches fresh
programs first and only then unpins the old ones (both run for a moment: never neither).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from membrane.abi import SpHookKind
from membrane.bpf import BpfObject, Link
from membrane.bpf.errors import BpfError
from membrane.bpf.links import (
    BPF_CGROUP_INET4_CONNECT,
    BPF_CGROUP_INET6_CONNECT,
    BPF_CGROUP_UDP4_SENDMSG,
    attach_cgroup,
    attach_kprobe,
    attach_tracepoint,
    attach_uprobe,
)
from membrane.bpf.maps import Map
from membrane.errors import UserError
from membrane.filter.manager import encode_pin_name
from membrane.security.policy.compile import HookPlan

HOOK_OBJECT = "security_policy"
SOCK_OBJECT = "security_policy_sock"
SHARED_MAPS = ("events", "events_lost", "sp_deny")
BPF_CGROUP_UDP6_SENDMSG = BPF_CGROUP_UDP4_SENDMSG + 1
SOCK_PROGRAMS = {
    "sp_connect4": BPF_CGROUP_INET4_CONNECT,
    "sp_connect6": BPF_CGROUP_INET6_CONNECT,
    "sp_sendmsg4": BPF_CGROUP_UDP4_SENDMSG,
    "sp_sendmsg6": BPF_CGROUP_UDP6_SENDMSG,
}
EVENTS_WAKEUP_BYTES = 1  # security events are rare and a kill should be seen at once


def security_dir(bpf_dir: str) -> str:
    return os.path.join(bpf_dir, "security")


@dataclass
class LoadedHook:
    plan: HookPlan
    hook_id: int
    obj: BpfObject
    link: Link

    def scope(self) -> Map:
        return self.obj.map("sp_scope")

    def close(self, detach: bool) -> None:
        if detach:
            self.link.detach()
        else:
            self.link.close()
        self.obj.close()


@dataclass
class Loader:
    """Loads hooks for the agent. `bpf_dir` is the node's pin directory."""

    bpf_dir: str
    cgroup_root: str | None = None
    _sock_links: list[Link] = field(default_factory=list)

    @property
    def dir(self) -> str:
        return security_dir(self.bpf_dir)

    def link_dir(self, policy_key: str) -> Path:
        return Path(self.dir) / "links" / encode_pin_name(policy_key.replace("/", "%2f"))

    def load(self, plan: HookPlan, hook_id: int, pin_name: str) -> LoadedHook:
        """Load, fill and attach one hook; raises UserError naming the hook's field when the
        kernel refuses it (nothing of this hook is left behind)."""
        obj = self.prepare(plan, hook_id)
        try:
            link = self._attach(obj, plan)
        except BpfError as err:
            obj.close()
            raise UserError(plan.where, f"the kernel refused the hook: {err}") from None
        except BaseException:
            obj.close()
            raise
        path = self.link_dir(plan.policy) / pin_name
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        link.pin(str(path))
        return LoadedHook(plan, hook_id, obj, link)

    def prepare(self, plan: HookPlan, hook_id: int) -> BpfObject:
        """The hook's program loaded (its configuration and maps filled), not attached."""
        obj = BpfObject.open(HOOK_OBJECT)
        try:
            for name in SHARED_MAPS:
                obj.pin_map(name, os.path.join(self.dir, name))
            config = obj.btf.struct("sp_hook_config")()
            _fill(config, {**plan.config, "hook_id": hook_id})
            obj.set_config(sp_config=config, events_wakeup_bytes=EVENTS_WAKEUP_BYTES)
            for program in obj.programs.values():
                program.autoload = program.name == _program_of(plan)
            obj.load()
            _fill_maps(obj, plan)
        except BpfError as err:
            obj.close()
            raise UserError(plan.where, f"the kernel refused the hook: {err}") from None
        except BaseException:
            obj.close()
            raise
        return obj

    def _attach(self, obj: BpfObject, plan: HookPlan) -> Link:
        prog = obj.program(_program_of(plan))
        if plan.kind == SpHookKind.TRACEPOINT:
            return attach_tracepoint(prog, *plan.target)
        if plan.kind == SpHookKind.KPROBE:
            return attach_kprobe(prog, plan.target[0])
        return attach_uprobe(prog, plan.target[0], offset=plan.offset)

    # ---- the cgroup hooks for Override ---------------------------------------------------
    def ensure_sock_hooks(self) -> None:
        """Attach the cgroup sock_addr programs at --cgroup-root once (pinned: kept while
        the agent is down, adopted when it comes back)."""
        if self.cgroup_root is None:
            raise UserError(
                "cgroup-root",
                "Override on connect needs the agent's --cgroup-root (the cgroup whose "
                "processes policies may refuse connections to)",
            )
        pins = {name: os.path.join(self.dir, "sock", name) for name in SOCK_PROGRAMS}
        if all(os.path.exists(p) for p in pins.values()):
            return
        obj = BpfObject.open(SOCK_OBJECT)
        try:
            obj.pin_map("sp_deny", os.path.join(self.dir, "sp_deny"))
            obj.pin_map("sp_denied", os.path.join(self.dir, "sp_denied"))
            obj.load()
            for name, attach_type in SOCK_PROGRAMS.items():
                if os.path.exists(pins[name]):
                    continue
                link = attach_cgroup(obj.program(name), self.cgroup_root, attach_type)
                link.pin(pins[name])
                self._sock_links.append(link)
        except BpfError as err:
            raise UserError("cgroup-root", f"cannot attach connect hooks: {err}") from None
        finally:
            obj.close()

    def events_lost(self) -> int:
        """Events the hooks could not post (the ring was full), since the ring was made."""
        path = os.path.join(self.dir, "events_lost")
        if not os.path.exists(path):
            return 0
        with Map.from_pin(path) as m:
            return int(sum(m.lookup(0)))

    def denied(self) -> dict[int, int]:
        """Refusals per hook id so far."""
        path = os.path.join(self.dir, "sp_denied")
        if not os.path.exists(path):
            return {}
        with Map.from_pin(path) as m:
            return {int(k): int(v) for k, v in m.items()}

    def close(self) -> None:
        for link in self._sock_links:
            link.close()
        self._sock_links.clear()


def _program_of(plan: HookPlan) -> str:
    return f"sp_{plan.kind.name.lower()}"


def _fill(target: Any, values: dict[str, Any]) -> None:
    """Set a ctypes struct from a dict of its C field names (nested dicts and lists)."""
    for name, value in values.items():
        current = getattr(target, name)
        if isinstance(value, dict):
            _fill(current, value)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    _fill(current[i], item)
                else:
                    current[i] = item
        else:
            setattr(target, name, value)


def _fill_maps(obj: BpfObject, plan: HookPlan) -> None:
    strings = obj.map("sp_strings")
    key_type = strings.key_type
    for map_id, data, bits in plan.strings:
        key = key_type()
        key.prefixlen = 32 + bits
        key.map_id = map_id
        ctypes.memmove(key.data, data, len(data))
        strings.update(key, ctypes.c_uint8(1))
    binaries = obj.map("sp_binaries")
    for binaries_id, dev, ino in plan.binaries:
        key = binaries.key_type(binaries_id=binaries_id, dev=dev, ino=ino)
        binaries.update(key, ctypes.c_uint8(1))
