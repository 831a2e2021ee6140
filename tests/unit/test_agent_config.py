"""`membrane agent run` options as make_config checks them: dual-stack defaults, and one
clear error naming the option for each bad value."""

from __future__ import annotations

from ipaddress import IPv6Address, IPv6Network, ip_address

import pytest

from membrane.agent.config import make_config
from membrane.errors import UserError


def config(**options: object):  # type: ignore[no-untyped-def]
    return make_config("/tmp/state", "/tmp/sock", None, "198.18.0.0/16", **options)  # type: ignore[arg-type]


def test_dual_stack_by_default() -> None:
    c = config()
    assert c.ipv6
    assert c.pod_cidr_v6 == IPv6Network("2001:db8:1::/64")
    assert c.node_ipv6 == IPv6Address("2001:db8::1")
    assert (c.kube_apiserver_ips, c.cidr_match_mode) == ((), "world")


def test_ipv6_false_is_ipv4_only() -> None:
    c = config(ipv6="false")
    assert (c.ipv6, c.pod_cidr_v6, c.node_ipv6) == (False, None, None)


def test_kube_apiserver_addresses_of_both_families() -> None:
    c = config(kube_apiserver_ips="198.19.2.10, 2001:db8:ff02::10")
    assert c.kube_apiserver_ips == (ip_address("198.19.2.10"), ip_address("2001:db8:ff02::10"))


@pytest.mark.parametrize(
    ("options", "field", "words"),
    [
        ({"ipv6": "maybe"}, "ipv6", "not true or false"),
        ({"pod_cidr_v6": "2001:db8::/129"}, "pod-cidr-v6", "not an IPv6 CIDR"),
        ({"pod_cidr_v6": "198.18.0.0/16"}, "pod-cidr-v6", "not an IPv6 CIDR"),
        ({"pod_cidr_v6": "2001:db8:1::/127"}, "pod-cidr-v6", "too small"),
        ({"node_ipv6": "2001:db8:1::5"}, "node-ipv6", "inside the pod CIDR"),
        ({"node_ipv6": "fe80::1"}, "node-ipv6", "not a unicast address"),
        ({"node_ipv6": "nope"}, "node-ipv6", "not an IPv6 address"),
        ({"kube_apiserver_ips": "10.0.0.300"}, "kube-apiserver-ip", "not an IP address"),
        (
            {"kube_apiserver_ips": "2001:db8::5", "ipv6": "false"},
            "kube-apiserver-ip",
            "need --ipv6=true",
        ),
        ({"cidr_match_mode": "pods"}, "policy-cidr-match-mode", "not one of world, all"),
        ({"hubble_buffer_size": "4096"}, "hubble-buffer-size", "one less than a power of two"),
        ({"hubble_buffer_size": "lots"}, "hubble-buffer-size", "not a whole number"),
        ({"hubble_listen_address": "4244"}, "hubble-listen-address", "not HOST:PORT"),
        ({"hubble_socket": "/tmp/"}, "hubble-socket", "is a directory"),
        ({"flow_log": "/tmp/f.log", "flow_log_allowlist": "{x"}, "flow-log-allowlist", "JSON"),
        (
            {"flow_log": "/tmp/f.log", "flow_log_denylist": '{"source_ip":["nope"]}'},
            "flow-log-denylist",
            "source_ip",
        ),
        ({"flow_log": "/tmp/f.log", "flow_log_max_size_mb": "0"}, "flow-log-max-size-mb", "less"),
        ({"bpf_lb_mode": "hybrid"}, "bpf-lb-mode", "one of snat, dsr"),
        ({"devices": "eth0,bad name"}, "devices", "not a device name"),
    ],
)
def test_a_bad_value_names_its_option(options: dict, field: str, words: str) -> None:
    with pytest.raises(UserError) as err:
        config(**options)
    assert err.value.field == field and words in str(err.value), str(err.value)


def test_hubble_defaults_and_options() -> None:
    c = config()
    assert (c.hubble_buffer_size, c.hubble_listen_address, c.flow_log) == (4095, "", None)
    assert c.hubble_socket_path == "/tmp/hubble.sock"  # beside the API socket
    c = config(
        hubble_socket="/run/x/h.sock",
        hubble_buffer_size="65535",
        hubble_listen_address=":4244",
        flow_log="/tmp/flows.log",
        flow_log_max_size_mb="20",
        flow_log_max_backups="0",
        flow_log_allowlist='{"verdict":["DROPPED"]}',
    )
    assert (c.hubble_socket_path, c.hubble_buffer_size) == ("/run/x/h.sock", 65535)
    assert c.flow_log is not None
    assert (c.flow_log.path, c.flow_log.max_bytes, c.flow_log.max_backups) == (
        "/tmp/flows.log",
        20 << 20,
        0,
    )
    assert len(c.flow_log.allowlist) == 1 and c.flow_log.denylist == ()


def test_nodeport_devices_and_mode() -> None:
    assert config().devices == () and config().bpf_lb_mode == "snat"
    chosen = config(devices="eth0, ens*", bpf_lb_mode="dsr")
    assert chosen.devices == ("eth0", "ens*") and chosen.bpf_lb_mode == "dsr"
