"""Real podman for tests and benchmarks, kept to itself: a private storage root, run root,
temporary directory, CNI config and plugin directories, and a tiny image made locally (no
registry): `podman import` of a rootfs holding Debian's busybox-static.

The facts of podman 4.3.1 on these machines (DESIGN.md): the CNI backend must be asked for
(netavark wins when installed), crun refuses the hybrid cgroup layout (runc), and raising
rlimits fails without CAP_SYS_RESOURCE (lowered ulimits). Both the containers.conf it points
CONTAINERS_CONF at and every command line say so. Podman's default network (10.88.0.0/16,
a cni-podman0 bridge in the root namespace) is never used: every container names a network.

    with PodmanSandbox.create(workdir) as podman:
        podman.install_membrane("membrane", agent.socket)
        podman.run("--network", "membrane", "--label", "app=web", IMAGE, "true")
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyroute2 import IPRoute

from membrane import netns
from membrane.agent.endpoints import WARM_PEER
from membrane.cni import install as cni_install
from membrane.datapath.endpoint_prog import pinned_endpoint_ids
from membrane.datapath.ipcache import read_ipcache
from membrane.datapath.nodemaps import NodeMaps

if TYPE_CHECKING:
    from membrane.testing.agent import AgentProcess

IMAGE = "localhost/membrane-test:latest"
BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "true", "sleep", "nc", "ip", "cat", "echo", "httpd", "ls", "mkdir", "ping")
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096")
PODMAN_TIMEOUT = 120.0


def podman_unusable_reason() -> str | None:
    """Why podman cannot run here (a skip reason), or None."""
    missing = [
        tool
        for tool, path in (("podman", None), ("runc", None), ("busybox-static", BUSYBOX))
        if (shutil.which(tool) if path is None else (path if os.path.exists(path) else None))
        is None
    ]
    if missing:
        return f"{', '.join(missing)} not installed (scripts/setup.sh installs them)"
    if os.geteuid() != 0:
        return "rootful podman needs root"
    return None


class PodmanSandbox:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.root = workdir / "root"
        self.runroot = workdir / "runroot"
        self.tmp = workdir / "tmp"
        self.conf_dir = workdir / "net.d"
        self.bin_dir = workdir / "bin"
        self.conf = workdir / "containers.conf"
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    @classmethod
    def create(cls, workdir: Path | None = None) -> PodmanSandbox:
        sandbox = cls(workdir or Path(tempfile.mkdtemp(prefix="membrane-podman-")))
        for d in (sandbox.root, sandbox.runroot, sandbox.tmp, sandbox.conf_dir, sandbox.bin_dir):
            d.mkdir(parents=True, exist_ok=True)
        sandbox.conf.write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n'
            "[network]\n"
            'network_backend = "cni"\n'
            f'cni_plugin_dirs = ["{sandbox.bin_dir}", "/usr/lib/cni"]\n'
            f'network_config_dir = "{sandbox.conf_dir}"\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{sandbox.tmp}/events.log"\n'
            f'tmp_dir = "{sandbox.tmp}"\n'
        )
        return sandbox

    def __enter__(self) -> PodmanSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def argv(self, *args: str) -> list[str]:
        return [
            "podman",
            "--root", str(self.root),
            "--runroot", str(self.runroot),
            "--network-backend", "cni",
            "--runtime", "runc",
            "--cgroup-manager", "cgroupfs",
            "--cni-config-dir", str(self.conf_dir),
            *args,
        ]  # fmt: skip

    def podman(
        self, *args: str, check: bool = True, timeout: float = PODMAN_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.argv(*args), env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"podman {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}"
            )
        return done

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`podman run` with the lowered ulimits."""
        return self.podman("run", *ULIMITS, *args, check=check)

    def exec(self, container: str, *cmd: str) -> subprocess.CompletedProcess[str]:
        return self.podman("exec", container, *cmd, check=False)

    def build_image(self) -> str:
        """Import the busybox image (once per sandbox); returns its name."""
        if self.podman("image", "exists", IMAGE, check=False).returncode == 0:
            return IMAGE
        rootfs = self.workdir / "rootfs.tar"
        with tarfile.open(rootfs, "w") as tar:
            tar.add(BUSYBOX, "bin/busybox")
            for applet in APPLETS:
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(link)
            for empty in ("tmp", "proc", "sys", "dev", "etc", "www"):
                info = tarfile.TarInfo(empty)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
        self.podman(
            "import", "--change", "CMD=/bin/sh", "--change", "ENV=PATH=/bin", str(rootfs), IMAGE
        )
        rootfs.unlink()
        return IMAGE

    def install_membrane(self, name: str, api_socket: str) -> None:
        cni_install.install(
            name, api_socket, str(self.conf_dir), [str(self.bin_dir)], str(self.root)
        )

    def install_bridge(self, name: str, subnet: str) -> None:
        """A network of the standard CNI `bridge` plugin (host-local addresses in `subnet`),
        the baseline a runtime ships with."""
        bridge = f"mbb{abs(hash(name)) % 10**6}"
        plugin = {
            "type": "bridge",
            "bridge": bridge,
            "isGateway": False,  # no address, no forwarding sysctl in the root namespace
            "ipMasq": False,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": subnet}]],
                "dataDir": str(self.workdir / "ipam"),
            },
        }
        config = {"cniVersion": "1.0.0", "name": name, "plugins": [plugin]}
        (self.conf_dir / f"{name}.conflist").write_text(json.dumps(config))
        self.bridges = [*getattr(self, "bridges", []), bridge]

    def remove_all(self) -> None:
        # podman 4.3's `pod rm --time 0` still waits 10 s for a shell that ignores SIGTERM
        self.podman("pod", "kill", "--all", check=False)
        self.podman("pod", "rm", "--all", "--force", "--time", "0", check=False)
        self.podman("rm", "--all", "--force", "--time", "0", check=False)

    def destroy(self) -> None:
        """Every container and pod, podman's storage, and the bridges it made."""
        with contextlib.suppress(Exception):
            self.remove_all()
        with contextlib.suppress(Exception):
            self.podman("system", "reset", "--force", check=False)
        for bridge in getattr(self, "bridges", []):
            subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


def footprint(agent: AgentProcess) -> dict[str, Any]:
    """Everything endpoints occupy on the agent's node: records and addresses, host veths,
    pinned programs, ipcache and endpoint-map entries, and podman's namespaces. Equal before
    and after containers come and go: nothing leaked."""
    endpoints = agent.endpoints()
    with netns.inside(agent.node_netns), IPRoute() as ipr:
        found = ipr.get_links()
    # The veth pair the agent made ahead for the next endpoint is its own, not a leak:
    # its pod end (WARM_PEER) and that end's peer, the host end.
    warm = [link for link in found if WARM_PEER.fullmatch(link.get_attr("IFLA_IFNAME"))]
    warm_ifindexes = {link["index"] for link in warm} | {
        link.get_attr("IFLA_LINK") for link in warm
    }
    links = sorted(
        link.get_attr("IFLA_IFNAME") for link in found if link["index"] not in warm_ifindexes
    )
    with NodeMaps.open(str(agent.bpf_dir)) as maps:
        ipcache = sorted(str(prefix) for prefix in read_ipcache(maps))
        endpoint_map = len(list(maps.endpoints.lookup_batch()))
    return {
        "endpoints": sorted(e["name"] for e in endpoints),
        "addresses": sorted(e["ipv4"] for e in endpoints),
        "veths": [name for name in links if name.startswith("mbr")],
        "pins": sorted(pinned_endpoint_ids(str(agent.bpf_dir))),
        "ipcache": ipcache,
        "endpoint_map": endpoint_map,
        "podman_netns": sorted(n for n in netns.names() if n.startswith("netns-")),
    }
