"""New TCP connections per second and connect latency through a service address (ClusterIP
in 198.19.128.0/17) with 1, 1,000 and 10,000 services: Membrane's socket load balancer
against kube-proxy's iptables mode and its IPVS mode, and against no service at all.

One `membrane agent run` (node namespace of its own) gets a client pod and two backend
pods running the echo server on port 7000. N services (VIP i = 198.19.128.1 + i, port 80
to target port 7000, two backends each) are loaded one mechanism at a time; the measured
service is the one in the middle of the list (in iptables' linear KUBE-SERVICES chain, the
average position); the others' backends are addresses no pod has.
  direct        no service: the client connects to a backend pod's address (the floor)
  iptables-N    kube-proxy's iptables mode as kube-proxy writes it, loaded with
                iptables-restore --noflush into the node namespace's nat table:
                PREROUTING/OUTPUT -> KUBE-SERVICES (one rule per service port) ->
                KUBE-SVC-<hash> (KUBE-MARK-MASQ for sources outside the pod CIDR, then
                `-m statistic --mode random --probability` per endpoint) -> KUBE-SEP-<hash>
                (hairpin KUBE-MARK-MASQ, DNAT), POSTROUTING -> KUBE-POSTROUTING (MASQUERADE
                of marked packets). The nat table is restored to what it held afterwards.
  ipvs-N        kube-proxy's IPVS mode: a dummy device kube-ipvs0 holding the VIPs, one
                virtual service per VIP (scheduler rr), the backends as masquerading real
                servers, net.ipv4.vs.conntrack=1 (loaded with `ipvsadm -R`). Needs a kernel
                with CONFIG_IP_VS and CONFIG_DUMMY: where they are missing the scenario is
                reported unavailable, with the reason.
  membrane-N    the agent's services (socket LB: the connect hook picks the backend),
                created through the agent's API; unavailable while the agent has none.
  membrane-miss-N  the client in the socket LB's cgroup connecting to a backend's address
                (the hook runs, no frontend matches): what a pod's other connections pay.
Each loaded set is checked first: the measured VIP answers (both backends over a few
connects). Each measurement: a rate pass (`--clients` processes keeping `--inflight`
connections under way: connect, 64 bytes, their echo, close; connections/s) and a latency
pass (one connection at a time; p50/p99 of connect() to writable, so a connect hook's own
cost is inside it). Rounds measure direct between every two scenarios (direct, a, direct,
b, ...) and compare each rate with the mean of the direct ones around it, as
bench/conn_rate.py does: the load others put on a shared machine cancels out.

    python -m bench.service_connect [--duration S] [--rounds N] [--sizes 1,1000,10000]
        [--scenarios direct,iptables-1,...]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import yaml

from bench._common import emit, exit_on_sigterm, machine, median
from membrane import netns
from membrane.bpf.probe import temporary_cgroup
from membrane.testing.agent import POD_CIDR, AgentProcess, running_agent
from membrane.testing.builds import build_c_program
from membrane.testing.pods import Pod, add_pod, start_echo_server
from membrane.testing.traffic import connection_rate, join_cgroup

C_SOURCES = Path(__file__).resolve().parent / "c"
PORT = 80  # the services' port
TARGET_PORT = 7000  # the backends'
NAMESPACE = "bench"
FIRST_VIP = IPv4Address("198.19.128.1")  # in the default --service-cidr 198.19.128.0/17
PHANTOM_BACKENDS = IPv4Address("198.18.128.0")  # others' backends (2 x 10k): no pod has them
SIZES = (1, 1_000, 10_000)
MECHANISMS = ("iptables", "ipvs", "membrane")
TARGETS = {  # the issue's: Membrane's rate against each baseline, per size (None: any size)
    "iptables at 1 service": ("iptables", 1, 1.0),
    "iptables at the largest size": ("iptables", None, 5.0),
    "ipvs at every size": ("ipvs", 0, 1.0),
}


def vip(i: int) -> str:
    return str(FIRST_VIP + i)


def measured_index(n: int) -> int:
    return n // 2


@dataclass(frozen=True)
class ServiceSet:
    """N services, each VIP:PORT -> two backends:TARGET_PORT; the measured one (in the
    middle) -> the real backend pods."""

    n: int
    backends: tuple[str, str]

    def backends_of(self, i: int) -> tuple[str, str]:
        if i == measured_index(self.n):
            return self.backends
        return (str(PHANTOM_BACKENDS + 2 * i), str(PHANTOM_BACKENDS + 2 * i + 1))

    @property
    def measured_vip(self) -> str:
        return vip(measured_index(self.n))


# ---- kube-proxy, iptables mode ------------------------------------------------------------
def _chain(prefix: str, *parts: str) -> str:
    """kube-proxy's chain names: a prefix and 16 base32 characters of a SHA-256."""
    digest = hashlib.sha256("".join(parts).encode()).digest()
    return prefix + base64.b32encode(digest).decode()[:16]


HOOK_JUMPS = (
    '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
)


def kube_proxy_iptables(services: ServiceSet) -> str:
    """iptables-restore input for the nat table in kube-proxy's layout, without the hook
    chains' jumps into it (HOOK_JUMPS): chains nothing jumps to cost a packet nothing."""
    chains = [":KUBE-SERVICES - [0:0]", ":KUBE-POSTROUTING - [0:0]", ":KUBE-MARK-MASQ - [0:0]"]
    rules = [
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
    ]
    service_rules, per_service = [], []
    for i in range(services.n):
        name = f"{NAMESPACE}/svc-{i}:http"
        svc = _chain("KUBE-SVC-", name, "tcp")
        chains.append(f":{svc} - [0:0]")
        service_rules.append(
            f'-A KUBE-SERVICES -d {vip(i)}/32 -p tcp -m comment --comment "{name} cluster IP" '
            f"-m tcp --dport {PORT} -j {svc}"
        )
        per_service.append(
            f'-A {svc} ! -s {POD_CIDR} -d {vip(i)}/32 -p tcp -m comment --comment "{name} '
            f'cluster IP" -m tcp --dport {PORT} -j KUBE-MARK-MASQ'
        )
        backends = services.backends_of(i)
        for k, ip in enumerate(backends):
            sep = _chain("KUBE-SEP-", name, "tcp", f"{ip}:{TARGET_PORT}")
            chains.append(f":{sep} - [0:0]")
            left = len(backends) - k  # each rule takes 1/left of what the ones before left
            pick = f"-m statistic --mode random --probability {1 / left:.11f} " if left > 1 else ""
            per_service.append(
                f'-A {svc} -m comment --comment "{name} -> {ip}:{TARGET_PORT}" {pick}-j {sep}'
            )
            per_service += [
                f'-A {sep} -s {ip}/32 -m comment --comment "{name}" -j KUBE-MARK-MASQ',
                f'-A {sep} -p tcp -m comment --comment "{name}" -m tcp '
                f"-j DNAT --to-destination {ip}:{TARGET_PORT}",
            ]
    service_rules.append(
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must '
        'be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS'
    )
    chains.append(":KUBE-NODEPORTS - [0:0]")
    return "\n".join(["*nat", *chains, *rules, *service_rules, *per_service, "COMMIT", ""])


class Mechanism:
    """A way of serving N services. `prepare` builds them once per size (timed: what
    loading them costs); `attach`/`detach` put them on and off the path around each
    measurement, so the direct measurements between them see none; `release` removes them."""

    def unavailable(self) -> str | None:
        return None

    def prepare(self, services: ServiceSet) -> None:
        pass

    def attach(self) -> None:
        pass

    def detach(self) -> None:
        pass

    def release(self) -> None:
        pass


class IptablesServices(Mechanism):
    """kube-proxy's rules in the node namespace's nat table: loaded once per size as
    kube-proxy loads them (iptables-restore --noflush), on the path while the hook chains
    jump to them; `release` restores the nat table as it was."""

    def __init__(self, node_ns: str) -> None:
        self.ns = node_ns
        self.saved: str | None = None

    def unavailable(self) -> str | None:
        missing = [t for t in ("iptables-restore", "iptables-save") if not shutil.which(t)]
        return f"missing {', '.join(missing)} (setup installs iptables)" if missing else None

    def prepare(self, services: ServiceSet) -> None:
        self.saved = netns.run(self.ns, ["iptables-save", "-t", "nat"]).stdout
        rules = kube_proxy_iptables(services)
        netns.run(self.ns, ["iptables-restore", "--noflush"], input=rules, timeout=1800)
        listed = netns.run(self.ns, ["iptables", "-t", "nat", "-S", "KUBE-SERVICES"]).stdout
        if (held := len(listed.splitlines())) != services.n + 2:  # -N, the services, nodeports
            raise RuntimeError(f"KUBE-SERVICES holds {held} lines for {services.n} services")

    def _jumps(self, op: str) -> None:
        lines = ["*nat", *(rule.replace("-A ", f"{op} ", 1) for rule in HOOK_JUMPS), "COMMIT", ""]
        netns.run(self.ns, ["iptables-restore", "--noflush"], input="\n".join(lines))

    def attach(self) -> None:
        self._jumps("-A")

    def detach(self) -> None:
        self._jumps("-D")

    def release(self) -> None:
        if self.saved is not None:
            netns.run(self.ns, ["iptables-restore"], input=self.saved, timeout=1800)
            self.saved = None


class IpvsServices(Mechanism):
    """kube-proxy's IPVS mode in the node namespace. IPVS looks at every packet once any
    virtual service exists, so the table is loaded for each measurement and cleared after."""

    DEVICE = "kube-ipvs0"

    def __init__(self, node_ns: str) -> None:
        self.ns = node_ns
        self.services: ServiceSet | None = None

    def unavailable(self) -> str | None:
        if not shutil.which("ipvsadm"):
            return "missing ipvsadm (scripts/setup.sh installs it)"
        # IPVS is there when its module loads (or is built in): /proc/net/ip_vs appears
        try:
            loaded = subprocess.run(["modprobe", "ip_vs"], capture_output=True, text=True)
            said = (loaded.stderr.strip().splitlines() or ["loaded, yet"])[-1]
        except FileNotFoundError:
            said = "no modprobe (kmod) to load it"
        if not netns.run(self.ns, ["test", "-e", "/proc/net/ip_vs"], check=False).returncode:
            return self._dummy_problem()
        return f"this kernel has no IPVS (CONFIG_IP_VS): {said}; no /proc/net/ip_vs"

    def _dummy_problem(self) -> str | None:
        dummy = netns.run(self.ns, ["ip", "link", "add", "mbprobe0", "type", "dummy"], check=False)
        if dummy.returncode != 0:
            return f"this kernel has no dummy devices (CONFIG_DUMMY): {dummy.stderr.strip()}"
        netns.run(self.ns, ["ip", "link", "del", "mbprobe0"])
        return None

    def prepare(self, services: ServiceSet) -> None:
        self.services = services
        with netns.inside(self.ns):
            netns.write_sysctl("net.ipv4.vs.conntrack", 1)

    def attach(self) -> None:
        assert self.services is not None
        n = self.services.n
        netns.run(self.ns, ["ip", "link", "add", self.DEVICE, "type", "dummy"])
        addresses = [f"address add {vip(i)}/32 dev {self.DEVICE}" for i in range(n)]
        netns.run(self.ns, ["ip", "-batch", "-"], input="\n".join(addresses) + "\n", timeout=600)
        table = []
        for i in range(n):
            table.append(f"-A -t {vip(i)}:{PORT} -s rr")
            table += [
                f"-a -t {vip(i)}:{PORT} -r {ip}:{TARGET_PORT} -m -w 1"
                for ip in self.services.backends_of(i)
            ]
        netns.run(self.ns, ["ipvsadm", "-R"], input="\n".join(table) + "\n", timeout=600)

    def detach(self) -> None:
        netns.run(self.ns, ["ipvsadm", "-C"], check=False)
        netns.run(self.ns, ["ip", "link", "del", self.DEVICE], check=False)

    release = detach


# ---- Membrane -----------------------------------------------------------------------------
class MembraneServices(Mechanism):
    """The agent's services (ClusterIPs given, EndpointSlices), imported as Kubernetes YAML
    through its API; the socket LB translates at connect() for the processes of the
    agent's --cgroup-root, where the client runs in these scenarios only. Sizes go up, so
    each size's import adds to (and re-points) the services of the one before; the agent
    removes them all when it goes."""

    def __init__(self, agent: AgentProcess, cgroup: Path) -> None:
        self.agent, self.cgroup = agent, cgroup
        self.import_s: float | None = None  # the last size's POST /v1/services/import

    def unavailable(self) -> str | None:
        try:
            self.agent.api("GET", "/v1/services")
        except Exception as err:
            return f"the agent serves no /v1/services ({type(err).__name__}: {err})"
        return None

    def prepare(self, services: ServiceSet) -> None:
        docs = []
        for i in range(services.n):
            name = f"svc-{i}"
            docs.append(
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": name, "namespace": NAMESPACE},
                    "spec": {
                        "clusterIP": vip(i),
                        "ports": [{"name": "http", "port": PORT, "targetPort": TARGET_PORT}],
                    },
                }
            )
            docs.append(
                {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": f"{name}-1",
                        "namespace": NAMESPACE,
                        "labels": {"kubernetes.io/service-name": name},
                    },
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}],
                    "endpoints": [{"addresses": [ip]} for ip in services.backends_of(i)],
                }
            )
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's: the bench's own cost
        text = yaml.dump_all(docs, Dumper=dumper, sort_keys=False)
        t = time.perf_counter()
        self.agent.client(timeout=None).post("/v1/services/import", {"yaml": text})
        self.import_s = round(time.perf_counter() - t, 2)


class SocketLbClient(Mechanism):
    """No services of its own: the client runs in the socket LB's cgroup and connects to
    a backend's address, so the connect hook runs and finds no frontend (what every
    connection of a pod to a non-service address pays), with the Membrane services of the
    size loaded."""

    def __init__(self, cgroup: Path) -> None:
        self.cgroup = cgroup


# ---- measuring ----------------------------------------------------------------------------
@dataclass
class Scenario:
    name: str
    kind: str  # direct or a mechanism's name
    services: ServiceSet | None = None
    mechanism: Mechanism = field(default_factory=Mechanism)
    per_s: list[float] = field(default_factory=list)
    base: list[float] = field(default_factory=list)  # mean of the direct ones around each
    connect_us: list[int] = field(default_factory=list)  # the latency passes, all rounds
    to_backend: bool = False  # connect to a backend's address, not the measured VIP
    prepare_s: float | None = None  # loading the services, once
    import_s: float | None = None  # Membrane: the import request alone (no YAML writing)
    attach_s: list[float] = field(default_factory=list)  # putting them on the path, each time
    failed: dict[str, int] = field(default_factory=dict)
    checked: bool = False

    @property
    def cgroup(self) -> Path | None:
        """Where the clients run: the socket LB's cgroup for Membrane's scenarios only."""
        return getattr(self.mechanism, "cgroup", None)

    def target(self, direct_to: str) -> tuple[str, int]:
        if self.services is None or self.to_backend:
            return (direct_to, TARGET_PORT)
        return (self.services.measured_vip, PORT)


def percentile(values: list[int], q: float) -> float:
    return round(statistics.quantiles(values, n=100)[int(q) - 1]) if len(values) > 1 else 0


# Holds COUNT connections to HOST:PORT open until its stdin closes.
_HOLD = (
    "import socket, sys\n"
    "host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n"
    "socks = [socket.create_connection((host, port), timeout=2) for _ in range(count)]\n"
    "print('held', flush=True)\n"
    "sys.stdin.read()\n"
)


def start_c_echo_server(ns: str, program: Path, processes: int) -> subprocess.Popen[str]:
    """bench/c/echo_server.c on TARGET_PORT in `ns`, returned once it listens."""
    proc = netns.popen(ns, [str(program), str(TARGET_PORT), str(processes)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        netns.stop(proc)
        raise RuntimeError(f"the C echo server in {ns} did not start")
    return proc


def check_reaches_both(
    client: Pod, address: tuple[str, int], backends: tuple[Pod, ...], cgroup: Path | None
) -> None:
    """20 connections to `address` from a client process (in `cgroup`, if given), held
    open, are all established and reach every backend (counted in the backends'
    namespaces), or the scenario is not measured."""
    argv = [sys.executable, "-c", _HOLD, address[0], str(address[1]), "20"]
    proc = netns.popen(
        client.netns,
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        preexec_fn=None if cgroup is None else partial(join_cgroup, cgroup),
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "held":
            raise RuntimeError(f"connections to {address[0]}:{address[1]} failed")
        seen = {}
        for pod in backends:
            listed = netns.run(
                pod.netns, ["ss", "-Htn", "state", "established", f"( sport = :{TARGET_PORT} )"]
            ).stdout
            seen[pod.name] = sum(client.ip in line for line in listed.splitlines())
    finally:
        netns.stop(proc)
    if sum(seen.values()) != 20 or not all(seen.values()):
        raise RuntimeError(f"20 connections to {address[0]}:{address[1]} reached {seen}")


def relative(s: Scenario) -> list[float]:
    return [v / b for v, b in zip(s.per_s, s.base, strict=True)]


def summarize(scenarios: dict[str, Scenario]) -> dict[str, dict[str, Any]]:
    rows = {}
    for s in scenarios.values():
        row: dict[str, Any] = {
            "mechanism": s.kind,
            "services": s.services.n if s.services else 0,
            "connections_per_s": round(median(s.per_s)),
            "connect_p50_us": percentile(s.connect_us, 50),
            "connect_p99_us": percentile(s.connect_us, 99),
        }
        if s.base:
            row["vs_direct"] = round(median(relative(s)), 3)
            row["cost_us_per_connection"] = round(
                median([1e6 / v - 1e6 / b for v, b in zip(s.per_s, s.base, strict=True)]), 1
            )
        row |= {
            "rounds_per_s": [round(v) for v in s.per_s],
            "rounds_direct_around_per_s": [round(v) for v in s.base],
            "load_s": s.prepare_s,
            "import_request_s": s.import_s,
            "attach_s_rounds": s.attach_s,
            "failed": s.failed,
        }
        rows[s.name] = row
    return rows


def targets(scenarios: dict[str, Scenario], sizes: list[int]) -> list[dict[str, Any]]:
    """Membrane's rate over each baseline's, round by round against their own direct
    neighbours; only where both were measured."""
    out = []
    for label, (other, size, limit) in TARGETS.items():
        for n in sizes if size == 0 else [sizes[-1] if size is None else size]:
            ours, theirs = scenarios.get(f"membrane-{n}"), scenarios.get(f"{other}-{n}")
            if ours is None or theirs is None or not ours.per_s or not theirs.per_s:
                continue
            value = round(
                median([a / b for a, b in zip(relative(ours), relative(theirs), strict=True)]), 3
            )
            out.append(
                {
                    "name": f"membrane >= {limit:g}x {label} ({n})",
                    "value": value,
                    "limit": limit,
                    "met": value >= limit,
                }
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per rate pass")
    parser.add_argument(
        "--latency-duration", type=float, default=1.0, help="seconds per latency pass"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all scenarios")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="service counts")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument(
        "--server-processes", type=int, default=2, help="C echo server processes per backend"
    )
    parser.add_argument("--inflight", type=int, default=64, help="connections under way")
    parser.add_argument("--scenarios", default="", help="comma-separated subset (default all)")
    parser.add_argument(
        "--client",
        choices=("c", "python"),
        default="c",
        help="c: bench/c's client and echo server (the path bounds the rate); python: "
        "membrane.testing's (the first runs' harness, bounded by the interpreter)",
    )
    args = parser.parse_args()
    sizes = sorted({int(n) for n in args.sizes.split(",") if n})
    if not sizes or sizes[0] < 1 or sizes[-1] > 30_000:
        parser.error("--sizes: service counts from 1 to 30000 (the VIPs fit 198.19.128.0/17)")
    exit_on_sigterm()
    host = machine()
    started = time.monotonic()

    tag = f"msc{os.getpid() % 100000}"
    with (
        temporary_cgroup(f"membrane-bench-{tag}") as cgroup,
        running_agent(
            tag,
            log_level="warning",
            memory_limit=None,
            extra_args=["--cgroup-root", str(cgroup)],
        ) as agent,
        ExitStack() as stack,
    ):
        print(f"agent: node netns {agent.node_netns}, pods {agent.prefix}*", file=sys.stderr)
        api = agent.client(timeout=120.0)
        client = add_pod(api, NAMESPACE, "client", {"app": "client"})[0]
        backends = tuple(
            add_pod(api, NAMESPACE, f"backend-{k}", {"app": "backend"})[0] for k in range(2)
        )
        churn: Path | None = None
        if args.client == "c":
            built = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="msc-")))
            churn = build_c_program(C_SOURCES / "conn_churn.c", built)
            echo = build_c_program(C_SOURCES / "echo_server.c", built)
        for pod in backends:
            if churn is not None:
                server = start_c_echo_server(pod.netns, echo, args.server_processes)
            else:
                server = start_echo_server(pod.netns, (TARGET_PORT,))
            stack.callback(netns.stop, server)
        pair = (backends[0].ip, backends[1].ip)
        mechanisms: dict[str, Mechanism] = {
            "iptables": IptablesServices(agent.node_netns),
            "ipvs": IpvsServices(agent.node_netns),
            "membrane": MembraneServices(agent, cgroup),
        }
        unavailable = {m: why for m, impl in mechanisms.items() if (why := impl.unavailable())}
        if "membrane" in unavailable:
            unavailable["membrane-miss"] = unavailable["membrane"]
        direct = Scenario("direct", "direct")
        everything = {"direct": direct}
        for n in sizes:
            for m, impl in mechanisms.items():
                everything[f"{m}-{n}"] = Scenario(f"{m}-{n}", m, ServiceSet(n, pair), impl)
            everything[f"membrane-miss-{n}"] = Scenario(
                f"membrane-miss-{n}", "membrane-miss", ServiceSet(n, pair),
                SocketLbClient(cgroup), to_backend=True,
            )  # fmt: skip
        wanted = [s for s in args.scenarios.split(",") if s] or list(everything)
        if unknown := set(wanted) - set(everything):
            parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
        scenarios = {
            name: s
            for name, s in everything.items()
            if (name in wanted or s is direct) and s.kind not in unavailable
        }
        setup_s = time.monotonic() - started

        def measure(s: Scenario) -> float:
            t = time.perf_counter()
            s.mechanism.attach()
            try:
                s.attach_s.append(round(time.perf_counter() - t, 3))
                ip, port = s.target(backends[0].ip)
                if not s.checked:  # direct reaches one backend by its address
                    reached = backends[:1] if s.to_backend or s is direct else backends
                    check_reaches_both(client, (ip, port), reached, s.cgroup)
                    s.checked = True
                rate = connection_rate(
                    client.netns,
                    ip,
                    port,
                    args.duration,
                    args.clients,
                    args.inflight,
                    s.cgroup,
                    churn,
                )
                latency = connection_rate(
                    client.netns, ip, port, args.latency_duration, 1, 1, s.cgroup, churn
                )  # fmt: skip
            finally:
                s.mechanism.detach()
            s.per_s.append(rate.per_s)
            s.connect_us += latency.connect_us
            for kind, k in (rate.failed | latency.failed).items():
                s.failed[kind] = s.failed.get(kind, 0) + k
            return rate.per_s

        # Size by size: each mechanism's services loaded once, then rounds of direct, a,
        # direct, b, ... (order rotating), each on the path only while it is measured.
        for n in sizes:
            block = [s for s in scenarios.values() if s.services and s.services.n == n]
            if not block:
                continue
            for s in block:
                assert s.services is not None
                t = time.perf_counter()
                s.mechanism.prepare(s.services)
                stack.callback(s.mechanism.release)
                s.prepare_s = round(time.perf_counter() - t, 2)
                s.import_s = getattr(s.mechanism, "import_s", None)
            for rnd in range(args.rounds):
                before = measure(direct)
                for s in block[rnd % len(block) :] + block[: rnd % len(block)]:
                    measure(s)
                    after = measure(direct)
                    s.base.append((before + after) / 2)
                    before = after
                agent.check_alive()
                print(f"  {n} services: round {rnd + 1}/{args.rounds} done", file=sys.stderr)
            for s in block:
                s.mechanism.release()

    rows = summarize(scenarios)
    out = {
        "bench": "service_connect",
        "machine": {**host, "loadavg_1m_at_end": os.getloadavg()[0]},
        "method": {
            "path": "client pod -> veth -> node netns -> veth -> backend pod; endpoint "
            "programs on every veth in every scenario; iptables and IPVS translate in the "
            "node namespace, Membrane at the client's connect()",
            "services": f"VIP i = {FIRST_VIP} + i, port {PORT} -> {TARGET_PORT}, two backends "
            "each; the measured one is service n//2",
            "connection": "connect, send 64 bytes, read the echo, close (client first)",
            "client": "bench/c/conn_churn.c, bench/c/echo_server.c "
            f"({args.server_processes} SO_REUSEPORT processes per backend)"
            if churn
            else "membrane.testing connection_churn.py and echo_server.py (Python)",
            "rate_pass": {
                "clients": args.clients,
                "inflight": args.inflight,
                "duration_s": args.duration,
            },
            "latency_pass": "one connection at a time for --latency-duration s; connect() to "
            f"writable ({args.latency_duration:g} s per measurement)",
            "statistic": "direct between every two scenarios; each rate against the mean of "
            "the direct ones around it; medians over rounds",
            "rounds": args.rounds,
            "sizes": sizes,
            "seconds_setup": round(setup_s),
            "seconds_total": round(time.monotonic() - started),
        },
        "unavailable": unavailable,
        "scenarios": rows,
        "targets": targets(scenarios, sizes),
    }
    summary = [
        f"{'scenario':16} {'conn/s':>8} {'vs direct':>9} {'us/conn':>8} "
        f"{'p50 us':>7} {'p99 us':>7} {'load s':>7}  failed"
    ]
    for name, r in rows.items():
        failed = ", ".join(f"{k} {v}" for k, v in r["failed"].items()) or "-"
        summary.append(
            f"{name:16} {r['connections_per_s']:8} {r.get('vs_direct', 1):9.2f} "
            f"{r.get('cost_us_per_connection', 0):8.1f} {r['connect_p50_us']:7} "
            f"{r['connect_p99_us']:7} {r['load_s'] or 0:7.2f}  {failed}"
        )
    for m, why in unavailable.items():
        summary.append(f"{m}: unavailable: {why}")
    for t in out["targets"]:
        summary.append(f"target: {t['name']}: {t['value']} -> {'met' if t['met'] else 'MISSED'}")
    emit(out, summary)


if __name__ == "__main__":
    main()
