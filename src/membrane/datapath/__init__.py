"""The endpoint datapath from the agent's side: the node maps every endpoint program
shares, the writers that fill them (ipcache, policy), endpoint program attachment, and
conntrack housekeeping. The kernel half is bpf/endpoint.bpf.c; the layouts are
bpf/abi/endpoint.h."""

from membrane.datapath.abi import (
    CtFlag,
    Direction,
    DropReason,
    FlowEventType,
    FlowMatch,
    Identity,
)
from membrane.datapath.conntrack import CtEntry, entries, flush_endpoint, gc_expired
from membrane.datapath.endpoint_prog import (
    attach_endpoint,
    detach_endpoint,
    is_attached,
    load_endpoint,
)
from membrane.datapath.ipcache import IpcacheSync, sync_ipcache
from membrane.datapath.nodemaps import NodeMaps
from membrane.datapath.policy import EndpointPolicy, PolicyWriter

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
