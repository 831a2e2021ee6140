"""Network namespaces and topologies: the one helper that tests, benchmarks, the demo and
the agent use to build namespaces, veths and addresses, run code and programs inside a
namespace, and clean all of it up."""

from membrane.netns.links import (
    add_address,
    add_route,
    add_veth,
    delete_link,
    find_link,
    set_up,
)
from membrane.netns.namespace import create, delete, exists, ifindex, inside, names, path
from membrane.netns.probe import listening, ping, wait_listening, wait_ping
from membrane.netns.process import CommandError, command, popen, run, stop
from membrane.netns.sysctl import disable_ipv6, enable_ipv6, read_sysctl, write_sysctl
from membrane.netns.topology import Iface, Pair, Topology, next_subnet

__all__ = [
    "CommandError",
    "Iface",
    "Pair",
    "Topology",
    "add_address",
    "add_route",
    "add_veth",
    "command",
    "create",
    "delete",
    "delete_link",
    "disable_ipv6",
    "enable_ipv6",
    "exists",
    "find_link",
    "ifindex",
    "inside",
    "listening",
    "names",
    "next_subnet",
    "path",
    "ping",
    "popen",
    "read_sysctl",
    "run",
    "set_up",
    "stop",
    "wait_listening",
    "wait_ping",
    "write_sysctl",
]
