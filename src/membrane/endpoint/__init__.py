"""Endpoints' Linux plumbing (no BPF): the node side, pods' namespaces and veths, pod
address management, and an "outside world" namespace for tests and the demo."""

from membrane.endpoint.ipam import Ipam
from membrane.endpoint.node import HOST_DEVICE, NodeInfo, delete_node_link, setup_node
from membrane.endpoint.plumbing import (
    POD_IFNAME,
    PodLink,
    WarmPair,
    create_pod,
    delete_pod,
    inspect_pod,
    make_warm_pair,
    pod_exists,
    pod_problem,
)
from membrane.endpoint.world import ExternalHost, add_external_host, remove_external_host

__all__ = [
    "HOST_DEVICE",
    "POD_IFNAME",
    "ExternalHost",
    "Ipam",
    "NodeInfo",
    "PodLink",
    "WarmPair",
    "add_external_host",
    "create_pod",
    "delete_node_link",
    "delete_pod",
    "inspect_pod",
    "make_warm_pair",
    "pod_exists",
    "pod_problem",
    "remove_external_host",
    "setup_node",
]
