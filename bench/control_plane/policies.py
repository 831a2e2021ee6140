"""The policies the control-plane benchmark imports: CiliumNetworkPolicy texts in the block
style kubectl prints, with ingress rules by endpoint labels or by CIDR."""

from __future__ import annotations

import random
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network

PORT = 8080  # where every probed rule admits TCP
BULK_CIDRS = IPv4Network("198.19.64.0/18")  # the /32 peers of the bulk rules
BULK_EXTERNAL = IPv4Address("198.19.100.7")  # an outside address one bulk rule names
ONE_EXTERNAL = IPv4Address("198.19.200.7")  # the outside address of the 1-rule CIDR change


def _ports(port: int) -> str:
    return f'    toPorts:\n    - ports:\n      - port: "{port}"\n        protocol: TCP\n'


def rule_from_endpoints(labels: dict[str, str], port: int = PORT) -> str:
    match = "".join(f"        {k}: {v}\n" for k, v in labels.items())
    return f"  - fromEndpoints:\n    - matchLabels:\n{match}{_ports(port)}"


def rule_from_cidr(cidr: IPv4Network | IPv4Address, port: int = PORT) -> str:
    net = IPv4Network(cidr)
    return f"  - fromCIDR:\n    - {net}\n{_ports(port)}"


def cnp(name: str, namespace: str, selector: dict[str, str], rules: Sequence[str]) -> str:
    """A CiliumNetworkPolicy in the block style kubectl prints, with `rules` as its
    ingress section."""
    match = "".join(f"      {k}: {v}\n" for k, v in selector.items())
    return (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
        f"metadata:\n  name: {name}\n  namespace: {namespace}\n"
        f"spec:\n  endpointSelector:\n    matchLabels:\n{match}  ingress:\n" + "".join(rules)
    )


def bulk_rules(count: int, seed: int = 11) -> list[str]:
    """`count` ingress rules: 90 % `fromCIDR` with one distinct /32 of 198.19.64.0/18 on
    TCP 8080 (among them BULK_EXTERNAL, in the middle), 10 % `fromEndpoints role=client`
    each on its own TCP port from 10000 up, and last `fromEndpoints role=bulk` on TCP 8080:
    the rule the probes check (with the CIDR one)."""
    if count < 2:
        raise ValueError("a bulk policy has at least 2 rules (the probed ones)")
    rng = random.Random(seed)
    body = count - 1
    endpoint_rules = body // 10
    cidr_count = body - endpoint_rules
    pool = [a for a in BULK_CIDRS if a != BULK_EXTERNAL]
    addresses = rng.sample(pool, max(0, cidr_count - 1))
    if cidr_count:
        addresses.insert(len(addresses) // 2, BULK_EXTERNAL)
    rules = [rule_from_cidr(a) for a in addresses]
    for i in range(endpoint_rules):  # spread through the list
        rules.insert(i * 10 + 9, rule_from_endpoints({"role": "client"}, 10000 + i))
    rules.append(rule_from_endpoints({"role": "bulk"}))
    return rules
