"""The agent's settings (`membrane agent run` options) and the paths derived from them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import TYPE_CHECKING

from membrane.bpf.fs import PIN_ROOT
from membrane.errors import UserError

if TYPE_CHECKING:  # the policy package is heavy; client commands import this module
    from membrane.policy.universe import AllowLocalhost

DEFAULT_STATE_DIR = "/var/lib/membrane"
DEFAULT_POD_CIDR = "198.18.0.0/16"
DEFAULT_NODE_IP = "198.19.0.1"
DEFAULT_ALLOW_LOCALHOST = "always"
DEFAULT_POLICY_MAP_MAX = 1 << 20  # POLICY_MAX_ENTRIES in bpf/lib/policy.h
MAX_MAP_ENTRIES = 0xFFFFFFFF  # the kernel's max_entries is 32 bits
_NETNS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    api_socket: str
    node_netns: str | None
    pod_cidr: IPv4Network
    node_ip: IPv4Address
    netns_prefix: str = ""
    cluster: str = "default"
    allow_localhost: AllowLocalhost | str = DEFAULT_ALLOW_LOCALHOST  # make_config: the enum
    attach: str = "auto"  # endpoint programs: auto (tcx where the kernel has it), tcx, clsact
    policy_map_max: int = DEFAULT_POLICY_MAP_MAX  # entries; for a policy map created now

    @property
    def node_name(self) -> str:
        return self.node_netns or "host"

    @property
    def bpf_dir(self) -> str:
        """Pinned maps and links of this node's datapath."""
        return os.path.join(PIN_ROOT, "agent", self.node_name.replace(".", "%2e"))

    def pod_netns(self, namespace: str, name: str) -> str:
        return f"{self.netns_prefix}{namespace}-{name}"


def make_config(
    state_dir: str,
    api_socket: str,
    node_netns: str | None,
    pod_cidr: str,
    node_ip: str = DEFAULT_NODE_IP,
    netns_prefix: str = "",
    allow_localhost: str = DEFAULT_ALLOW_LOCALHOST,
    attach: str = "auto",
    policy_map_max: int | str = DEFAULT_POLICY_MAP_MAX,
) -> AgentConfig:
    from membrane.policy.universe import AllowLocalhost

    try:
        cidr = IPv4Network(pod_cidr)
    except ValueError as err:
        raise UserError("pod-cidr", f"{pod_cidr!r} is not an IPv4 CIDR ({err})") from None
    if cidr.prefixlen > 30:
        raise UserError("pod-cidr", f"{pod_cidr} is too small for pods (use /30 or larger)")
    try:
        node = IPv4Address(node_ip)
    except ValueError:
        raise UserError("node-ip", f"{node_ip!r} is not an IPv4 address") from None
    if node in cidr:
        raise UserError("node-ip", f"{node} lies inside the pod CIDR {cidr}")
    if node_netns is not None and not _NETNS_NAME.match(node_netns):
        raise UserError("node-netns", f"{node_netns!r} is not a usable namespace name")
    if netns_prefix and not _NETNS_NAME.match(netns_prefix):
        raise UserError("netns-prefix", f"{netns_prefix!r} is not a usable name prefix")
    modes = [str(mode) for mode in AllowLocalhost]
    if allow_localhost not in modes:
        raise UserError("allow-localhost", f"{allow_localhost!r} is not one of {', '.join(modes)}")
    from membrane.bpf.links import TC_MODES

    if attach not in TC_MODES:
        raise UserError("attach", f"{attach!r} is not one of {', '.join(TC_MODES)}")
    try:
        map_max = int(policy_map_max)
    except ValueError:
        raise UserError("policy-map-max", f"{policy_map_max!r} is not a whole number") from None
    if not 1 <= map_max <= MAX_MAP_ENTRIES:
        raise UserError("policy-map-max", f"{map_max} is not between 1 and {MAX_MAP_ENTRIES}")
    return AgentConfig(
        state_dir=Path(state_dir),
        api_socket=api_socket,
        node_netns=node_netns,
        pod_cidr=cidr,
        node_ip=node,
        netns_prefix=netns_prefix,
        allow_localhost=AllowLocalhost(allow_localhost),
        attach=attach,
        policy_map_max=map_max,
    )
