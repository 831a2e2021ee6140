"""Numbers of bpf/abi/endpoint.h that Python needs by name.

Structs come from BTF (the maps carry their key and value types); enums leave no trace
in BTF unless a struct uses them, so they are spelled out here and a test compares them
with the header.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

ENDPOINT_OBJECT = "endpoint"  # bpf/endpoint.bpf.c
PROG_FROM_CONTAINER = "from_container"  # tc/tcx ingress of the node-side veth
PROG_TO_CONTAINER = "to_container"  # tc/tcx egress of the node-side veth

# The maps every endpoint program shares, pinned once per node.
NODE_MAPS = ("ipcache", "endpoints", "policy", "ct", "frags", "drops", "events", "events_lost")

POLICY_KEY_FIXED_BITS = 64  # ep_id, gen, dir, identity
POLICY_KEY_PROTO_BITS = 80  # ... pad, proto
POLICY_KEY_FULL_BITS = 96  # ... dport


class Direction(IntEnum):
    """The pod's point of view: INGRESS is traffic to the pod."""

    INGRESS = 0
    EGRESS = 1


class Identity(IntEnum):
    """Reserved identities (Cilium's numbers)."""

    ANY = 0
    HOST = 1
    WORLD = 2
    UNMANAGED = 3
    HEALTH = 4
    INIT = 5
    REMOTE_NODE = 6
    FIRST_ENDPOINT = 256
    FIRST_CIDR = 16777217


class CtFlag(IntFlag):
    SEEN_REPLY = 1
    CLOSING = 2


class DropReason(IntEnum):
    NONE = 0
    INVALID_SOURCE_IP = 132
    POLICY_DENIED = 133
    INVALID_PACKET = 134
    CT_TRUNCATED_OR_INVALID_HEADER = 135
    UNSUPPORTED_L3_PROTOCOL = 139
    FRAG_NOT_FOUND = 155
    NO_ENDPOINT_STATE = 160
    POLICY_DENY = 181


class FlowEventType(IntEnum):
    POLICY_VERDICT = 1
    DROP = 2


class FlowMatch(IntEnum):
    NONE = 0
    RULE = 1
    DEFAULT = 2
    REPLY = 3
    ESTABLISHED = 4
