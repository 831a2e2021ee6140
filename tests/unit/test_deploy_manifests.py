"""deploy/kubernetes/ as a cluster would take it, offline: every document parses, is checked
against the Kubernetes API's own schema (kubernetes-validate ships the OpenAPI-derived JSON
schemas, strict: unknown fields are errors), the pieces refer to each other, and the
commands the DaemonSet runs are ones this `membrane` accepts (the installer's is run)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from membrane.cni import install as cni_install
from membrane.testing.agent import membrane_command

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"


def documents() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(DEPLOY.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
    ]


def by_kind(kind: str) -> dict[str, Any]:
    (found,) = [d for d in documents() if d["kind"] == kind]
    return found


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_is_valid_kubernetes(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_manifests_are_a_daemonset_with_its_rbac() -> None:
    kinds = sorted(d["kind"] for d in documents())
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "DaemonSet", "ServiceAccount"]
    account = by_kind("ServiceAccount")["metadata"]
    binding = by_kind("ClusterRoleBinding")
    pod = by_kind("DaemonSet")["spec"]["template"]["spec"]
    assert binding["roleRef"]["name"] == by_kind("ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
    assert pod["serviceAccountName"] == account["name"]
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    for container in pod["initContainers"] + pod["containers"]:
        for mount in container["volumeMounts"]:
            assert mount["name"] in volumes, f"{container['name']} mounts {mount['name']}"


def test_the_cni_installer_command_installs_the_plugin(tmp_path: Path) -> None:
    """The init container's own command line, its host directories moved into tmp_path."""
    pod = by_kind("DaemonSet")["spec"]["template"]["spec"]
    (installer,) = pod["initContainers"]
    mounts = {m["mountPath"]: m["name"] for m in installer["volumeMounts"]}
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    assert {volumes[name] for name in mounts.values()} == {"/etc/cni/net.d", "/opt/cni/bin"}
    command = [membrane_command()] + [
        str(tmp_path / mounts[a].replace("-", "_")) if a in mounts else a
        for a in installer["command"][1:]
    ]
    subprocess.run(command, check=True, capture_output=True)
    assert (tmp_path / "cni_conf" / "membrane.conflist").exists()
    plugin = tmp_path / "cni_bin" / "membrane-cni"
    assert plugin.read_bytes() == cni_install.EXECUTABLE.read_bytes()
    assert os.access(plugin, os.X_OK)


def test_the_agent_command_uses_options_the_agent_has() -> None:
    pod = by_kind("DaemonSet")["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    assert agent["command"][:3] == ["membrane", "agent", "run"]
    help_text = subprocess.run(
        [membrane_command(), "agent", "run", "--help"],
        capture_output=True,
        text=True,
        env={"COLUMNS": "300", "PATH": "/usr/bin:/bin"},
        check=True,
    ).stdout
    for option in (a for a in agent["command"] if a.startswith("--")):
        assert option in help_text, option
