"""The agent's objects as the API returns them (JSON-ready dicts), built from a snapshot."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from membrane.agent.snapshot import Snapshot
from membrane.agent.state import EndpointRecord


def endpoint_view(ep: EndpointRecord, snapshot: Snapshot) -> dict[str, Any]:
    return {
        "id": ep.id,
        "namespace": ep.namespace,
        "name": ep.name,
        "netns": ep.netns,
        "container_id": ep.container_id,
        "container_name": ep.container_name,
        "ipv4": ep.ipv4,
        "ipv6": ep.ipv6,
        "identity": ep.identity,
        "labels": ep.labels,
        "identity_labels": sorted(str(lb) for lb in snapshot.identity_labels.get(ep.identity, ())),
        "ports": [str(p) for p in ep.ports],
        "host_ifname": ep.host_ifname,
        "attach_mode": ep.attach_mode,
        "created": ep.created,
    }


def endpoints_view(snapshot: Snapshot) -> dict[str, Any]:
    ordered = sorted(snapshot.endpoints.values(), key=lambda e: (e.namespace, e.name))
    return {"endpoints": [endpoint_view(ep, snapshot) for ep in ordered]}


def namespaces_view(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "namespaces": [
            {"name": name, "labels": dict(labels)} for name, labels in snapshot.namespaces.items()
        ]
    }


def identities_view(snapshot: Snapshot) -> dict[str, Any]:
    labels = snapshot.identity_labels
    return {
        "identities": [
            {"id": i, "labels": sorted(str(lb) for lb in labels[i])} for i in sorted(labels)
        ]
    }


def policies_view(snapshot: Snapshot, query: Mapping[str, str]) -> dict[str, Any]:
    """The stored policies matching the query's namespace, name and kind (each optional)."""
    items = [
        {**p.ref(), "document": p.document, "notes": list(snapshot.policy_notes.get(p.key, ()))}
        for p in snapshot.stored_policies
        if query.get("namespace") in (None, p.namespace)
        and query.get("name") in (None, p.name)
        and query.get("kind") in (None, p.kind)
    ]
    return {"revision": snapshot.policy_revision, "policies": items}


def health_view(snapshot: Snapshot, flows_lost: int) -> dict[str, Any]:
    return {
        "status": "ok",
        "node": snapshot.node_name,
        "endpoints": len(snapshot.endpoints),
        "policies": len(snapshot.stored_policies),
        "policy_revision": snapshot.policy_revision,
        "allow_localhost": str(snapshot.universe.allow_localhost),
        "flows_lost": flows_lost,
    }
