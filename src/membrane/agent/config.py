"""The agent's settings (`membrane agent run` options) and the paths derived from them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path
from typing import TYPE_CHECKING

from membrane.bpf.fs import PIN_ROOT
from membrane.errors import UserError

if TYPE_CHECKING:  # the policy package is heavy; client commands import this module
    from membrane.observe.flowlog import FlowLogSettings
    from membrane.policy.universe import AllowLocalhost
    from membrane.security.settings import SecuritySettings

DEFAULT_STATE_DIR = "/var/lib/membrane"
DEFAULT_POD_CIDR = "198.18.0.0/16"
DEFAULT_NODE_IP = "198.19.0.1"
# Documentation space (RFC 3849): pods in one /64, the node outside it.
DEFAULT_POD_CIDR_V6 = "2001:db8:1::/64"
DEFAULT_NODE_IPV6 = "2001:db8::1"
CIDR_MATCH_MODES = ("world", "all")
DEFAULT_ALLOW_LOCALHOST = "always"
DEFAULT_POLICY_MAP_MAX = 1 << 20  # POLICY_MAX_ENTRIES in bpf/lib/policy.h
DEFAULT_HUBBLE_BUFFER_SIZE = 4095  # Hubble's default ring: 2^12 - 1 flows
DEFAULT_SERVICE_CIDR = "198.19.128.0/17"  # ClusterIPs
DEFAULT_SERVICE_CIDR_V6 = "2001:db8:2::/112"
LB_ALGORITHMS = ("random", "maglev")
_DEFAULT_SERVICE_NETWORK = IPv4Network(DEFAULT_SERVICE_CIDR)
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
    monitor_aggregation: str = "medium"  # trace events: Cilium's level (datapath.monitor)
    policy_map_max: int = DEFAULT_POLICY_MAP_MAX  # entries; for a policy map created now
    pod_cidr_v6: IPv6Network | None = None  # None: IPv4-only (--ipv6=false)
    node_ipv6: IPv6Address | None = None
    kube_apiserver_ips: tuple[IPv4Address | IPv6Address, ...] = ()  # the kube-apiserver entity
    cidr_match_mode: str = "world"  # CiliumNetworkPolicy CIDR rules: world only, or pods too
    prometheus_serve_addr: str = ""  # agent metrics (cilium_*) listen address; "": off
    hubble_metrics_server: str = ""  # flow metrics (hubble_*) listen address; "": off
    hubble_socket: str = ""  # the Observer API's unix socket; "": beside the API socket
    hubble_listen_address: str = ""  # the Observer API on TCP too (Cilium's :4244); "": off
    hubble_buffer_size: int = DEFAULT_HUBBLE_BUFFER_SIZE  # flows the store keeps
    flow_log: FlowLogSettings | None = None  # --flow-log and its companions
    kernel_drops: bool = True  # flows of packets the kernel drops (membrane.agent.kernel_drops)
    security: SecuritySettings | None = None  # runtime security options; None: the defaults
    service_cidr: IPv4Network = _DEFAULT_SERVICE_NETWORK  # ClusterIPs
    service_cidr_v6: IPv6Network | None = None  # dual-stack ClusterIPs (None: IPv4-only)
    lb_algorithm: str = "random"  # services without the lb-algorithm annotation
    maglev_table_size: int = 16381  # entries of a Maglev service's table (prime)
    cgroup_root: str = ""  # cgroup v2 directory of the cgroup hooks; "": the socket LB uses
    # the cgroup2 mount's root, tracing policies none
    devices: tuple[str, ...] = ()  # the per-packet service path's devices (names, globs)
    bpf_lb_mode: str = "snat"  # NodePort traffic to other hosts' backends: snat or dsr

    @property
    def hubble_socket_path(self) -> str:
        from membrane.hubble import HUBBLE_SOCKET_NAME

        api_dir = os.path.dirname(os.path.abspath(self.api_socket))
        return self.hubble_socket or os.path.join(api_dir, HUBBLE_SOCKET_NAME)

    @property
    def ipv6(self) -> bool:
        return self.pod_cidr_v6 is not None

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
    *,
    ipv6: bool | str = True,
    pod_cidr_v6: str = DEFAULT_POD_CIDR_V6,
    node_ipv6: str = DEFAULT_NODE_IPV6,
    monitor_aggregation: str = "medium",
    kube_apiserver_ips: str = "",
    cidr_match_mode: str = "world",
    prometheus_serve_addr: str = "",
    hubble_metrics_server: str = "",
    hubble_socket: str = "",
    hubble_listen_address: str = "",
    hubble_buffer_size: int | str = DEFAULT_HUBBLE_BUFFER_SIZE,
    flow_log: str = "",
    flow_log_max_size_mb: int | str = 10,
    flow_log_max_backups: int | str = 5,
    flow_log_allowlist: str = "",
    flow_log_denylist: str = "",
    kernel_drops: bool | str = True,
    service_cidr: str = DEFAULT_SERVICE_CIDR,
    service_cidr_v6: str = DEFAULT_SERVICE_CIDR_V6,
    lb_algorithm: str = "random",
    maglev_table_size: int | str = 16381,
    cgroup_root: str = "",
    devices: str = "",
    bpf_lb_mode: str = "snat",
) -> AgentConfig:
    from membrane.metrics.address import parse_listen_address
    from membrane.policy.universe import AllowLocalhost

    cidr, node = _address_plan(pod_cidr, node_ip, 4)
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
    from membrane.datapath.monitor import parse_monitor_aggregation

    aggregation = parse_monitor_aggregation(monitor_aggregation)
    dual_stack = _parse_bool(ipv6, "ipv6")
    cidr6, node6 = _address_plan(pod_cidr_v6, node_ipv6, 6) if dual_stack else (None, None)
    apiservers = _addresses(kube_apiserver_ips, "kube-apiserver-ip")
    if not dual_stack and any(a.version == 6 for a in apiservers):
        raise UserError("kube-apiserver-ip", "IPv6 addresses need --ipv6=true")
    if cidr_match_mode not in CIDR_MATCH_MODES:
        raise UserError(
            "policy-cidr-match-mode",
            f"{cidr_match_mode!r} is not one of {', '.join(CIDR_MATCH_MODES)}",
        )
    parse_listen_address(prometheus_serve_addr, "prometheus-serve-addr")
    parse_listen_address(hubble_metrics_server, "hubble-metrics-server")
    parse_listen_address(hubble_listen_address, "hubble-listen-address")
    if hubble_socket and (hubble_socket.endswith("/") or os.path.isdir(hubble_socket)):
        raise UserError("hubble-socket", f"{hubble_socket!r} is a directory, not a socket path")
    from membrane.observe.store import check_capacity

    buffer_size = check_capacity(hubble_buffer_size, "hubble-buffer-size")
    flow_log_settings = None
    if flow_log or flow_log_allowlist or flow_log_denylist:
        from membrane.observe.flowlog import make_settings

        flow_log_settings = make_settings(
            flow_log,
            flow_log_max_size_mb,
            flow_log_max_backups,
            flow_log_allowlist,
            flow_log_denylist,
        )
    services = _service_plan(
        service_cidr, service_cidr_v6 if dual_stack else None, (cidr, cidr6), (node, node6)
    )
    from membrane.service.nodeport import check_devices, check_mode

    if lb_algorithm not in LB_ALGORITHMS:
        raise UserError("bpf-lb-algorithm", f"{lb_algorithm!r} is not one of random, maglev")
    return AgentConfig(
        state_dir=Path(state_dir),
        api_socket=api_socket,
        node_netns=node_netns,
        pod_cidr=cidr,
        node_ip=node,
        netns_prefix=netns_prefix,
        allow_localhost=AllowLocalhost(allow_localhost),
        attach=attach,
        monitor_aggregation=aggregation,
        policy_map_max=map_max,
        pod_cidr_v6=cidr6,
        node_ipv6=node6,
        kube_apiserver_ips=apiservers,
        cidr_match_mode=cidr_match_mode,
        prometheus_serve_addr=prometheus_serve_addr,
        hubble_metrics_server=hubble_metrics_server,
        hubble_socket=os.path.abspath(hubble_socket) if hubble_socket else "",
        hubble_listen_address=hubble_listen_address,
        hubble_buffer_size=buffer_size,
        flow_log=flow_log_settings,
        kernel_drops=_parse_bool(kernel_drops, "kernel-drops"),
        service_cidr=services[0],  # type: ignore[arg-type]
        service_cidr_v6=services[1],  # type: ignore[arg-type]
        lb_algorithm=lb_algorithm,
        maglev_table_size=_maglev_size(maglev_table_size),
        cgroup_root=_cgroup_dir(cgroup_root),
        devices=check_devices(devices),
        bpf_lb_mode=check_mode(bpf_lb_mode),
    )


def _cgroup_dir(path: str) -> str:
    """--cgroup-root: a directory of a cgroup v2 mount."""
    if not path:
        return ""
    if not os.path.isfile(os.path.join(path, "cgroup.procs")) or not os.path.isfile(
        os.path.join(path, "cgroup.controllers")
    ):
        raise UserError("cgroup-root", f"{path} is not a cgroup v2 directory")
    return os.path.abspath(path)


def _service_plan(
    v4: str,
    v6: str | None,
    pod_cidrs: tuple[IPv4Network | IPv6Network | None, ...],
    nodes: tuple[IPv4Address | IPv6Address | None, ...],
) -> tuple[IPv4Network | IPv6Network | None, ...]:
    """--service-cidr (and --service-cidr-v6 on dual-stack nodes): apart from the pods and
    the node."""
    found: list[IPv4Network | IPv6Network | None] = []
    for text, version, option in ((v4, 4, "service-cidr"), (v6, 6, "service-cidr-v6")):
        if text is None:
            found.append(None)
            continue
        try:
            cidr = IPv4Network(text) if version == 4 else IPv6Network(text)
        except ValueError as err:
            raise UserError(option, f"{text!r} is not an IPv{version} CIDR ({err})") from None
        if cidr.num_addresses < 4:
            raise UserError(option, f"{cidr} is too small for ClusterIPs")
        for pods in pod_cidrs:
            if pods is not None and pods.version == version and cidr.overlaps(pods):
                raise UserError(option, f"{cidr} overlaps the pod CIDR {pods}")
        for node in nodes:
            if node is not None and node in cidr:
                raise UserError(option, f"{cidr} holds the node's address {node}")
        found.append(cidr)
    return tuple(found)


def _maglev_size(value: int | str) -> int:
    from membrane.lb.maglev import MAX_SIZE, is_prime

    try:
        size = int(value)
    except ValueError:
        raise UserError("bpf-lb-maglev-table-size", f"{value!r} is not a whole number") from None
    if not is_prime(size) or not 2 < size <= MAX_SIZE:
        raise UserError(
            "bpf-lb-maglev-table-size",
            f"{size} is not a prime between 3 and {MAX_SIZE} (Cilium's default: 16381)",
        )
    return size


def _parse_bool(value: bool | str, option: str) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise UserError(option, f"{value!r} is not true or false")


def _address_plan(
    pod_cidr: str, node_ip: str, version: int
) -> tuple[IPv4Network | IPv6Network, IPv4Address | IPv6Address]:
    """The pod CIDR and node address of one family (--pod-cidr and --node-ip, or their
    -v6 twins), checked."""
    suffix = "" if version == 4 else "-v6"
    cidr_option, node_option = f"pod-cidr{suffix}", "node-ip" if version == 4 else "node-ipv6"
    network, address = (IPv4Network, IPv4Address) if version == 4 else (IPv6Network, IPv6Address)
    smallest = 30 if version == 4 else 126
    try:
        cidr = network(pod_cidr)
    except ValueError as err:
        raise UserError(cidr_option, f"{pod_cidr!r} is not an IPv{version} CIDR ({err})") from None
    if cidr.prefixlen > smallest:
        raise UserError(
            cidr_option, f"{pod_cidr} is too small for pods (use /{smallest} or larger)"
        )
    try:
        node = address(node_ip)
    except ValueError:
        raise UserError(node_option, f"{node_ip!r} is not an IPv{version} address") from None
    if node in cidr:
        raise UserError(node_option, f"{node} lies inside the pod CIDR {cidr}")
    if node.is_multicast or node.is_unspecified or (version == 6 and node.is_link_local):
        raise UserError(node_option, f"{node} is not a unicast address the node can route by")
    return cidr, node


def _addresses(text: str, option: str) -> tuple[IPv4Address | IPv6Address, ...]:
    """Comma-separated addresses."""
    found = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            found.append(ip_address(item))
        except ValueError:
            raise UserError(option, f"{item!r} is not an IP address") from None
    return tuple(found)
