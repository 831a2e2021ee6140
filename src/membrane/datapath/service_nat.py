"""What the endpoint programs' per-packet ClusterIP translation (bpf/lib/service_nat.h)
needs at load: the service CIDRs as load-time constants, and the service maps it reads
and writes, pinned with the socket LB's under <pin_dir>/services (svc_nat and svc_nat6
are the endpoint programs' own; the others are shared with the socket LB and nodeport).

The constants are the agent's (--service-cidr, --service-cidr-v6): the same for every
endpoint, so programs loaded ahead for the next endpoint stay good for it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network

from membrane.bpf import BpfObject

SERVICE_PIN_SUBDIR = "services"  # membrane.service.socklb.PIN_SUBDIR
_PREFIX = "svc_"

# No CIDR: a network of all ones under a mask of zero matches no address.
_OFF4 = {"svc_net4": b"\xff" * 4, "svc_mask4": bytes(4)}
_OFF6 = {"svc_net6": b"\xff" * 16, "svc_mask6": bytes(16)}


def service_nat_config(cidrs: Iterable[IPv4Network | IPv6Network]) -> dict[str, bytes]:
    """load_endpoint's constants for the service CIDRs (at most one per family)."""
    config = {**_OFF4, **_OFF6}
    for cidr in cidrs:
        suffix = "4" if cidr.version == 4 else "6"
        config[f"svc_net{suffix}"] = cidr.network_address.packed
        config[f"svc_mask{suffix}"] = cidr.netmask.packed
    return config


def service_maps(obj: BpfObject) -> list[str]:
    return [name for name in obj.map_names() if name.startswith(_PREFIX)]


def pin_service_maps(obj: BpfObject, pin_dir: str) -> None:
    """Share the service maps under `pin_dir`: reuse the pinned ones, create the rest."""
    obj.pin_maps(os.path.join(pin_dir, SERVICE_PIN_SUBDIR), names=service_maps(obj))


def skip_service_maps(obj: BpfObject) -> None:
    """An object loaded for its node maps alone creates no service maps (they are big)."""
    for name in service_maps(obj):
        obj.set_autocreate(name, False)
