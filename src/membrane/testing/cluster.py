"""The standard policy-test topology on one real agent: namespaces of pods running echo
servers, the node and an outside host, all reachable as named peers; and a reset that
undoes what a test changed, so that many tests share one (expensive) start-up."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from membrane import netns
from membrane.endpoint.world import ExternalHost
from membrane.testing.agent import NODE_IP, NODE_IP6, AgentProcess
from membrane.testing.pods import (
    EXTERNAL_IP,
    EXTERNAL_IP6,
    Pod,
    add_outside_host,
    start_echo_server,
)
from membrane.testing.reachability import DEFAULT_PORTS, Peer, Reachability, check

EXTRA_IPS = ("198.19.2.10", "198.19.3.10")  # more addresses of the outside host
EXTRA_IPS6 = ("2001:db8:ff02::10", "2001:db8:ff03::10")  # the same, IPv6
NAMED_PORTS = ("serve-80-tcp=80/TCP", "serve-81-tcp=81/TCP", "serve-80-udp=80/UDP",
               "serve-81-udp=81/UDP")  # fmt: skip

_counter = itertools.count()


def unique_tag(kind: str = "t") -> str:
    """A tag for an agent of this process, unique among this machine's test runs."""
    return f"mb{kind}{os.getpid() % 100000}{chr(ord('a') + next(_counter) % 26)}"


@dataclass
class Cluster:
    """An agent, namespaces x, y, z (labelled ns=NS) with pods a, b, c (labelled pod=NAME,
    and the c pods also team=red; named ports serve-80-tcp ...), the node ("host") and an
    outside host ("world" at 198.19.1.2, "world-2"/"world-3" from its extra addresses
    198.19.2.10/198.19.3.10; over IPv6 2001:db8:ffff:1::2, 2001:db8:ff02::10 and
    2001:db8:ff03::10), each running the echo server on ports 80-82."""

    agent: AgentProcess
    namespaces: tuple[str, ...] = ("x", "y", "z")
    pod_names: tuple[str, ...] = ("a", "b", "c")
    pods: dict[str, Pod] = field(default_factory=dict)
    peers: dict[str, Peer] = field(default_factory=dict)
    peers6: dict[str, Peer] = field(default_factory=dict)  # the same, by IPv6 address
    servers: list[subprocess.Popen[str]] = field(default_factory=list)
    external: ExternalHost | None = None
    ns_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    base_pods: set[str] = field(default_factory=set)
    labels_changed: bool = False
    family: int = 4  # what `check` probes over unless told

    # ---- building ----------------------------------------------------------------------
    def setup(self) -> None:
        self.agent.start()
        for ns in self.namespaces:
            self.agent.label_namespace(ns, f"ns={ns}")
        wanted = list(itertools.product(self.namespaces, self.pod_names))
        with ThreadPoolExecutor(max_workers=4) as pool:  # CLI start-up is most of the cost
            adds = [
                pool.submit(self.add_pod, ns, name, self.base_labels(name), NAMED_PORTS)
                for ns, name in wanted
            ]
            for done in adds:
                done.result()
        self.base_pods = set(self.pods)
        self.ns_labels = self.namespace_labels()
        self._add_outside()

    @staticmethod
    def base_labels(name: str) -> dict[str, str]:
        return {"pod": name, **({"team": "red"} if name == "c" else {})}

    def _add_outside(self) -> None:
        self.external = add_outside_host(self.agent, EXTRA_IPS, EXTRA_IPS6)
        self.peers["host"] = Peer("host", self.agent.node_netns, NODE_IP)
        if self.agent.node.node_ip6 is not None:
            self.peers6["host"] = Peer("host", self.agent.node_netns, NODE_IP6)
        self.peers["world"] = Peer("world", self.external.netns, EXTERNAL_IP)
        for i, extra in enumerate(EXTRA_IPS, start=2):
            self.peers[f"world-{i}"] = Peer(f"world-{i}", self.external.netns, extra, bind=True)
        if self.external.ip6 is not None:
            self.peers6["world"] = Peer("world", self.external.netns, EXTERNAL_IP6)
            for i, extra in enumerate(EXTRA_IPS6, start=2):
                key = f"world-{i}"
                self.peers6[key] = Peer(key, self.external.netns, extra, bind=True)
        for ns in (self.agent.node_netns, self.external.netns):
            self.servers.append(start_echo_server(ns))

    def add_pod(
        self,
        ns: str,
        name: str,
        labels: dict[str, str] | None = None,
        ports: Sequence[str] = (),
        serve: bool = True,
    ) -> Pod:
        """`membrane endpoint add NS/NAME`, then its echo server (unless not `serve`)."""
        args = ["endpoint", "add", f"{ns}/{name}"]
        for k, v in (labels or {}).items():
            args += ["--label", f"{k}={v}"]
        for p in ports:
            args += ["--port", p]
        pod = Pod(ns, name, self.agent.cli_json(*args))
        assert pod.netns.startswith(self.agent.prefix), pod.info
        if serve:
            pod.server = start_echo_server(pod.netns)
        self.pods[pod.key] = pod
        self.peers[pod.key] = Peer(pod.key, pod.netns, pod.ip)
        if pod.ip6:
            self.peers6[pod.key] = Peer(pod.key, pod.netns, pod.ip6)
        return pod

    def delete_pod(self, key: str) -> None:
        pod = self.pods.pop(key)
        self.peers.pop(key, None)
        self.peers6.pop(key, None)
        if pod.server is not None:
            netns.stop(pod.server)
        self.agent.cli("endpoint", "delete", key)

    def label_namespace(self, ns: str, *changes: str) -> dict[str, Any]:
        """`membrane namespace label NS CHANGES...`; the test's reset restores them."""
        self.labels_changed = True
        return self.agent.label_namespace(ns, *changes)

    def namespace_labels(self) -> dict[str, dict[str, str]]:
        spaces = self.agent.api("GET", "/v1/namespaces")["namespaces"]
        return {s["name"]: s["labels"] for s in spaces}

    # ---- per test ----------------------------------------------------------------------
    def reach(
        self,
        default: bool = True,
        ports: Sequence[tuple[int, str]] = DEFAULT_PORTS,
        sources: Sequence[str] | None = None,
        destinations: Sequence[str] | None = None,
    ) -> Reachability:
        """An expected matrix over the nine pods (or the given peers)."""
        pods = [f"{ns}/{n}" for ns, n in itertools.product(self.namespaces, self.pod_names)]
        return Reachability(sources or pods, destinations or pods, ports, default)

    def peer(self, key: str) -> Peer:
        """The peer `key` over `self.family`'s addresses."""
        return (self.peers6 if self.family == 6 else self.peers)[key]

    def check(self, reach: Reachability, family: int | None = None) -> None:
        """Probe `reach` over IPv4, or over IPv6 (the peers' IPv6 addresses); by default
        over `self.family`."""
        check(self.peers6 if (family or self.family) == 6 else self.peers, reach)

    def import_policy(self, text: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.agent.import_policy(text, check=check)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.agent.cli(*args, check=check)

    def reset(self) -> None:
        """Undo what a test changed: policies, namespace labels, extra pods."""
        died = None
        if self.agent.stopped_by_someone_else():
            self.agent.revive()
        elif not self.agent.running():
            assert self.agent.proc is not None
            if not self.agent.expect_down:  # else the test stopped it and failed, not it
                died = f"exit code {self.agent.proc.wait()}, log tail:\n{self.agent.log_tail(10)}"
            self.agent.start()
        self.agent.delete_all_policies()
        for key in set(self.pods) - self.base_pods:
            self.delete_pod(key)
        if self.labels_changed:
            self.labels_changed = False
            self._restore_namespace_labels()
        if died:
            raise AssertionError(f"the agent died during the test ({died})")

    def _restore_namespace_labels(self) -> None:
        now = self.namespace_labels()
        for ns, labels in self.ns_labels.items():
            current = now.get(ns, {})
            if current != labels:
                changes = [f"{k}-" for k in current if k not in labels]
                changes += [f"{k}={v}" for k, v in labels.items() if current.get(k) != v]
                self.agent.label_namespace(ns, *changes)

    def destroy(self) -> None:
        """Stop every server, then remove the agent and all it made (the outside host too)."""
        for proc in [*self.servers, *(p.server for p in self.pods.values() if p.server)]:
            with contextlib.suppress(Exception):
                netns.stop(proc)
        self.agent.destroy()


@contextlib.contextmanager
def running_cluster(
    workdir: Path | None = None,
    namespaces: tuple[str, ...] = ("x", "y", "z"),
    pod_names: tuple[str, ...] = ("a", "b", "c"),
    tag: str | None = None,
    allow_localhost: str | None = None,
    attach: str | None = None,
    policy_map_max: int | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[Cluster]:
    """A fresh agent with the standard pods, torn down however the body ends (also when
    setting it up fails half-way). `allow_localhost`, `attach`, `policy_map_max`: the
    agent's options."""
    own = workdir is None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="membrane-agent-"))
    agent = AgentProcess(
        workdir,
        tag or unique_tag(),
        allow_localhost=allow_localhost,
        attach=attach,
        policy_map_max=policy_map_max,
        extra_args=extra_args,
    )
    cluster = Cluster(agent, namespaces, pod_names)
    try:
        cluster.setup()
        yield cluster
    finally:
        cluster.destroy()
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
