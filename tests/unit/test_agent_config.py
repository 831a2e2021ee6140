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
    ],
)
def test_a_bad_value_names_its_option(options: dict, field: str, words: str) -> None:
    with pytest.raises(UserError) as err:
        config(**options)
    assert err.value.field == field and words in str(err.value), str(err.value)
