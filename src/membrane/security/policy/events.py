"""Policy hook events (struct sp_event) -> Tetragon's process_tracepoint / process_uprobe,
with typed args (string_arg, int_arg, long_arg, uint_arg, sockaddr_arg), policy_name,
action, message and tags; the process (and its pod) from the process cache."""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from membrane.abi import SpAction, SpArgType, SpHookKind
from membrane.bpf.ktime import ktime_to_unix
from membrane.security.cache import ProcessCache
from membrane.security.events import Event, envelope, fill_process
from membrane.security.policy.compile import STRING_CODES, HookPlan
from membrane.security.process import PodRef
from membrane.tetragon.tetragon import tetragon_pb2

# enum sp_action -> Tetragon's KprobeAction
ACTIONS = {
    SpAction.POST: tetragon_pb2.KPROBE_ACTION_POST,
    SpAction.NOPOST: tetragon_pb2.KPROBE_ACTION_NOPOST,
    SpAction.SIGKILL: tetragon_pb2.KPROBE_ACTION_SIGKILL,
    SpAction.SIGNAL: tetragon_pb2.KPROBE_ACTION_SIGNAL,
    SpAction.OVERRIDE: tetragon_pb2.KPROBE_ACTION_OVERRIDE,
}
_FAMILY_NAMES = {2: "AF_INET", 10: "AF_INET6"}


def policy_event(
    row: Any,
    plan: HookPlan,
    node_name: str,
    cache: ProcessCache | None,
    pod_of_netns: Any,
) -> Event:
    """One decoded sp_event row (numpy record) of hook `plan`."""
    event = envelope(node_name, int(ktime_to_unix(int(row["hdr"]["ts_ns"])) * 1e9))
    if plan.kind == SpHookKind.TRACEPOINT:
        message = event.process_tracepoint
        message.subsys, message.event = plan.target
    elif plan.kind == SpHookKind.KPROBE:
        message = event.process_kprobe
        message.function_name = plan.target[0]
    else:
        message = event.process_uprobe
        message.path, message.symbol = plan.target
        message.offset = plan.offset
    pid, tid = int(row["pid"]), int(row["tid"])
    known = cache is not None and fill_process(message, cache, pid, tid)
    if not known:
        _fill_unknown(message.process, pid, tid, int(row["uid"]), bytes(row["comm"]))
    if not message.process.HasField("pod"):
        # The namespace at the hook names the pod, whatever the process was at exec.
        pod = pod_of_netns(int(row["netns"])) if pod_of_netns else None
        if pod is not None:
            message.process.pod.CopyFrom(pod.to_proto())
    message.policy_name = plan.policy.rpartition("/")[2]
    message.action = ACTIONS.get(SpAction(int(row["action"])), tetragon_pb2.KPROBE_ACTION_POST)
    message.message = plan.message
    message.tags.extend(plan.tags)
    for position, info in enumerate(plan.args):
        message.args.append(_argument(row, position, info.type, info.label, plan))
    return event


def _fill_unknown(process: Any, pid: int, tid: int, uid: int, comm: bytes) -> None:
    """A process the cache does not know (no lifecycle monitor, or it came and went too
    fast): what the event itself says, and its binary while it still runs."""
    process.pid.value = pid
    process.tid.value = tid
    process.uid.value = uid
    try:
        process.binary = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        process.binary = comm.split(b"\0")[0].decode(errors="replace")
    process.flags = "unknown"


def _argument(row: Any, position: int, kind: SpArgType, label: str, plan: HookPlan) -> Any:
    arg = tetragon_pb2.KprobeArgument(label=label)
    value = int(row["args"][position])
    if kind in STRING_CODES:
        slot = int(plan.config["args"][position]["size"])
        text = bytes(row["strings"][slot])
        arg.string_arg = text.split(b"\0")[0].decode(errors="replace") if value else ""
    elif kind == SpArgType.SOCKADDR:
        raw = bytes(row["sockaddr"])
        family = int.from_bytes(raw[0:2], "little")
        arg.sockaddr_arg.family = _FAMILY_NAMES.get(family, str(family))
        arg.sockaddr_arg.port = int.from_bytes(raw[2:4], "big")
        if family == 2:
            arg.sockaddr_arg.addr = str(ipaddress.IPv4Address(raw[4:8]))
        elif family == 10:
            arg.sockaddr_arg.addr = str(ipaddress.IPv6Address(raw[8:24]))
    elif kind == SpArgType.INT:
        signed = value - (1 << 64) if value >= 1 << 63 else value
        if -(1 << 31) <= signed < 1 << 31:
            arg.int_arg = signed
        else:
            arg.long_arg = signed
    else:
        if value < 1 << 32:
            arg.uint_arg = value
        else:
            arg.size_arg = value
    return arg


def pod_ref(namespace: str, name: str, labels: dict[str, str]) -> PodRef:
    return PodRef(namespace, name, tuple(sorted(labels.items())))
