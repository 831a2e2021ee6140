"""What podman knows about a container it asks the CNI plugin to network: its name and
labels, or its pod's name and labels (`podman kube play` gives a pod the Pod YAML's
metadata.labels; the pod's infra container holds the network namespace).

Measured with podman 4.3.1 (CNI backend): CNI_ARGS carry only
`IgnoreUnknown=1;K8S_POD_NAME=<container or pod name>`, no labels, no namespace, and no
runtimeConfig; `podman inspect` blocks until the ADD returns (podman holds the container's
lock). So labels come from podman's own database, `<graph root>/libpod/bolt_state.db`
(buckets `ctr/<id>/config` and `pod/<id>/config`, JSON), read without taking podman's locks.
Podman 4.8+ may keep an sqlite database instead: then no labels are found (logged).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from membrane.cni.boltdb import BoltDB, BoltError

DEFAULT_GRAPH_ROOT = "/var/lib/containers/storage"


@dataclass(frozen=True)
class PodmanContainer:
    name: str  # the pod's name for a container in a pod
    labels: dict[str, str] = field(default_factory=dict)
    pod: str | None = None  # the pod's name, if in one
    # The container's own name; None in a pod, whose networked container is the infra
    # container, not the ones its processes run in.
    container_name: str | None = None


def database_path(graph_root: str) -> str:
    return os.path.join(graph_root, "libpod", "bolt_state.db")


def lookup(graph_root: str, container_id: str) -> PodmanContainer | None:
    """The container (and its pod) as podman recorded it; None if the database does not
    hold it (or is missing, or not a bolt database)."""
    try:
        db = BoltDB.read(database_path(graph_root))
    except (OSError, BoltError):
        return None
    config = _config(db, b"ctr", container_id)
    if config is None:
        return None
    pod_id = config.get("pod")
    pod = _config(db, b"pod", pod_id) if pod_id else None
    if pod is not None:
        return PodmanContainer(pod["name"], dict(pod.get("labels") or {}), pod["name"])
    return PodmanContainer(
        config["name"], dict(config.get("labels") or {}), container_name=config["name"]
    )


def _config(db: BoltDB, kind: bytes, object_id: str) -> dict | None:
    bucket = db.bucket(kind, object_id.encode())
    raw = bucket.get(b"config") if bucket is not None else None
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None
