"""The `membrane-cni` executable as a runtime runs it, where no agent is needed: VERSION,
the spec's errors (an unknown command, no agent for ADD), DEL without
an agent succeeding, and `membrane cni install/uninstall` leaving nothing behind. (Errors
the agent answers: tests/integration/test_cni_podman.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from membrane.cni import install as cni_install
from membrane.cni.service import endpoint_name, parse_args
from membrane.testing.agent import membrane_command


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    cni_install.install("unit", str(tmp_path / "no-agent.sock"), str(tmp_path / "net.d"),
                        [str(tmp_path / "bin")])  # fmt: skip
    return tmp_path / "bin" / cni_install.PLUGIN


def run(plugin: Path, command: str, config: object, **env: str) -> subprocess.CompletedProcess:
    stdin = config if isinstance(config, str) else json.dumps(config)
    return subprocess.run(
        [str(plugin)],
        input=stdin,
        env={**os.environ, "CNI_COMMAND": command, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def config_of(plugin: Path) -> dict:
    conf = json.loads((plugin.parent.parent / "net.d" / "unit.conflist").read_text())
    return {"cniVersion": conf["cniVersion"], "name": conf["name"], **conf["plugins"][0]}


def test_version_lists_what_the_plugin_speaks(plugin: Path) -> None:
    done = run(plugin, "VERSION", {"cniVersion": "1.0.0"})
    assert done.returncode == 0
    assert json.loads(done.stdout) == {"cniVersion": "1.0.0", "supportedVersions": ["1.0.0"]}


def test_add_without_an_agent_is_a_try_again_later_error(plugin: Path) -> None:
    done = run(plugin, "ADD", config_of(plugin), CNI_CONTAINERID="abc", CNI_IFNAME="eth0")
    assert done.returncode == 1
    error = json.loads(done.stdout)
    assert error["code"] == 11 and "not reachable" in error["msg"]
    assert "no-agent.sock" in error["details"]


def test_del_without_an_agent_succeeds(plugin: Path) -> None:
    done = run(plugin, "DEL", config_of(plugin), CNI_CONTAINERID="abc", CNI_IFNAME="eth0")
    assert done.returncode == 0 and done.stdout == ""
    assert "without an agent" in done.stderr


def test_an_unknown_command_is_error_4(plugin: Path) -> None:
    done = run(plugin, "FROB", config_of(plugin))
    assert done.returncode == 1
    assert json.loads(done.stdout)["code"] == 4


def test_the_plugin_starts_fast(plugin: Path) -> None:
    """It runs on every container start and stop: os, sys and _socket only (-IS)."""
    started = time.perf_counter()
    for _ in range(5):
        run(plugin, "VERSION", {"cniVersion": "1.0.0"})
    assert (time.perf_counter() - started) / 5 < 0.1  # ~10 ms measured; generous for CI


def test_install_and_uninstall_leave_nothing(tmp_path: Path) -> None:
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    args = ["--conf-dir", str(conf_dir), "--bin-dir", str(bin_dir)]
    cli = membrane_command()
    subprocess.run([cli, "cni", "install", "--name", "a", "--api-socket", "/run/x.sock", *args],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run([cli, "cni", "install", "--name", "b", *args], check=True, capture_output=True)
    doc = json.loads((conf_dir / "a.conflist").read_text())
    assert doc["name"] == "a" and doc["cniVersion"] == "1.0.0"
    assert doc["plugins"] == [{"type": "membrane-cni", "apiSocket": "/run/x.sock"}]
    subprocess.run([cli, "cni", "uninstall", "--name", "a", *args], check=True)
    assert (bin_dir / "membrane-cni").exists()  # network b still uses it
    subprocess.run([cli, "cni", "uninstall", "--name", "b", *args], check=True)
    assert list(conf_dir.iterdir()) == [] and list(bin_dir.iterdir()) == []


def test_a_bad_network_name_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [membrane_command(), "cni", "install", "--name", "no spaces", "--conf-dir",
         str(tmp_path), "--bin-dir", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "membrane: error: --name: 'no spaces' is not a CNI network name ([A-Za-z0-9_.-])"
    ]
    assert list(tmp_path.iterdir()) == []


def test_cni_args_and_names() -> None:
    assert parse_args("IgnoreUnknown=1;K8S_POD_NAME=web;K8S_POD_NAMESPACE=shop") == {
        "IgnoreUnknown": "1", "K8S_POD_NAME": "web", "K8S_POD_NAMESPACE": "shop",
    }  # fmt: skip
    assert parse_args("") == {}
    assert endpoint_name("magical_proskuriakova", "abc") == "magical-proskuriakova"
    assert endpoint_name("Web.1", "abc") == "web.1"
    assert endpoint_name("___", "0123456789abcdef") == "c-0123456789ab"
    assert endpoint_name(None, "0123456789ABCDEF") == "c-0123456789ab"
