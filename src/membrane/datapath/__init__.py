"""The endpoint datapath from the agent's side: the node maps every endpoint program
shares, the writers that fill them (ipcache, policy), endpoint program attachment, and
conntrack housekeeping. The kernel half is bpf/endpoint.bpf.c; the layouts are
bpf/abi/endpoint.h.

The names below load their modules on first use: the policy compiler imports
membrane.datapath.policy_entries (pure Python) without paying for libbpf and the maps.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from membrane.abi import CtFlag, Direction, DropReason, FlowEventType, FlowMatch, Identity
    from membrane.datapath.conntrack import CtEntry, entries, flush_endpoint, gc_expired
    from membrane.datapath.endpoint_prog import (
        attach_endpoint,
        detach_endpoint,
        is_attached,
        load_endpoint,
    )
    from membrane.datapath.ipcache import IpcacheSync, sync_ipcache
    from membrane.datapath.nodemaps import NodeMaps
    from membrane.datapath.policy import PolicyWriter
    from membrane.datapath.policy_entries import EndpointPolicy

_HOMES = {
    "CtFlag": "membrane.abi",
    "Direction": "membrane.abi",
    "DropReason": "membrane.abi",
    "FlowEventType": "membrane.abi",
    "FlowMatch": "membrane.abi",
    "Identity": "membrane.abi",
    "CtEntry": "membrane.datapath.conntrack",
    "entries": "membrane.datapath.conntrack",
    "flush_endpoint": "membrane.datapath.conntrack",
    "gc_expired": "membrane.datapath.conntrack",
    "attach_endpoint": "membrane.datapath.endpoint_prog",
    "detach_endpoint": "membrane.datapath.endpoint_prog",
    "is_attached": "membrane.datapath.endpoint_prog",
    "load_endpoint": "membrane.datapath.endpoint_prog",
    "IpcacheSync": "membrane.datapath.ipcache",
    "sync_ipcache": "membrane.datapath.ipcache",
    "NodeMaps": "membrane.datapath.nodemaps",
    "PolicyWriter": "membrane.datapath.policy",
    "EndpointPolicy": "membrane.datapath.policy_entries",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value  # the next access is a plain module attribute
    return value


__all__ = [
    "CtEntry",
    "CtFlag",
    "Direction",
    "DropReason",
    "EndpointPolicy",
    "FlowEventType",
    "FlowMatch",
    "Identity",
    "IpcacheSync",
    "NodeMaps",
    "PolicyWriter",
    "attach_endpoint",
    "detach_endpoint",
    "entries",
    "flush_endpoint",
    "gc_expired",
    "is_attached",
    "load_endpoint",
    "sync_ipcache",
]
