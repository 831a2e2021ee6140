"""Installing the CNI plugin: the `membrane-cni` executable in the runtime's plugin
directories and a network configuration list naming it.

The executable is native/cni_plugin.c, built by `make` into the package
(membrane/native/membrane-cni): the runtime starts it on every container start and stop, so
it is compiled (it starts in well under a millisecond); static, because on a Kubernetes
node the runtime runs it outside the agent's container, where the libc may be older.
Where runtimes look: podman 4 (containers.conf `cni_plugin_dirs`) searches
/usr/local/libexec/cni, /usr/libexec/cni, /usr/local/lib/cni, /usr/lib/cni and /opt/cni/bin;
kubelet's runtimes (containerd, CRI-O) /opt/cni/bin.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from membrane.errors import UserError

PLUGIN = "membrane-cni"
DEFAULT_NAME = "membrane"
DEFAULT_CONF_DIR = "/etc/cni/net.d"
DEFAULT_BIN_DIRS = ("/opt/cni/bin", "/usr/lib/cni")
CNI_VERSION = "1.0.0"
EXECUTABLE = Path(__file__).parent.parent / "native" / PLUGIN
_NETWORK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # libcni's rule for names


def plugin_executable() -> bytes:
    if not EXECUTABLE.exists():
        raise UserError("", f"{EXECUTABLE} is not built: run `make bpf` (or `make native`)")
    return EXECUTABLE.read_bytes()


def conf_path(conf_dir: str, name: str) -> Path:
    return Path(conf_dir) / f"{name}.conflist"


def network_config(name: str, api_socket: str, podman_root: str | None) -> dict:
    plugin: dict = {"type": PLUGIN, "apiSocket": api_socket}
    if podman_root:
        plugin["podmanGraphRoot"] = podman_root
    return {"cniVersion": CNI_VERSION, "name": name, "plugins": [plugin]}


def check_name(name: str) -> str:
    if not _NETWORK_NAME.fullmatch(name):
        raise UserError("--name", f"{name!r} is not a CNI network name ([A-Za-z0-9_.-])")
    return name


def install_plugin(bin_dirs: tuple[str, ...] | list[str]) -> list[str]:
    """Write the executable into each directory (atomically: a runtime may be running the
    old one); returns the paths."""
    executable = plugin_executable()
    written = []
    for bin_dir in bin_dirs:
        target = Path(bin_dir) / PLUGIN
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{PLUGIN}.tmp")
        tmp.write_bytes(executable)
        tmp.chmod(0o755)
        os.replace(tmp, target)
        written.append(str(target))
    return written


def install(
    name: str,
    api_socket: str,
    conf_dir: str = DEFAULT_CONF_DIR,
    bin_dirs: tuple[str, ...] | list[str] = DEFAULT_BIN_DIRS,
    podman_root: str | None = None,
) -> dict:
    check_name(name)
    if not os.path.isabs(api_socket):
        raise UserError("--api-socket", f"{api_socket!r} is not an absolute path")
    plugins = install_plugin(bin_dirs)
    conf = conf_path(conf_dir, name)
    conf.parent.mkdir(parents=True, exist_ok=True)
    tmp = conf.with_name(f".{conf.name}.tmp")
    tmp.write_text(json.dumps(network_config(name, api_socket, podman_root), indent=2) + "\n")
    os.replace(tmp, conf)
    return {"network": name, "config": str(conf), "plugins": plugins}


def uninstall(
    name: str,
    conf_dir: str = DEFAULT_CONF_DIR,
    bin_dirs: tuple[str, ...] | list[str] = DEFAULT_BIN_DIRS,
) -> dict:
    """Remove the network's configuration, and the executable once no configuration in
    `conf_dir` uses it any more."""
    check_name(name)
    conf = conf_path(conf_dir, name)
    removed = []
    if conf.exists():
        conf.unlink()
        removed.append(str(conf))
    if not _still_used(conf_dir):
        for bin_dir in bin_dirs:
            plugin = Path(bin_dir) / PLUGIN
            if plugin.exists():
                plugin.unlink()
                removed.append(str(plugin))
    return {"network": name, "removed": removed}


def _still_used(conf_dir: str) -> bool:
    for path in Path(conf_dir).glob("*.conflist"):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if any(p.get("type") == PLUGIN for p in doc.get("plugins", []) if isinstance(p, dict)):
            return True
    return False
