"""Names of the endpoint datapath's object, programs and node maps (bpf/endpoint.bpf.c).

Numbers shared with the kernel are not here: membrane.abi has them, generated from the
objects' BTF. Structs come from BTF too (the maps carry their key and value types).
"""

from __future__ import annotations

ENDPOINT_OBJECT = "endpoint"  # bpf/endpoint.bpf.c
PROG_FROM_CONTAINER = "from_container"  # tc/tcx ingress of the node-side veth
PROG_TO_CONTAINER = "to_container"  # tc/tcx egress of the node-side veth

# The maps every endpoint program shares, pinned once per node.
NODE_MAPS = (
    "ipcache",
    "ipcache6",
    "endpoints",
    "policy",
    "ct",
    "ct6",
    "drops",
    "forwards",
    "monitor_config",
    "events",
    "events_lost",
)
# Each endpoint object's own fragment records (unpinned: they go with its programs).
FRAGS_INGRESS = "frags_ingress"
FRAGS_EGRESS = "frags_egress"
FRAGS6_INGRESS = "frags6_ingress"
FRAGS6_EGRESS = "frags6_egress"
