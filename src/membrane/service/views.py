"""A service as `membrane service get -o json` shows it: what was asked, what was allocated
(ClusterIPs, NodePorts), and what the datapath balances over (frontends, backends)."""

from __future__ import annotations

from typing import Any

from membrane.abi import SvcScope
from membrane.service.maps import ServiceIds
from membrane.service.model import ServiceRecord
from membrane.service.plan import NodeView, Plan, key_text

SCOPES = {int(SvcScope.EXTERNAL): "external", int(SvcScope.INTERNAL): "internal"}
PROTOCOL_NAMES = {6: "TCP", 17: "UDP"}


def service_view(svc: ServiceRecord, plan: Plan, ids: ServiceIds, node: NodeView) -> dict[str, Any]:
    frontends = [
        {
            "address": key[0],
            "port": key[1],
            "protocol": PROTOCOL_NAMES[key[2]],
            "scope": SCOPES[key[4]],
            "local_backends_only": bool(fe.set[4]),
        }
        for key, fe in sorted(plan.frontends.items())
        if fe.service == svc.key
    ]
    backends = []
    for port in svc.ports:
        for set_key, set_plan in sorted(plan.sets.items()):
            if set_key[:3] != (svc.namespace, svc.name, port.name) or set_key[4]:
                continue
            for b in set_plan.backends:
                backends.append(
                    {
                        "port_name": port.name,
                        "service_port": port.port,
                        "address": b.key[0],
                        "port": b.key[1],
                        "protocol": port.protocol,
                        "state": b.state,
                        "weight": b.weight,
                        "local": b.local,
                        "id": ids.backends.get(key_text(b.key)),
                    }
                )
    return {
        "namespace": svc.namespace,
        "name": svc.name,
        "type": svc.service_type,
        "cluster_ips": list(svc.cluster_ips),
        "ports": [
            {
                "name": p.name,
                "port": p.port,
                "protocol": p.protocol,
                "target_port": p.target_port,
                "node_port": p.node_port,
            }
            for p in svc.ports
        ],
        "external_ips": list(svc.external_ips),
        "selector": svc.selector,
        "session_affinity": "ClientIP" if svc.affinity_timeout else "None",
        "affinity_timeout_seconds": svc.affinity_timeout,
        "external_traffic_policy": svc.external_traffic_policy,
        "internal_traffic_policy": svc.internal_traffic_policy,
        "lb_algorithm": svc.algorithm,
        "maglev_table_size": node.maglev_size if svc.algorithm == "maglev" else None,
        "frontends": frontends,
        "backends": backends,
    }
