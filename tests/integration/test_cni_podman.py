"""Containers that podman makes, networked by Membrane through the CNI: the real podman
(4.x, CNI backend, runc) calls the installed `membrane-cni` plugin, which asks the real
agent. Labels come from podman (`--label`, and a Pod's labels with `podman kube play`),
policies are checked with real connections from inside the containers, and removing
containers leaves nothing behind.

One agent and one podman sandbox (private storage, CNI config and plugin directories in a
temporary directory) serve the module; each test removes the containers it made.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from membrane import netns
from membrane.testing.agent import NODE_IP, AgentProcess, agent_unusable_reason, running_agent
from membrane.testing.podman import PodmanSandbox, footprint, podman_unusable_reason
from membrane.testing.waiting import wait_for
from membrane.tetragon.tetragon import events_pb2, tetragon_pb2

pytestmark = pytest.mark.root
NETWORK = "mbcni"
# busybox httpd on 80 and 8080, serving "ok"; the container keeps running.
SERVE = "echo ok > /www/index.html; httpd -p 80 -h /www; httpd -p 8080 -h /www; exec sleep 600"
RUN_RM_COUNT = 20  # bench/cni_soak.py runs 200 in a row

FRONTEND_BACKEND_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: no-frontend-to-frontend, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  enableDefaultDeny: {ingress: false}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: frontend-to-backend-http, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""


@dataclass
class Bed:
    agent: AgentProcess
    podman: PodmanSandbox

    def serve(self, name: str, *labels: str) -> dict[str, Any]:
        """A container serving HTTP on 80 and 8080 with `labels`; its endpoint."""
        args = [a for label in labels for a in ("--label", label)]
        image = self.podman.build_image()
        self.podman.run("-d", "--name", name, "--network", NETWORK, *args, image, "sh", "-c", SERVE)
        wait_for(f"{name} serving", lambda: self.fetch(name, "127.0.0.1", 80, 1))
        return self.endpoint_of(name)

    def container_id(self, container: str) -> str:
        return self.podman.podman("inspect", "--format", "{{.Id}}", container).stdout.strip()

    def endpoint_of(self, container: str) -> dict[str, Any]:
        cid = self.container_id(container)
        found = [e for e in self.agent.endpoints() if e["container_id"] == cid]
        assert found, f"no endpoint for container {container} ({cid})"
        return found[0]

    def fetch(self, container: str, ip: str, port: int, timeout: int = 2) -> bool:
        """An HTTP GET from inside `container` (busybox nc: the static busybox's wget
        crashes resolving even an address); whether "ok" came back."""
        request = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w {timeout} {ip} {port}"
        done = self.podman.exec(container, "sh", "-c", request)
        return done.returncode == 0 and done.stdout.rstrip().endswith("\nok")

    def footprint(self) -> dict[str, Any]:
        return footprint(self.agent)

    def settles_to(self, before: dict[str, Any]) -> None:
        """The footprint comes back to `before`: the agent answers a DEL, then takes the
        veth, programs and address down (tens of ms)."""
        try:
            wait_for("the footprint to settle", lambda: self.footprint() == before)
        except AssertionError:
            assert self.footprint() == before  # names what differs

    def network_config(self) -> dict[str, Any]:
        """What a runtime hands the plugin: the conflist's plugin entry with its name."""
        conf = json.loads((self.podman.conf_dir / f"{NETWORK}.conflist").read_text())
        return {"cniVersion": conf["cniVersion"], "name": NETWORK, **conf["plugins"][0]}

    def plugin(self, command: str, container: str) -> subprocess.CompletedProcess[str]:
        """Run the installed plugin the way a runtime does (CHECK: podman never does)."""
        ep = self.endpoint_of(container)
        return self.run_plugin(
            command, json.dumps(self.network_config()), ep["container_id"], ep["netns"]
        )

    def run_plugin(
        self, command: str, stdin: str, container_id: str, netns: str, args: str = ""
    ) -> subprocess.CompletedProcess[str]:
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": "eth0",
            "CNI_ARGS": args,
            "CNI_PATH": str(self.podman.bin_dir),
        }
        return subprocess.run(
            [str(self.podman.bin_dir / "membrane-cni")],
            input=stdin,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture(scope="module")
def bed_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    reason = agent_unusable_reason() or podman_unusable_reason()
    if reason:
        pytest.skip(reason)
    tag = f"mbc{os.getpid() % 10000}"
    with (
        running_agent(tag, tmp_path_factory.mktemp("agent")) as agent,
        PodmanSandbox.create(tmp_path_factory.mktemp("podman")) as podman,
    ):
        podman.build_image()
        podman.install_membrane(NETWORK, agent.socket)
        yield Bed(agent, podman)


@pytest.fixture
def bed(bed_module: Bed) -> Iterator[Bed]:
    """The module's bed, emptied of containers, pods and policies after the test."""
    yield bed_module
    if not bed_module.agent.running():
        bed_module.agent.start()
    bed_module.podman.remove_all()
    bed_module.agent.delete_all_policies()


def test_labelled_containers_reach_each_other_then_policy_decides(bed: Bed) -> None:
    before = bed.footprint()
    front1 = bed.serve("front1", "app=frontend")
    front2 = bed.serve("front2", "app=frontend")
    back = bed.serve("back", "app=backend", "tier=api")
    assert front1["namespace"] == "default" and front1["name"] == "front1"
    assert front1["labels"] == {"app": "frontend"}
    assert back["labels"] == {"app": "backend", "tier": "api"}
    assert front1["identity"] == front2["identity"] != back["identity"]
    assert "k8s:app=frontend" in front1["identity_labels"]
    # The container's own view: the address the agent handed out, on eth0.
    shown = bed.podman.exec("front1", "ip", "-4", "addr", "show", "eth0").stdout
    assert f"{front1['ipv4']}/32" in shown
    assert bed.fetch("front1", front2["ipv4"], 80)
    assert bed.fetch("front1", back["ipv4"], 8080)

    bed.agent.import_policy(FRONTEND_BACKEND_POLICY)
    assert not bed.fetch("front1", front2["ipv4"], 80, timeout=1)
    assert bed.fetch("front1", back["ipv4"], 80)
    assert not bed.fetch("front1", back["ipv4"], 8080, timeout=1)
    assert bed.fetch("back", front1["ipv4"], 80)  # frontends deny frontends only

    verdict = bed.agent.trace("default/front1", "default/front2", "80")
    assert verdict["verdict"].lower().startswith("den"), verdict
    flows = bed.agent.cli("observe", "--all", "-o", "json").stdout.splitlines()
    drops = [
        f
        for f in (json.loads(line).get("flow", {}) for line in flows)
        if f.get("verdict") == "DROPPED"
        and f.get("source", {}).get("pod_name") == "front1"
        and f.get("destination", {}).get("pod_name") == "front2"
    ]
    assert drops, "observe shows no drop from front1 to front2"

    bed.podman.remove_all()
    bed.settles_to(before)


def test_kube_play_pods_follow_a_kubernetes_network_policy(bed: Bed, tmp_path: Path) -> None:
    image = bed.podman.build_image()
    pods = [("web", "app: web"), ("client", "role: client"), ("other", "role: other")]
    yaml = "\n---\n".join(
        textwrap.dedent(f"""\
            apiVersion: v1
            kind: Pod
            metadata:
              name: {name}
              labels: {{{labels}}}
            spec:
              containers:
              - name: main
                image: {image}
                command: ["sh", "-c", "{SERVE}"]
            """)
        for name, labels in pods
    )
    (tmp_path / "pods.yaml").write_text(yaml)
    bed.podman.podman("kube", "play", "--network", NETWORK, str(tmp_path / "pods.yaml"))
    endpoints = {e["name"]: e for e in bed.agent.endpoints()}
    assert endpoints["web"]["labels"] == {"app": "web"}
    assert endpoints["web"]["container_name"] is None  # the pod's infra container
    assert endpoints["client"]["labels"] == {"role": "client"}
    web_ip = endpoints["web"]["ipv4"]
    wait_for("web serving", lambda: bed.fetch("client-main", web_ip, 80, 1))
    assert bed.fetch("other-main", web_ip, 80)

    bed.agent.import_policy("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: web-from-clients, namespace: default}
        spec:
          podSelector: {matchLabels: {app: web}}
          ingress:
          - from: [{podSelector: {matchLabels: {role: client}}}]
            ports: [{port: 80, protocol: TCP}]
    """)
    assert bed.fetch("client-main", web_ip, 80)
    assert not bed.fetch("client-main", web_ip, 8080, timeout=1)
    assert not bed.fetch("other-main", web_ip, 80, timeout=1)

    if lifecycle_events_supported():
        # The pod's processes run in its containers, not in the infra container the CNI
        # networked: an exec in web-main names web-main (its cgroup says which).
        listed = json.loads(bed.podman.podman("ps", "--format", "json").stdout)
        ids = {c["Names"][0]: c["Id"] for c in listed}
        process = exec_in(bed, "web-main", "web")
        assert (process.pod.namespace, process.pod.name) == ("default", "web")
        assert dict(process.pod.pod_labels) == {"app": "web"}
        assert process.pod.container.id == ids["web-main"] != endpoints["web"]["container_id"]
        assert process.docker == ids["web-main"][:31]


def test_removed_containers_leave_nothing_behind(bed: Bed) -> None:
    before = bed.footprint()
    ep = bed.serve("gone", "app=gone")
    during = bed.footprint()
    assert ep["host_ifname"] in during["veths"] and ep["id"] in during["pins"]
    assert f"{ep['ipv4']}/32" in during["ipcache"]
    bed.podman.podman("stop", "--time", "0", "gone")
    bed.podman.podman("rm", "gone")
    bed.settles_to(before)
    image = bed.podman.build_image()
    for i in range(RUN_RM_COUNT):
        bed.podman.run("--rm", "--network", NETWORK, "--label", f"run={i}", image, "true")
    bed.settles_to(before)


def test_enforcement_survives_an_agent_restart_which_adopts_the_containers(bed: Bed) -> None:
    front = bed.serve("rs-front", "app=frontend")
    back = bed.serve("rs-back", "app=backend")
    leaving = bed.serve("rs-leaving", "app=leaving")
    bed.agent.import_policy(FRONTEND_BACKEND_POLICY)
    bed.agent.stop()
    assert bed.fetch("rs-front", back["ipv4"], 80)
    assert not bed.fetch("rs-front", back["ipv4"], 8080, timeout=1)
    # Removed while the agent is down: the plugin's DEL succeeds without it.
    bed.podman.podman("rm", "--force", "--time", "0", "rs-leaving")
    bed.agent.start()
    after = {e["name"]: e for e in bed.agent.endpoints()}
    assert after["rs-front"]["id"] == front["id"] and after["rs-back"]["id"] == back["id"]
    assert leaving["name"] not in after
    assert leaving["host_ifname"] not in bed.footprint()["veths"]
    assert bed.fetch("rs-front", back["ipv4"], 80)
    assert not bed.fetch("rs-front", back["ipv4"], 8080, timeout=1)


def test_add_without_an_agent_fails_with_a_cni_error(bed: Bed) -> None:
    before = bed.footprint()
    bed.agent.stop()
    image = bed.podman.build_image()
    done = bed.podman.run("--rm", "--network", NETWORK, image, "true", check=False)
    assert done.returncode != 0
    assert "membrane agent is not reachable" in done.stderr, done.stderr
    bed.agent.start()
    assert bed.footprint() == before


def test_check_reports_a_deleted_veth(bed: Bed) -> None:
    ep = bed.serve("tampered", "app=tampered")
    ok = bed.plugin("CHECK", "tampered")
    assert ok.returncode == 0 and ok.stdout == "", ok.stdout + ok.stderr
    subprocess.run(["ip", "-n", bed.agent.node_netns, "link", "del", ep["host_ifname"]], check=True)
    broken = bed.plugin("CHECK", "tampered")
    assert broken.returncode == 1
    error = json.loads(broken.stdout)
    assert error["code"] == 102 and ep["host_ifname"] in error["details"], error


def test_agent_reset_removes_the_veth_but_not_the_runtimes_namespace(bed: Bed) -> None:
    ep = bed.serve("kept", "app=kept")
    bed.agent.stop()
    bed.agent.cli(
        "agent", "reset", "--yes",
        "--state-dir", str(bed.agent.state_dir),
        "--node-netns", bed.agent.node_netns,
    )  # fmt: skip
    assert os.path.exists(ep["netns"])  # podman's, still mounted
    links = bed.podman.exec("kept", "ip", "-o", "link").stdout
    assert "eth0" not in links and "lo" in links  # our veth went, the container lives on
    bed.agent.start()
    assert bed.agent.endpoints() == []


def test_the_agent_answers_bad_calls_with_the_specs_error_codes(bed: Bed) -> None:
    config = bed.network_config()
    socket_only = f'{{"apiSocket": "{config["apiSocket"]}", "cniVersion": '
    cases = [
        ("ADD", socket_only + "1.0.0", "c1", "/run/netns/x", 6),  # not JSON: the plugin says so
        # Not JSON deep inside, which the plugin does not read: the agent says so.
        ("ADD", json.dumps(config)[:-1] + ', "x": [1,, 2]}', "c1b", "/run/netns/x", 6),
        ("ADD", json.dumps({**config, "cniVersion": "0.4.0"}), "c2", "/run/netns/x", 1),
        ("ADD", json.dumps(config), "c3", "/run/netns/no-such-ns", 100),
        ("CHECK", json.dumps(config), "unknown-container", "/run/netns/x", 3),
    ]
    for command, stdin, container_id, ns, code in cases:
        done = bed.run_plugin(command, stdin, container_id, ns)
        assert done.returncode == 1, done
        assert json.loads(done.stdout)["code"] == code, done.stdout
    # DEL of a container the agent never saw: success, nothing printed.
    done = bed.run_plugin("DEL", json.dumps(config), "never-seen", "/run/netns/x")
    assert (done.returncode, done.stdout) == (0, "")
    assert bed.agent.endpoints() == []


def test_container_names_become_endpoint_names_without_collisions(bed: Bed) -> None:
    image = bed.podman.build_image()
    for name in ("dup_name", "dup-name"):
        bed.podman.run("-d", "--name", name, "--network", NETWORK, image, "sleep", "600")
    first, second = bed.endpoint_of("dup_name"), bed.endpoint_of("dup-name")
    assert first["name"] == "dup-name"
    assert second["name"] == f"dup-name-{second['container_id'][:12]}"


def test_a_kubernetes_runtimes_namespace_and_pod_name_from_cni_args(bed: Bed) -> None:
    """What containerd and CRI-O pass (podman passes only K8S_POD_NAME): the endpoint is
    the pod's namespace and name. A namespace of our own stands in for the runtime's."""
    ns = f"{bed.agent.prefix}k8s-sandbox"
    netns.create(ns)
    try:
        config = json.dumps(bed.network_config())
        args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-7d9f;K8S_POD_UID=u1"
        added = bed.run_plugin("ADD", config, "k8s-sandbox-id", netns.path(ns), args)
        assert added.returncode == 0, added.stdout + added.stderr
        result = json.loads(added.stdout)
        (ep,) = bed.agent.endpoints()
        assert (ep["namespace"], ep["name"], ep["netns"]) == ("shop", "cart-7d9f", netns.path(ns))
        assert result["ips"][0] == {
            "address": f"{ep['ipv4']}/32", "gateway": NODE_IP, "interface": 1,
        }  # fmt: skip
        assert result["interfaces"][1] == {
            "name": "eth0", "mac": result["interfaces"][1]["mac"], "sandbox": netns.path(ns),
        }  # fmt: skip
        assert bed.run_plugin("CHECK", config, "k8s-sandbox-id", netns.path(ns)).returncode == 0
        deleted = bed.run_plugin("DEL", config, "k8s-sandbox-id", netns.path(ns), args)
        assert (deleted.returncode, bed.agent.endpoints()) == (0, [])
        assert netns.exists(ns)  # the runtime's to remove
    finally:
        netns.delete(ns)


def lifecycle_events_supported() -> bool:
    from membrane.bpf.probe import supports
    from membrane.security.lifecycle import NEEDED_FEATURES

    return all(supports(name) for name in NEEDED_FEATURES)


def exec_in(bed: Bed, container: str, pod: str) -> tetragon_pb2.Process:
    """The process of an `echo` podman execs in `container`, as its runtime-security
    exec event (listed with `--pods ^pod$`) shows it."""
    marker = f"in-{container}-{bed.agent.tag}"
    assert bed.podman.exec(container, "echo", marker).returncode == 0
    mine = {"request": json.dumps({"allow_list": [{"arguments_regex": [marker]}]}), "last": 10}
    wait_for(
        "the echo's exec and exit",
        lambda: len(list(bed.agent.client().stream("/v1/security/events", mine))) >= 2 or None,
    )
    shown = bed.agent.cli(
        "security", "events", "--last", "200", "-o", "json", "--pods", f"^{pod}$"
    ).stdout.splitlines()
    events = [
        json_format.Parse(line, events_pb2.GetEventsResponse(), ignore_unknown_fields=False)
        for line in shown
    ]
    execs = [e.process_exec for e in events if marker in e.process_exec.process.arguments]
    assert len(execs) == 1, shown
    return execs[0].process


def test_a_containers_processes_carry_its_pod_and_container(bed: Bed) -> None:
    """Runtime-security events of a process in a podman container name the endpoint it
    joined through the CNI (namespace, name, labels) and the container (podman's id)."""
    if not lifecycle_events_supported():
        pytest.skip("this kernel lacks the hooks of process lifecycle events")
    image = bed.podman.build_image()
    bed.podman.run(
        "-d", "--name", "sec-web", "--network", NETWORK, "--label", "app=web",
        image, "sleep", "600",
    )  # fmt: skip
    container_id = bed.container_id("sec-web")
    assert bed.endpoint_of("sec-web")["container_name"] == "sec-web"
    process = exec_in(bed, "sec-web", "sec-web")
    assert (process.pod.namespace, process.pod.name) == ("default", "sec-web")
    assert dict(process.pod.pod_labels) == {"app": "web"}
    assert process.pod.container.id == container_id
    assert process.pod.container.name == "sec-web"
    assert len(process.docker) == 31 and container_id.startswith(process.docker)
