"""Control plane: how long the agent takes to enforce a policy change and to add or delete an
endpoint, and whether a node with 500 endpoints still works.

Everything runs against a real `membrane agent run` (its own node namespace, state
directory, API socket and pod-namespace prefix), driven through its REST API the way the
CLI drives it. A policy import returns when every affected endpoint's datapath enforces the
new revision, so the wall time of the API call is the time until enforced; right after it
returns, TCP connects between pods (and from an outside address) must show the new verdict
on their first SYN, or the benchmark fails.

Phases (each with a fresh agent):

  policy     1-rule changes, imports of 1,000 to 10,000 rules, 1-rule changes with the
             largest of them in force (a size predicted to take over --max-wait is skipped
             and reported as such)
  endpoints  adding (and deleting) 1 endpoint on an empty node, and 100 in a row
  scale      500 endpoints under a policy: adds, `membrane endpoint list`, sampled
             reachability, agent RSS, BPF map and program sizes, a policy change, and the
             endpoint plumbing test suite run while they exist

    python -m bench.control_plane [--phases policy,endpoints,scale] [--profile DIR]

`--profile DIR` attaches py-spy to the agent during the expensive steps and writes the
folded stacks (DIR/<step>.txt) plus their hottest functions into the JSON (the sampler
costs the agent time: compare timings from runs without it). Method and results:
bench/RESULTS.md, section control_plane.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from bench._common import emit, exit_on_sigterm, machine, median
from membrane import netns
from membrane.api.client import ApiClient
from membrane.bpf import Map
from membrane.bpf.links import Link
from membrane.datapath.abi import NODE_MAPS
from membrane.datapath.endpoint_prog import detach_all_endpoints
from membrane.endpoint.node import NodeInfo
from membrane.endpoint.world import add_external_host

REPO = Path(__file__).resolve().parents[1]
MEMBRANE = str(REPO / ".venv" / "bin" / "membrane")
PY_SPY = str(REPO / ".venv" / "bin" / "py-spy")
BPF_ROOT = Path("/sys/fs/bpf/membrane/agent")
NODE_IP = "198.19.0.1"
POD_CIDR = "198.18.0.0/16"
EXTERNAL_IP = "198.19.1.2"  # the outside host, on a /30 link to the node
EXTERNAL_LINK = "198.19.1.0/30"
BULK_CIDRS = IPv4Network("198.19.64.0/18")  # the /32 peers of the bulk rules
BULK_EXTERNAL = IPv4Address("198.19.100.7")  # an outside address one bulk rule names
ONE_EXTERNAL = IPv4Address("198.19.200.7")  # the outside address of the 1-rule CIDR change
PORT = 8080
PROBE_TIMEOUT = 0.5  # an echo takes well under 1 ms here; SYN retransmits come after 1 s
READY_LINE = "membrane agent ready"
SLOW_S = 10.0  # a change slower than this is measured once, not `--reps` times

TARGETS = {
    "policy_1_rule_ms": 100.0,
    "policy_10000_rules_ms": 2000.0,
    "endpoint_add_ms": 150.0,
}


# ---- the agent -------------------------------------------------------------------------
class BenchAgent:
    """One `membrane agent run` with everything of its own; `destroy()` removes it all."""

    def __init__(self, workdir: Path, tag: str) -> None:
        self.tag = tag
        self.node_netns = f"{tag}n"
        self.prefix = f"{tag}-"
        self.external_netns = f"{tag}w"
        self.state_dir = workdir / "state"
        self.socket = str(workdir / "api.sock")
        self.log_path = workdir / "agent.log"
        self.bpf_dir = BPF_ROOT / self.node_netns
        self.proc: subprocess.Popen[str] | None = None
        self.api = ApiClient(self.socket, timeout=3600.0)
        self.node = NodeInfo(self.node_netns, IPv4Address(NODE_IP))

    def start(self, timeout: float = 60.0) -> None:
        """Start the agent and wait for its ready line."""
        argv = [
            MEMBRANE, "agent", "run",
            "--state-dir", str(self.state_dir),
            "--api-socket", self.socket,
            "--node-netns", self.node_netns,
            "--pod-cidr", POD_CIDR,
            "--node-ip", NODE_IP,
            "--netns-prefix", self.prefix,
        ]  # fmt: skip
        started = time.perf_counter()
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
            )
        assert self.proc.stdout is not None
        deadline = started + timeout
        while True:
            left = deadline - time.perf_counter()
            if self.proc.poll() is not None or left <= 0:
                raise RuntimeError(f"the agent did not start; log:\n{self.log_tail()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.5))
            if ready and READY_LINE in self.proc.stdout.readline():
                return

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def memory_kib(self) -> dict[str, int]:
        """The agent's resident set now and at its peak (VmRSS, VmHWM)."""
        found = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0])
        return {"rss_kib": found["VmRSS"], "peak_rss_kib": found["VmHWM"]}

    def enforced_seconds(self) -> list[float]:
        """The agent's own `seconds` of every "policy revision enforced" log line so far."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if '"policy revision enforced"' in line:
                with contextlib.suppress(ValueError, KeyError):
                    out.append(float(json.loads(line)["seconds"]))
        return out

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "MEMBRANE_API_SOCKET": self.socket}
        return subprocess.run(
            [MEMBRANE, *args], capture_output=True, text=True, env=env, timeout=300, check=True
        )

    def destroy(self) -> None:
        """Stop the agent (by its pid) and remove its namespaces, pins and state."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        detach_all_endpoints(str(self.bpf_dir))  # one by one: see RESULTS.md, teardown
        for name in netns.names():
            if name.startswith(self.prefix):
                with contextlib.suppress(OSError):
                    netns.delete(name)
        for name in (self.external_netns, self.node_netns):
            with contextlib.suppress(OSError):
                netns.delete(name)
        shutil.rmtree(self.bpf_dir, ignore_errors=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)


@contextlib.contextmanager
def running_agent(label: str) -> Iterator[BenchAgent]:
    workdir = Path(tempfile.mkdtemp(prefix=f"membrane-cp-{label}-"))
    agent = BenchAgent(workdir, f"mbcp{os.getpid() % 100000}{label[0]}")
    print(
        f"   agent {agent.tag}: node netns {agent.node_netns}, pods {agent.prefix}*",
        file=sys.stderr,
    )
    try:
        agent.start()
        yield agent
    except BaseException:
        print(f"   agent log tail:\n{agent.log_tail()}", file=sys.stderr)
        raise
    finally:
        close_all_listeners()
        started = time.perf_counter()
        agent.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
        TEARDOWN[label] = {"destroy_s": round(time.perf_counter() - started, 2), **settle()}


TEARDOWN: dict[str, dict[str, Any]] = {}


def blocked_tasks() -> int:
    """Tasks in uninterruptible sleep (D): freeing namespaces and tcx links makes the
    kernel queue one worker per link behind the RTNL lock."""
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "D":
                count += 1
    return count


def settle(timeout: float = 120.0) -> dict[str, Any]:
    """Wait until the kernel has worked off what a teardown queued (few blocked tasks for
    a second), so the next phase does not pay for this one's; how long that took. Other
    users of the machine can hold it up too."""
    started = time.perf_counter()
    peak, calm = 0, 0
    while time.perf_counter() - started < timeout and calm < 4:
        blocked = blocked_tasks()
        peak = max(peak, blocked)
        calm = calm + 1 if blocked < 5 else 0
        time.sleep(0.25)
    return {"kernel_settle_s": round(time.perf_counter() - started, 2), "peak_blocked_tasks": peak}


# ---- pods, listeners and probes ----------------------------------------------------------
LISTENERS: set[socket.socket] = set()


@dataclass
class Pod:
    key: str
    netns: str
    ip: str
    listener: socket.socket | None = None


def add_endpoint(
    agent: BenchAgent, ns: str, name: str, labels: dict[str, str]
) -> tuple[Pod, float]:
    """Add an endpoint through the API; the pod and the call's wall time."""
    body = {"namespace": ns, "name": name, "labels": labels, "ports": []}
    started = time.perf_counter()
    info = agent.api.post("/v1/endpoints", body)
    elapsed = time.perf_counter() - started
    return Pod(f"{ns}/{name}", info["netns"], info["ipv4"]), elapsed


def delete_endpoint(agent: BenchAgent, pod: Pod) -> float:
    close_listener(pod)
    ns, name = pod.key.split("/")
    started = time.perf_counter()
    agent.api.delete(f"/v1/endpoints/{ns}/{name}")
    return time.perf_counter() - started


def listen(pod: Pod, port: int = PORT) -> None:
    """A TCP listener in the pod; the kernel completes handshakes without accept(), so a
    probe's connect succeeds exactly when the datapath lets SYN and SYN-ACK through."""
    with netns.inside(pod.netns):
        sock = socket.create_server((pod.ip, port), backlog=4096)
    sock.setblocking(False)
    pod.listener = sock
    LISTENERS.add(sock)


def drain(pods: Sequence[Pod]) -> None:
    for pod in pods:
        while pod.listener is not None:
            try:
                conn, _ = pod.listener.accept()
            except BlockingIOError:
                break
            conn.close()


def close_listener(pod: Pod) -> None:
    if pod.listener is not None:
        LISTENERS.discard(pod.listener)
        pod.listener.close()
        pod.listener = None


def close_all_listeners() -> None:
    """A socket keeps its namespace alive after the namespace's name is gone."""
    while LISTENERS:
        LISTENERS.pop().close()


@dataclass(frozen=True)
class Source:
    """Where a probe starts: a namespace, and an address to send from (or None)."""

    name: str
    netns: str
    bind: str | None = None


def source_of(pod: Pod) -> Source:
    return Source(pod.key, pod.netns)


def connect(src: Source, dst_ip: str, port: int = PORT, timeout: float = PROBE_TIMEOUT) -> bool:
    """One TCP connect: True when the handshake completes within `timeout` (its first SYN:
    the kernel retransmits only after 1 s)."""
    with netns.inside(src.netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if src.bind:
            sock.bind((src.bind, 0))
        sock.settimeout(timeout)
        sock.connect((dst_ip, port))
        return True
    except OSError:  # timeout (the datapath dropped the SYN) or refused
        return False
    finally:
        sock.close()


Case = tuple[Source, Pod, bool]  # source, destination, expected verdict (True: allowed)


def probe(cases: Sequence[Case], port: int = PORT) -> list[str]:
    """Run every case at once; a description of each case that went wrong (empty: all as
    expected)."""
    with ThreadPoolExecutor(max_workers=min(64, max(1, len(cases)))) as pool:
        got = list(pool.map(lambda c: connect(c[0], c[1].ip, port), cases))
    drain([dst for _, dst, _ in cases])
    return [
        f"{src.name} -> {dst.key}:{port} expected {'allowed' if want else 'denied'}"
        for (src, dst, want), ok in zip(cases, got, strict=True)
        if ok != want
    ]


def require(wrong: list[str], when: str) -> None:
    if wrong:
        raise AssertionError(f"{when}: {len(wrong)} probe(s) wrong: " + "; ".join(wrong[:10]))


# ---- BPF state -------------------------------------------------------------------------
def map_entries(agent: BenchAgent, name: str) -> int:
    with Map.from_pin(str(agent.bpf_dir / name)) as m:
        return len(m)


def _memlock(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("memlock:"):
                return int(line.split()[1])
    return 0


def bpf_footprint(agent: BenchAgent) -> dict[str, Any]:
    """Per node map: max entries, entries in use, kernel memory (fdinfo memlock); and the
    endpoint programs behind this agent's pinned links (count, JIT size, memlock)."""
    maps = {}
    for name in NODE_MAPS:
        with Map.from_pin(str(agent.bpf_dir / name)) as m:
            counted = name not in ("events", "events_lost")  # a ring; a per-CPU counter
            maps[name] = {
                "max_entries": m.max_entries,
                "entries": len(m) if counted else None,
                "memlock_bytes": _memlock(m.fd),
            }
    prog_ids = set()
    links_root = agent.bpf_dir / "endpoint_links"
    for pin in links_root.glob("*/*"):
        with Link.from_pin(str(pin), kind="tcx") as link:
            prog_ids.add(int(link.info().prog_id))
    progs = json.loads(
        subprocess.run(
            ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True
        ).stdout
    )
    ours = [p for p in progs if p["id"] in prog_ids]
    return {
        "maps": maps,
        "maps_memlock_bytes": sum(m["memlock_bytes"] for m in maps.values()),
        "programs": len(ours),
        "programs_jited_bytes": sum(p.get("bytes_jited", 0) for p in ours),
        "programs_memlock_bytes": sum(p.get("bytes_memlock", 0) for p in ours),
    }


# ---- profiling ---------------------------------------------------------------------------
class Profiler:
    """py-spy on the agent around chosen steps (none when `directory` is None)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.results: dict[str, Any] = {}

    @contextlib.contextmanager
    def __call__(self, agent: BenchAgent, step: str, enabled: bool = True) -> Iterator[None]:
        if self.directory is None or not enabled:
            yield
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        out = self.directory / f"{step}.txt"
        proc = subprocess.Popen(
            [PY_SPY, "record", "--pid", str(agent.pid), "--rate", "250", "--format", "raw",
             "--nonblocking", "--output", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 10)  # "Sampling process ..."
            said = proc.stdout.readline() if ready else ""
            if "Sampling" not in said:
                raise RuntimeError(f"py-spy did not start: {said!r}")
            yield
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
        if out.exists():
            self.results[step] = hotspots(out)


# Frames every stack of the worker thread or the event loop passes through.
_PLUMBING = ("threading.py", "futures/thread.py", "asyncio/", "selectors.py", "<module>")


def _function(frame: str) -> str:
    """`name (path/to/module.py:123)` -> `name (module.py)`; lines vary, functions don't."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    short = "/".join(path.split("/")[-2:])
    return f"{name} ({short})" if where else name


def hotspots(folded: Path, top: int = 25) -> dict[str, Any]:
    """Share of samples in each function (inclusive: anywhere on the stack; self: on top)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_function(f) for f in stack.split(";")]
        if frames and frames[0].startswith("process "):
            frames = frames[1:]  # py-spy's "process 123:..." and "thread ..." roots
        frames = [f for f in frames if not f.startswith("thread ")]
        total += n
        for name in set(frames):
            if not any(p in name for p in _PLUMBING):
                inclusive[name] += n
        if frames:
            own[frames[-1]] += n

    def share(c: Counter[str]) -> list[list[Any]]:
        return [[name, round(n / total, 3)] for name, n in c.most_common(top)]

    return {"samples": total, "inclusive": share(inclusive), "self": share(own)}


# ---- statistics --------------------------------------------------------------------------
def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def stats_ms(values: Sequence[float]) -> dict[str, Any]:
    """median, p90 and max of durations in seconds, in ms."""
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return {
        "n": len(ordered),
        "median_ms": ms(median(ordered)),
        "p90_ms": ms(p90),
        "max_ms": ms(ordered[-1]),
        "min_ms": ms(ordered[0]),
    }


def trend(values: Sequence[float], block: int) -> list[dict[str, Any]]:
    """stats_ms per block of `block` consecutive values (how a filling node slows down)."""
    return [
        {"endpoints": f"{i + 1}-{min(i + block, len(values))}", **stats_ms(values[i : i + block])}
        for i in range(0, len(values), block)
    ]


# ---- policies ----------------------------------------------------------------------------
def _ports(port: int) -> str:
    return f'    toPorts:\n    - ports:\n      - port: "{port}"\n        protocol: TCP\n'


def rule_from_endpoints(labels: dict[str, str], port: int = PORT) -> str:
    match = "".join(f"        {k}: {v}\n" for k, v in labels.items())
    return f"  - fromEndpoints:\n    - matchLabels:\n{match}{_ports(port)}"


def rule_from_cidr(cidr: IPv4Network | IPv4Address, port: int = PORT) -> str:
    net = IPv4Network(cidr)
    return f"  - fromCIDR:\n    - {net}\n{_ports(port)}"


def cnp(name: str, namespace: str, selector: dict[str, str], rules: Sequence[str]) -> str:
    """A CiliumNetworkPolicy in the block style kubectl prints, with `rules` as its
    ingress section."""
    match = "".join(f"      {k}: {v}\n" for k, v in selector.items())
    return (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
        f"metadata:\n  name: {name}\n  namespace: {namespace}\n"
        f"spec:\n  endpointSelector:\n    matchLabels:\n{match}  ingress:\n" + "".join(rules)
    )


def bulk_rules(count: int, seed: int = 11) -> list[str]:
    """`count` ingress rules: 90 % `fromCIDR` with one distinct /32 of 198.19.64.0/18 on
    TCP 8080 (among them BULK_EXTERNAL, in the middle), 10 % `fromEndpoints role=client`
    each on its own TCP port from 10000 up, and last `fromEndpoints role=bulk` on TCP 8080:
    the rule the probes check (with the CIDR one)."""
    if count < 2:
        raise ValueError("a bulk policy has at least 2 rules (the probed ones)")
    rng = random.Random(seed)
    body = count - 1
    endpoint_rules = body // 10
    cidr_count = body - endpoint_rules
    pool = [a for a in BULK_CIDRS if a != BULK_EXTERNAL]
    addresses = rng.sample(pool, max(0, cidr_count - 1))
    if cidr_count:
        addresses.insert(len(addresses) // 2, BULK_EXTERNAL)
    rules = [rule_from_cidr(a) for a in addresses]
    for i in range(endpoint_rules):  # spread through the list
        rules.insert(i * 10 + 9, rule_from_endpoints({"role": "client"}, 10000 + i))
    rules.append(rule_from_endpoints({"role": "bulk"}))
    return rules


def import_policy(agent: BenchAgent, text: str) -> float:
    started = time.perf_counter()
    agent.api.post("/v1/policies", {"yaml": text})
    return time.perf_counter() - started


def delete_policy(agent: BenchAgent, namespace: str, name: str) -> float:
    started = time.perf_counter()
    agent.api.delete("/v1/policies", {"namespace": namespace, "name": name})
    return time.perf_counter() - started


@dataclass
class Change:
    """A measured policy change: import (or delete), then the probes that must flip."""

    label: str
    seconds: list[float] = field(default_factory=list)
    agent_seconds: list[float] = field(default_factory=list)
    probes_checked: int = 0

    def summary(self) -> dict[str, Any]:
        out = {"label": self.label, **stats_ms(self.seconds), "probes_checked": self.probes_checked}
        if self.agent_seconds:
            out["agent_reported_median_ms"] = ms(median(self.agent_seconds))
        return out


def timed_change(
    change: Change,
    agent: BenchAgent,
    act: Callable[[], float],
    before: Sequence[Case],
    after: Sequence[Case],
) -> None:
    """Check `before` (the old verdicts), run `act` (returns its wall time), then at once
    check `after` (the new verdicts, each probe's first SYN)."""
    require(probe(before), f"{change.label}: before")
    logged = len(agent.enforced_seconds())
    change.seconds.append(act())
    require(probe(after), f"{change.label}: right after the call returned")
    change.probes_checked += len(before) + len(after)
    change.agent_seconds += agent.enforced_seconds()[logged:]


def flip(cases: Sequence[Case]) -> list[Case]:
    return [(s, d, not want) for s, d, want in cases]


# ---- phase: policy -----------------------------------------------------------------------
def predict(done: Sequence[tuple[int, float]], size: int) -> float | None:
    """Seconds an import of `size` rules would take, extrapolated from the sizes measured so
    far: the growth exponent of the last two (clamped to 1..3), or quadratic from one."""
    if not done:
        return None
    n1, t1 = done[-1]
    exponent = 2.0
    if len(done) >= 2 and done[-2][0] != n1 and done[-2][1] > 0:
        n0, t0 = done[-2]
        exponent = min(3.0, max(1.0, math.log(t1 / t0) / math.log(n1 / n0)))
    return t1 * (size / n1) ** exponent


def phase_policy(
    sizes: Sequence[int], reps: int, bulk_reps: int, max_wait: float, profile: Profiler
) -> dict[str, Any]:
    with running_agent("policy") as agent:
        ns = "bench"
        servers = [add_endpoint(agent, ns, f"server-{i}", {"app": "server"})[0] for i in range(3)]
        client = add_endpoint(agent, ns, "client-ok", {"role": "client"})[0]
        newcomer = add_endpoint(agent, ns, "client-new", {"role": "newcomer"})[0]
        bulk_client = add_endpoint(agent, ns, "client-bulk", {"role": "bulk"})[0]
        ext = add_external_host(
            agent.node,
            agent.external_netns,
            IPv4Address(EXTERNAL_IP),
            IPv4Network(EXTERNAL_LINK),
            extra_ips=[BULK_EXTERNAL, ONE_EXTERNAL],
        )
        for pod in servers:
            listen(pod)
        ext_bulk = Source(f"outside {BULK_EXTERNAL}", ext.netns, str(BULK_EXTERNAL))
        ext_one = Source(f"outside {ONE_EXTERNAL}", ext.netns, str(ONE_EXTERNAL))

        def cases(src: Source, allowed: bool) -> list[Case]:
            return [(src, s, allowed) for s in servers]

        results: dict[str, Any] = {"rss_after_start": agent.memory_kib()}

        # The first policy: the servers go to default deny; only role=client may connect.
        base = cnp("base", ns, {"app": "server"}, [rule_from_endpoints({"role": "client"})])
        first = Change("first policy: 1 rule, servers go to default deny")
        timed_change(
            first,
            agent,
            lambda: import_policy(agent, base),
            cases(source_of(newcomer), True),
            cases(source_of(client), True) + cases(source_of(newcomer), False),
        )
        results["first_policy"] = first.summary()

        def one_rule_changes(label: str, reps: int, cidr: bool = True) -> list[dict[str, Any]]:
            """Add and delete one rule, with an endpoint selector and with a CIDR peer."""
            variants = [("endpoint selector", "one", rule_from_endpoints({"role": "newcomer"}),
                         source_of(newcomer))]  # fmt: skip
            if cidr:
                variants.append(("CIDR peer", "one-cidr", rule_from_cidr(ONE_EXTERNAL), ext_one))
            out = []
            for kind, name, rule, src in variants:
                text = cnp(name, ns, {"app": "server"}, [rule])
                add = Change(f"{label}: add 1 rule ({kind})")
                remove = Change(f"{label}: delete that rule ({kind})")
                for _ in range(reps):
                    timed_change(
                        add,
                        agent,
                        lambda text=text: import_policy(agent, text),
                        cases(src, False),
                        cases(src, True),
                    )
                    timed_change(
                        remove,
                        agent,
                        lambda name=name: delete_policy(agent, ns, name),
                        cases(src, True),
                        cases(src, False),
                    )
                out += [add.summary(), remove.summary()]
            return out

        results["one_rule"] = one_rule_changes("no other rules", reps)

        # Bulk imports: each verified by probes (its last rule and its CIDR rule) and by the
        # number of entries in the policy map.
        probed = cases(source_of(bulk_client), True) + cases(ext_bulk, True)
        bulks: dict[int, tuple[Change, Change, dict[str, Any]]] = {}
        done: list[tuple[int, float]] = []
        skipped = []

        def bulk_once(size: int, text: str, step: str | None) -> None:
            add, _, facts = bulks[size]
            with profile(agent, step or "", enabled=step is not None):
                timed_change(add, agent, lambda: import_policy(agent, text),
                             flip(probed), probed)  # fmt: skip
            entries = map_entries(agent, "policy")
            want = len(servers) * (size + 1)  # one entry per rule and server, + base
            if entries != want:
                raise AssertionError(f"policy map holds {entries} entries, expected {want}")
            facts.update(
                policy_map_entries=entries,
                ipcache_entries=map_entries(agent, "ipcache"),
                rss_with_rules=agent.memory_kib(),
            )

        def bulk_delete(size: int) -> None:
            timed_change(bulks[size][1], agent, lambda: delete_policy(agent, ns, "bulk"),
                         probed, flip(probed))  # fmt: skip

        texts = {}
        in_force: list[int] = []  # the bulk size in force, if any

        def clear() -> None:
            while in_force:
                bulk_delete(in_force.pop())

        for size in sizes:
            guess = predict(done, size)
            if max_wait > 0 and guess is not None and guess > max_wait:
                skipped.append({"rules": size, "predicted_s": round(guess), "max_wait_s": max_wait})
                print(f"   {size} rules: skipped (predicted {guess:.0f} s)", file=sys.stderr)
                continue
            clear()
            texts[size] = cnp("bulk", ns, {"app": "server"}, bulk_rules(size))
            facts = {"rules": size, "yaml_bytes": len(texts[size])}
            bulks[size] = (Change(f"import {size} rules"), Change(f"delete {size} rules"), facts)
            for rep in range(bulk_reps):
                bulk_once(size, texts[size], f"policy-import-{size}" if rep == 0 else None)
                in_force.append(size)
                if bulks[size][0].seconds[0] > SLOW_S:
                    break  # slow: one sample, and it stays for the incremental case
                clear()
            done.append((size, bulks[size][0].seconds[0]))
            print(
                f"   {size} rules: import {ms(bulks[size][0].seconds[0])} ms",
                file=sys.stderr,
            )

        if done:  # 1-rule changes with the largest bulk in force
            size, took = done[-1]
            if in_force != [size]:
                clear()
                bulk_once(size, texts[size], None)
                in_force.append(size)
            slow = took > SLOW_S
            with profile(agent, f"policy-incremental-{size}"):
                results["one_rule_with_bulk"] = one_rule_changes(
                    f"with {size} rules in force", 1 if slow else reps, cidr=not slow
                )
            results["bpf_with_bulk"] = bpf_footprint(agent)
            clear()
        results["bulk"] = [
            {**facts, "import": add.summary(), "delete": remove.summary()}
            for add, remove, facts in bulks.values()
        ]
        results["bulk_skipped"] = skipped
        results["rss_at_end"] = agent.memory_kib()
        return results


# ---- phase: endpoints --------------------------------------------------------------------
def phase_endpoints(single_reps: int, row: int, profile: Profiler) -> dict[str, Any]:
    with running_agent("endpoints") as agent:
        singles, single_deletes = [], []
        for i in range(single_reps):
            pod, took = add_endpoint(agent, "bench", f"single-{i}", {"app": "single"})
            singles.append(took)
            listen(pod)
            require(probe([(Source("node", agent.node_netns), pod, True)]), "single endpoint")
            single_deletes.append(delete_endpoint(agent, pod))
        adds, pods = [], []
        with profile(agent, f"endpoint-add-{row}"):
            for i in range(row):
                pod, took = add_endpoint(agent, "bench", f"row-{i:03d}", {"app": f"app-{i % 10}"})
                adds.append(took)
                pods.append(pod)
        for pod in pods[:: max(1, row // 10)]:
            listen(pod)
        sample = [p for p in pods if p.listener]
        require(
            probe([(source_of(pods[-1]), p, True) for p in sample if p is not pods[-1]]),
            f"after {row} adds",
        )
        rss = agent.memory_kib()
        deletes = []
        with profile(agent, f"endpoint-delete-{row}"):
            for pod in reversed(pods):
                deletes.append(delete_endpoint(agent, pod))
        return {
            "single_add": stats_ms(singles),
            "single_delete": stats_ms(single_deletes),
            "row": row,
            "row_add": stats_ms(adds),
            "row_add_trend": trend(adds, max(1, row // 5)),
            "row_add_ms": [ms(t) for t in adds],
            "row_delete": stats_ms(deletes),
            "row_delete_trend": trend(deletes[::-1], max(1, row // 5)),
            "rss_with_row": rss,
        }


# ---- phase: scale ------------------------------------------------------------------------
def phase_scale(count: int, reps: int, run_tests: bool, profile: Profiler) -> dict[str, Any]:
    """`count` endpoints in namespace `scale`, ten per "deployment" (label deploy=dNN, so
    ten endpoints share an identity), the first half tier=front, the rest tier=back. The
    policy: back endpoints accept TCP 8080 from front endpoints only."""
    with running_agent("scale") as agent:
        ns = "scale"
        policy = cnp("back", ns, {"tier": "back"}, [rule_from_endpoints({"tier": "front"})])
        import_policy(agent, policy)
        pods: list[Pod] = []
        adds: list[float] = []
        slow_adds: list[dict[str, Any]] = []
        started = time.perf_counter()
        with profile(agent, f"scale-add-{count}"):
            for i in range(count):
                tier = "front" if i < count // 2 else "back"
                labels = {"deploy": f"d{i // 10:02d}", "tier": tier}
                pod, took = add_endpoint(agent, ns, f"p{i:03d}", labels)
                pods.append(pod)
                adds.append(took)
                if took > 1.0:  # what else was going on (see RESULTS.md: RTNL storms)
                    slow_adds.append(
                        {"index": i, "ms": ms(took), "loadavg_1m": os.getloadavg()[0],
                         "blocked_tasks_after": blocked_tasks()}
                    )  # fmt: skip
                if (i + 1) % 100 == 0:
                    print(f"   {i + 1} endpoints, last add {ms(took)} ms", file=sys.stderr)
        total = time.perf_counter() - started
        front, back = pods[: count // 2], pods[count // 2 :]
        rng = random.Random(5)

        def sample_cases(n: int = 16) -> list[Case]:
            cases: list[Case] = []
            for srcs, dsts, want in ((front, back, True), (back, back, False),
                                     (back, front, True), (front, front, True)):  # fmt: skip
                for _ in range(n):
                    src, dst = rng.sample(srcs, 1)[0], rng.sample(dsts, 1)[0]
                    if src is not dst:
                        cases.append((source_of(src), dst, want))
            return cases

        for pod in pods:
            listen(pod)
        reach = sample_cases()
        require(probe(reach), f"{count} endpoints, sampled reachability")

        listed_started = time.perf_counter()
        listed = json.loads(agent.cli("endpoint", "list", "-o", "json").stdout)
        list_seconds = time.perf_counter() - listed_started
        listed_keys = {f"{e['namespace']}/{e['name']}" for e in listed}
        missing = {p.key for p in pods} - listed_keys
        if missing or len(listed) != count or len({e["ipv4"] for e in listed}) != count:
            raise AssertionError(f"endpoint list is incomplete: {len(listed)}, missing {missing}")
        identities = len({e["identity"] for e in listed})
        api_started = time.perf_counter()
        api_listed = agent.api.get("/v1/endpoints")["endpoints"]
        api_list_seconds = time.perf_counter() - api_started
        if len(api_listed) != count:
            raise AssertionError(f"GET /v1/endpoints returned {len(api_listed)} endpoints")

        # A policy change with every endpoint present: one back deployment may reach back pods.
        deploy_index = (count // 2) // 10 + (count - count // 2) // 20
        deploy, mover = f"d{deploy_index:02d}", pods[deploy_index * 10]
        targets = [p for p in back if p is not mover][:: max(1, len(back) // 8)]
        extra = cnp("extra", ns, {"tier": "back"}, [rule_from_endpoints({"deploy": deploy})])
        add, remove = Change("add 1 rule"), Change("delete that rule")
        denied = [(source_of(mover), t, False) for t in targets]
        for rep in range(reps):
            with profile(agent, f"scale-policy-{count}", enabled=rep == 0):
                timed_change(add, agent, lambda: import_policy(agent, extra),
                             denied, flip(denied))  # fmt: skip
            timed_change(remove, agent, lambda: delete_policy(agent, ns, "extra"),
                         flip(denied), denied)  # fmt: skip

        tests = None
        if run_tests:
            t0 = time.perf_counter()
            result = subprocess.run(
                [str(REPO / ".venv" / "bin" / "pytest"), "-q", "-p", "no:cacheprovider",
                 "tests/integration/test_endpoint_plumbing.py"],
                cwd=REPO, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
            tests = {
                "command": "pytest -q tests/integration/test_endpoint_plumbing.py",
                "exit_code": result.returncode,
                "summary": last,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            require(probe(sample_cases()), "after the test suite ran beside them")

        footprint = bpf_footprint(agent)
        rss = agent.memory_kib()
        deletes = []
        for pod in pods[-20:]:
            deletes.append(delete_endpoint(agent, pod))
        return {
            "endpoints": count,
            "identities": identities,
            "add_total_s": round(total, 2),
            "add": stats_ms(adds),
            "add_trend": trend(adds, 50),
            "add_ms": [ms(t) for t in adds],
            "adds_over_1s": slow_adds,
            "reachability_sampled": len(reach),
            "endpoint_list_cli_s": round(list_seconds, 3),
            "endpoint_list_api_s": round(api_list_seconds, 3),
            "policy_change": [add.summary(), remove.summary()],
            "pytest_while_present": tests,
            "memory": rss,
            "bpf": footprint,
            "delete_20_of_them": stats_ms(deletes),
        }


def source_digest() -> dict[str, Any]:
    """Which code was measured: the tree is shared and changes under us, so a digest of
    the agent's sources (and when the newest of them changed) goes into the JSON."""
    files = sorted([*(REPO / "src" / "membrane").rglob("*.py"), *(REPO / "bpf").rglob("*.[ch]")])
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    newest = max(files, key=lambda f: f.stat().st_mtime)
    return {
        "sha256_12": digest.hexdigest()[:12],
        "newest_file": str(newest.relative_to(REPO)),
        "newest_mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(newest.stat().st_mtime)),
    }


# ---- main --------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phases", default="policy,endpoints,scale")
    parser.add_argument("--sizes", default="1000,2000,5000,10000", help="bulk rule counts")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of 1-rule changes")
    parser.add_argument("--bulk-reps", type=int, default=2, help="repetitions of bulk imports")
    parser.add_argument(
        "--max-wait",
        type=float,
        default=300.0,
        help="skip a bulk size whose import is predicted to take longer (s; 0: never skip)",
    )
    parser.add_argument("--singles", type=int, default=5, help="single endpoint adds")
    parser.add_argument("--row", type=int, default=100, help="endpoints added in a row")
    parser.add_argument("--endpoints", type=int, default=500, help="endpoints of the scale phase")
    parser.add_argument("--no-tests", action="store_true", help="skip the pytest run in scale")
    parser.add_argument("--profile", type=Path, help="py-spy folded stacks into this directory")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("control_plane: needs root (netns, BPF)", file=sys.stderr)
        return 2
    exit_on_sigterm()
    phases = args.phases.split(",")
    profile = Profiler(args.profile)
    result: dict[str, Any] = {
        "benchmark": "control_plane",
        "machine": machine(),
        "targets": TARGETS,
        "profiled": args.profile is not None,
        "source": source_digest(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    started = time.perf_counter()
    if "policy" in phases:
        print("== policy", file=sys.stderr)
        sizes = [int(s) for s in args.sizes.split(",")]
        result["policy"] = phase_policy(sizes, args.reps, args.bulk_reps, args.max_wait, profile)
    if "endpoints" in phases:
        print("== endpoints", file=sys.stderr)
        result["endpoints"] = phase_endpoints(args.singles, args.row, profile)
    if "scale" in phases:
        print("== scale", file=sys.stderr)
        result["scale"] = phase_scale(args.endpoints, max(1, args.reps // 2), not args.no_tests,
                                      profile)  # fmt: skip
    result["teardown"] = TEARDOWN
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["loadavg_1m_at_end"] = os.getloadavg()[0]
    if profile.results:
        result["profile"] = profile.results
    emit(result, summary(result))
    return 0


def summary(r: dict[str, Any]) -> list[str]:
    lines = []

    def verdict(value: float, target: float) -> str:
        return "met" if value < target else "MISSED"

    if p := r.get("policy"):
        lines.append("policy change (API wall time until enforced)      median   p90    max")
        rows = [p["first_policy"], *p["one_rule"]]
        rows += [x for b in p["bulk"] for x in (b["import"], b["delete"])]
        rows += p.get("one_rule_with_bulk", [])
        for row in rows:
            lines.append(
                f"  {row['label']:<48}{row['median_ms']:>7} {row['p90_ms']:>6} {row['max_ms']:>6}"
            )
        one = p["one_rule"][0]["median_ms"]
        lines.append(f"  target 1 rule < 100 ms: {one} ms {verdict(one, 100)}")
        for b in p["bulk"]:
            if b["rules"] == 10000:
                t = b["import"]["median_ms"]
                lines.append(f"  target 10,000 rules < 2 s: {t} ms {verdict(t, 2000)}")
        for b in p["bulk_skipped"]:
            lines.append(
                f"  {b['rules']} rules: not measured, predicted {b['predicted_s']} s "
                f"(> --max-wait {b['max_wait_s']:g})"
            )
        if inc := p.get("one_rule_with_bulk"):
            t = inc[0]["median_ms"]
            lines.append(f"  1 rule, bulk in force: {t} ms {verdict(t, 100)} (1-rule target)")
    if e := r.get("endpoints"):
        lines.append("endpoint add/delete                                 median   p90    max")
        for label, key in (("add 1 (empty node)", "single_add"),
                           ("delete 1", "single_delete"),
                           (f"add {e['row']} in a row", "row_add"),
                           (f"delete those {e['row']}", "row_delete")):  # fmt: skip
            s = e[key]
            lines.append(f"  {label:<48}{s['median_ms']:>7} {s['p90_ms']:>6} {s['max_ms']:>6}")
        trend_text = ", ".join(f"{b['endpoints']}: {b['median_ms']}" for b in e["row_add_trend"])
        lines.append(f"  add trend (median ms): {trend_text}")
        t = e["row_add"]["max_ms"]
        lines.append(f"  target < 150 ms each: max {t} ms {verdict(t, 150)}")
    if s := r.get("scale"):
        lines.append(
            f"scale: {s['endpoints']} endpoints ({s['identities']} identities) in "
            f"{s['add_total_s']} s; add median {s['add']['median_ms']} ms, "
            f"p90 {s['add']['p90_ms']}, max {s['add']['max_ms']}"
        )
        trend_text = ", ".join(f"{b['endpoints']}: {b['median_ms']}" for b in s["add_trend"])
        lines.append(f"  add trend (median ms): {trend_text}")
        pc = s["policy_change"]
        lines.append(
            f"  1-rule change: {pc[0]['median_ms']} ms, delete {pc[1]['median_ms']} ms; "
            f"endpoint list {s['endpoint_list_cli_s']} s (CLI); "
            f"RSS {s['memory']['rss_kib'] // 1024} MiB; "
            f"BPF maps {s['bpf']['maps_memlock_bytes'] >> 20} MiB, {s['bpf']['programs']} programs "
            f"{s['bpf']['programs_memlock_bytes'] >> 20} MiB"
        )
        if t := s["pytest_while_present"]:
            lines.append(f"  pytest beside them: exit {t['exit_code']}, {t['summary']}")
        if slow := s["adds_over_1s"]:
            shown = [f"#{a['index']} {a['ms']:.0f} ms (load {a['loadavg_1m']:.0f})" for a in slow]
            lines.append("  adds over 1 s: " + ", ".join(shown))
    for label, t in r["teardown"].items():
        lines.append(
            f"teardown {label}: {t['destroy_s']} s, then the kernel busy {t['kernel_settle_s']} s "
            f"(peak {t['peak_blocked_tasks']} blocked tasks)"
        )
    lines.append(f"total {r['seconds']} s")
    return lines


if __name__ == "__main__":
    sys.exit(main())
