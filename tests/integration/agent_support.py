"""The real agent for integration tests: `membrane agent run` as a subprocess with a node
namespace, state directory, API socket and pod-namespace prefix of its own, driven through
the `membrane` CLI exactly as a user would, and a cluster of pods with echo servers on it.

Start-up is the expensive part (agent, nine pods, eleven servers), so a test module shares
one `Cluster` (`cluster_fixture()`), and each test gets it through `net_fixture()`, which
afterwards deletes every policy, restores namespace labels and removes pods the test added.

Teardown removes everything, whatever happened: servers and the agent by PID, pod
namespaces by prefix, the outside host, the node namespace, the agent's BPF pins and its
state directory.

    from agent_support import cluster_fixture, net_fixture
    cluster = cluster_fixture()
    net = net_fixture()
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, TypeVar

import pytest
from reachability import DEFAULT_PORTS, Peer, Reachability, check

from membrane import netns
from membrane.datapath.endpoint_prog import detach_all_endpoints

REPO = Path(__file__).resolve().parents[2]
MEMBRANE = str(REPO / ".venv" / "bin" / "membrane")
PYTHON = sys.executable
SERVER = str(Path(__file__).with_name("reachability_server.py"))
BPF_ROOT = Path("/sys/fs/bpf/membrane/agent")
NODE_IP = "198.19.0.1"
POD_CIDR = "198.18.0.0/16"
EXTERNAL_IP = "198.19.1.2"
EXTERNAL_LINK = "198.19.1.0/30"
EXTRA_IPS = ("198.19.2.10", "198.19.3.10")
SERVER_PORTS = (80, 81, 82)
NAMED_PORTS = ("serve-80-tcp=80/TCP", "serve-81-tcp=81/TCP", "serve-80-udp=80/UDP",
               "serve-81-udp=81/UDP")  # fmt: skip
READY_LINE = "membrane agent ready"
START_TIMEOUT = 60.0
CLI_TIMEOUT = 120.0

T = TypeVar("T")
_counter = itertools.count()


def wait_for(what: str, probe: Callable[[], T], timeout: float = 10.0, interval: float = 0.05) -> T:
    """Poll `probe` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}: {value!r}")
        time.sleep(interval)


def user_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one stderr line of a command refused as bad input (exit code 2)."""
    shown = f"{result.args} exit {result.returncode}\nout: {result.stdout}\nerr: {result.stderr}"
    assert result.returncode == 2, f"exit code is not 2: {shown}"
    assert "Traceback" not in result.stderr, shown
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"stderr is not exactly one line: {shown}"
    assert lines[0].startswith("membrane: error: "), shown
    return lines[0]


# ---- the agent -------------------------------------------------------------------------
AGENT_MEMORY_LIMIT = 2 << 30  # address space; an agent normally uses < 0.4 GiB


def _limit_memory() -> None:
    """In the agent's child process: a runaway agent fails with MemoryError (a traceback
    in its log) instead of making the kernel's OOM killer pick victims on a shared box."""
    resource.setrlimit(resource.RLIMIT_AS, (AGENT_MEMORY_LIMIT, AGENT_MEMORY_LIMIT))


class Agent:
    """One `membrane agent run` with its own node namespace and everything else."""

    def __init__(self, workdir: Path, tag: str) -> None:
        self.tag = tag
        self.node_netns = f"{tag}n"
        self.prefix = f"{tag}-"
        self.state_dir = workdir / "state"
        self.socket = str(workdir / "api.sock")
        self.log_path = workdir / "agent.log"
        self.bpf_dir = BPF_ROOT / self.node_netns
        self.proc: subprocess.Popen[str] | None = None
        self.expect_down = False  # we stopped it on purpose (kill9/stop)
        self.env = {**os.environ, "MEMBRANE_API_SOCKET": self.socket}

    def argv(self) -> list[str]:
        return [
            MEMBRANE, "agent", "run",
            "--state-dir", str(self.state_dir),
            "--api-socket", self.socket,
            "--node-netns", self.node_netns,
            "--pod-cidr", POD_CIDR,
            "--node-ip", NODE_IP,
            "--netns-prefix", self.prefix,
            "--log-level", "debug",
        ]  # fmt: skip

    # ---- life cycle --------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT) -> None:
        assert not self.running(), "the agent is already running"
        if self.proc is not None:
            self._reap()  # the previous run's exit status and pipe
        self.expect_down = False
        log = open(self.log_path, "a")  # noqa: SIM115 - the child keeps writing to it
        log.write(f"---- start {time.strftime('%H:%M:%S')}: {' '.join(self.argv())}\n")
        log.flush()
        try:
            self.proc = subprocess.Popen(
                self.argv(),
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                text=True,
                env=self.env,
                start_new_session=True,
                preexec_fn=_limit_memory,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        seen = ""
        while READY_LINE not in seen:
            left = deadline - time.monotonic()
            if self.proc.poll() is not None or left <= 0:
                rc = self.proc.poll()
                self._kill()
                raise RuntimeError(
                    f"agent not ready ({'timeout' if rc is None else f'exit {rc}'}); "
                    f"stdout: {seen!r}\nlog tail:\n{self.log_tail()}"
                )
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.5))
            if ready:
                line = self.proc.stdout.readline()
                seen += line
                if not line and self.proc.poll() is None:
                    self.proc.wait(min(left, 5))

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, as an operator would; the exit code."""
        assert self.proc is not None
        self.expect_down = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill()
                raise AssertionError(f"the agent ignored SIGTERM for {timeout:g} s") from None
        return self._reap()

    def kill9(self) -> None:
        self.expect_down = True
        self._kill()

    def stopped_by_someone_else(self) -> bool:
        """The agent exited cleanly (SIGTERM: it logs "stopping") without us asking: other
        test runs on this machine have been seen to SIGTERM every `membrane agent run`."""
        return self.proc is not None and not self.expect_down and self.proc.poll() == 0

    def revive(self) -> None:
        warnings.warn(
            f"agent {self.node_netns} was stopped by someone else (exit 0); restarted it",
            stacklevel=2,
        )
        self.start()

    def restart(self) -> None:
        if self.running():
            self.stop()
        self.start()

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc is not None:
            self._reap()

    def _reap(self) -> int:
        assert self.proc is not None
        rc = self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return rc

    def log_tail(self, lines: int = 40, width: int = 400) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(line[:width] for line in text.splitlines()[-lines:])

    # ---- the CLI -----------------------------------------------------------------------
    def cli(
        self, *args: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`membrane ARGS...` pointed at this agent (MEMBRANE_API_SOCKET)."""
        result = subprocess.run(
            [MEMBRANE, *args],
            capture_output=True,
            text=True,
            input=input,
            env=self.env,
            timeout=CLI_TIMEOUT,
            check=False,
        )
        if result.returncode == 1 and self.stopped_by_someone_else():
            self.revive()
            return self.cli(*args, check=check, input=input)
        if check and result.returncode != 0:
            raise AssertionError(
                f"membrane {' '.join(args)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}\n"
                f"agent log tail:\n{self.log_tail(15)}"
            )
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "-o", "json").stdout)

    def import_policy(self, text: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`membrane policy import -` with `text` (dedented) on stdin; enforced on return."""
        return self.cli("policy", "import", "-", input=textwrap.dedent(text), check=check)

    def api(self, method: str, path: str, **kw: Any) -> Any:
        """The REST API directly, for the harness's own housekeeping (resets, lookups):
        milliseconds instead of a CLI start-up. What tests assert on goes through `cli`."""
        from membrane.api.client import AgentUnavailable, ApiClient

        try:
            return ApiClient.connect(self.socket).call(method, path, **kw)
        except AgentUnavailable:
            if not self.stopped_by_someone_else():
                raise
            self.revive()
            return ApiClient.connect(self.socket).call(method, path, **kw)

    def delete_all_policies(self) -> None:
        self.api("DELETE", "/v1/policies", params={"all": "1"})

    def identities(self) -> dict[str, int]:
        """NS/NAME -> identity of every endpoint (one `endpoint list`)."""
        return {f"{e['namespace']}/{e['name']}": int(e["identity"]) for e in self.endpoints()}

    def policies(self) -> list[dict[str, Any]]:
        return self.cli_json("policy", "list")["policies"]

    def endpoints(self) -> list[dict[str, Any]]:
        return self.cli_json("endpoint", "list")

    def label_namespace(self, ns: str, *changes: str) -> dict[str, Any]:
        return self.cli_json("namespace", "label", ns, *changes)

    def trace(self, src: str, dst: str, dport: str) -> dict[str, Any]:
        return self.cli_json("policy", "trace", "--src", src, "--dst", dst, "--dport", dport)

    def observe(self, last: int = 1000) -> list[dict[str, Any]]:
        """Flow records; `-o json` prints one JSON object per line (or one list)."""
        out = self.cli("observe", "--last", str(last), "-o", "json").stdout.strip()
        if not out:
            return []
        if out.startswith("["):
            return json.loads(out)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    # ---- cleanup -----------------------------------------------------------------------
    def destroy(self) -> None:
        """Remove everything this agent made, whether or not it is still running."""
        self._kill()
        detach_all_endpoints(str(self.bpf_dir))
        for name in netns.names():
            if name.startswith(self.prefix):
                with contextlib.suppress(OSError):
                    netns.delete(name)
        with contextlib.suppress(OSError):
            netns.delete(self.node_netns)
        if self.bpf_dir.exists():
            shutil.rmtree(self.bpf_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # /sys/fs/bpf/membrane/agent and up, once empty
            os.removedirs(self.bpf_dir.parent)
        shutil.rmtree(self.state_dir, ignore_errors=True)


# ---- pods and the cluster --------------------------------------------------------------
@dataclass
class Pod:
    namespace: str
    name: str
    info: dict[str, Any]
    server: subprocess.Popen[str] | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ip(self) -> str:
        return str(self.info["ipv4"])

    @property
    def netns(self) -> str:
        return str(self.info["netns"])


def start_server(ns: str, ports: Sequence[int] = SERVER_PORTS) -> subprocess.Popen[str]:
    """The echo server in `ns`, returned once every socket is bound."""
    proc = netns.popen(ns, [PYTHON, SERVER, *map(str, ports)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "ready":
        netns.stop(proc)
        raise RuntimeError(f"echo server in {ns} did not start (said {line!r})")
    return proc


@dataclass
class Cluster:
    """An agent, namespaces x, y, z (labelled ns=NS) with pods a, b, c (labelled pod=NAME,
    and the c pods also team=red; named ports serve-80-tcp ...), the node ("host") and an
    outside host ("world" at 198.19.1.2, "world-2"/"world-3" from its extra addresses
    198.19.2.10/198.19.3.10), each running the echo server on ports 80-82."""

    agent: Agent
    namespaces: tuple[str, ...] = ("x", "y", "z")
    pod_names: tuple[str, ...] = ("a", "b", "c")
    pods: dict[str, Pod] = field(default_factory=dict)
    peers: dict[str, Peer] = field(default_factory=dict)
    servers: list[subprocess.Popen[str]] = field(default_factory=list)
    external: Any = None
    ns_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    base_pods: set[str] = field(default_factory=set)
    labels_changed: bool = False

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
        from membrane.endpoint.node import NodeInfo
        from membrane.endpoint.world import add_external_host

        node = NodeInfo(self.agent.node_netns, IPv4Address(NODE_IP))
        self.external = add_external_host(
            node,
            f"{self.agent.tag}w",
            IPv4Address(EXTERNAL_IP),
            IPv4Network(EXTERNAL_LINK),
            extra_ips=[IPv4Address(a) for a in EXTRA_IPS],
        )
        self.peers["host"] = Peer("host", self.agent.node_netns, NODE_IP)
        self.peers["world"] = Peer("world", self.external.netns, EXTERNAL_IP)
        for i, extra in enumerate(EXTRA_IPS, start=2):
            self.peers[f"world-{i}"] = Peer(f"world-{i}", self.external.netns, extra, bind=True)
        for ns in (self.agent.node_netns, self.external.netns):
            self.servers.append(start_server(ns))

    def add_pod(
        self,
        ns: str,
        name: str,
        labels: dict[str, str] | None = None,
        ports: Sequence[str] = (),
        serve: bool = True,
    ) -> Pod:
        args = ["endpoint", "add", f"{ns}/{name}"]
        for k, v in (labels or {}).items():
            args += ["--label", f"{k}={v}"]
        for p in ports:
            args += ["--port", p]
        pod = Pod(ns, name, self.agent.cli_json(*args))
        assert pod.netns.startswith(self.agent.prefix), pod.info
        if serve:
            pod.server = start_server(pod.netns)
        self.pods[pod.key] = pod
        self.peers[pod.key] = Peer(pod.key, pod.netns, pod.ip)
        return pod

    def delete_pod(self, key: str) -> None:
        pod = self.pods.pop(key)
        self.peers.pop(key, None)
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

    def check(self, reach: Reachability) -> None:
        check(self.peers, reach)

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
        for proc in [*self.servers, *(p.server for p in self.pods.values() if p.server)]:
            with contextlib.suppress(Exception):
                netns.stop(proc)
        try:
            self.agent.destroy()
        finally:
            if self.external is not None:
                with contextlib.suppress(OSError):
                    netns.delete(self.external.netns)


@contextlib.contextmanager
def running_cluster(
    workdir: Path | None = None,
    namespaces: tuple[str, ...] = ("x", "y", "z"),
    pod_names: tuple[str, ...] = ("a", "b", "c"),
) -> Iterator[Cluster]:
    """A fresh agent with the standard pods, torn down however the body ends."""
    own = workdir is None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="membrane-agent-"))
    tag = f"mbt{os.getpid() % 100000}{chr(ord('a') + next(_counter) % 26)}"
    cluster = Cluster(Agent(workdir, tag), namespaces, pod_names)
    try:
        cluster.setup()
        yield cluster
    finally:
        cluster.destroy()
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def agent_unusable_reason() -> str | None:
    """Why the agent cannot be used (skip reason), or None."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF): run the suite as root"
    if not os.path.exists(MEMBRANE):
        return f"{MEMBRANE} is not installed"
    return None


def cluster_fixture(**options: Any) -> Any:
    """A module-scoped `cluster` fixture: one agent and its pods for the whole module
    (options: namespaces, pod_names)."""

    @pytest.fixture(scope="module")
    def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
        reason = agent_unusable_reason()
        if reason:
            pytest.skip(reason)
        with running_cluster(tmp_path_factory.mktemp("agent"), **options) as c:
            yield c

    return cluster


_shared: dict[str, Cluster] = {}


def shared_cluster_fixture() -> Any:
    """A `cluster` fixture that hands every module the same standard cluster (x, y, z with
    a, b, c), built by the first module that asks and torn down at the end of the session
    (tests/integration/conftest.py calls `destroy_shared_clusters`): one start-up instead
    of one per module. Modules whose tests stop the agent use `cluster_fixture()`."""

    @pytest.fixture(scope="module")
    def cluster(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
        reason = agent_unusable_reason()
        if reason:
            pytest.skip(reason)
        if "standard" not in _shared:
            workdir = tmp_path_factory.mktemp("agent")
            tag = f"mbt{os.getpid() % 100000}s"
            c = Cluster(Agent(workdir, tag))
            try:
                c.setup()
            except BaseException:
                c.destroy()
                raise
            _shared["standard"] = c
        return _shared["standard"]

    return cluster


def destroy_shared_clusters() -> None:
    while _shared:
        _, c = _shared.popitem()
        c.destroy()


def net_fixture() -> Any:
    """The function-scoped `net` fixture: the module's cluster, reset after each test."""

    @pytest.fixture
    def net(cluster: Cluster) -> Iterator[Cluster]:
        yield cluster
        cluster.reset()

    return net
