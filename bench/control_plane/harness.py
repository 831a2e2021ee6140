"""The control-plane benchmark's harness: a fresh agent per phase (its teardown timed, and
the kernel given time to settle before the next phase), pods with listeners, first-SYN
connect probes that must show the expected verdicts, and policy changes timed between the
probes of the old and of the new verdicts."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import median
from bench.control_plane.measure import ms, stats_ms
from bench.control_plane.policies import PORT
from membrane.api.client import ApiClient
from membrane.testing import traffic
from membrane.testing.agent import AgentProcess
from membrane.testing.pods import Pod, add_pod

PROBE_TIMEOUT = 0.5  # an echo takes well under 1 ms here; SYN retransmits come after 1 s
API_TIMEOUT = 3600.0  # the agent answers a change once it is enforced, however long that is


# ---- the agent of a phase ----------------------------------------------------------------
@contextlib.contextmanager
def running_agent(label: str) -> Iterator[AgentProcess]:
    """A fresh agent for phase `label`; afterwards it is destroyed (SIGTERM first, then
    everything it made) and TEARDOWN[label] says how long that and the kernel took."""
    workdir = Path(tempfile.mkdtemp(prefix=f"membrane-cp-{label}-"))
    tag = f"mbcp{os.getpid() % 100000}{label[0]}"
    agent = AgentProcess(workdir, tag, log_level="info", memory_limit=None)
    print(
        f"   agent {agent.tag}: node netns {agent.node_netns}, pods {agent.prefix}*",
        file=sys.stderr,
    )
    try:
        agent.start()
        yield agent
    except BaseException:
        print(f"   agent log tail:\n{agent.log_tail(20)}", file=sys.stderr)
        raise
    finally:
        close_all_listeners()
        started = time.perf_counter()
        agent.destroy(graceful=True)
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


def api(agent: AgentProcess) -> ApiClient:
    return agent.client(timeout=API_TIMEOUT)


def add_endpoint(
    agent: AgentProcess, ns: str, name: str, labels: dict[str, str]
) -> tuple[Pod, float]:
    """Add an endpoint through the API; the pod and the call's wall time."""
    return add_pod(api(agent), ns, name, labels)


def delete_endpoint(agent: AgentProcess, pod: Pod) -> float:
    close_listener(pod)
    started = time.perf_counter()
    api(agent).delete(f"/v1/endpoints/{pod.namespace}/{pod.name}")
    return time.perf_counter() - started


def listen(pod: Pod, port: int = PORT) -> None:
    """A TCP listener in the pod (traffic.listen: the kernel completes handshakes)."""
    pod.listener = traffic.listen(pod.netns, pod.ip, port)
    LISTENERS.add(pod.listener)


def drain(pods: Sequence[Pod]) -> None:
    traffic.drain(pod.listener for pod in pods if pod.listener is not None)


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


Case = tuple[Source, Pod, bool]  # source, destination, expected verdict (True: allowed)


def probe(cases: Sequence[Case], port: int = PORT) -> list[str]:
    """Run every case at once (one TCP connect each: its first SYN decides); a description
    of each case that went wrong (empty: all as expected)."""

    def connect(case: Case) -> bool:
        src, dst, _ = case
        return traffic.connect(src.netns, dst.ip, port, PROBE_TIMEOUT, bind=src.bind)

    with ThreadPoolExecutor(max_workers=min(64, max(1, len(cases)))) as pool:
        got = list(pool.map(connect, cases))
    drain([dst for _, dst, _ in cases])
    return [
        f"{src.name} -> {dst.key}:{port} expected {'allowed' if want else 'denied'}"
        for (src, dst, want), ok in zip(cases, got, strict=True)
        if ok != want
    ]


def require(wrong: list[str], when: str) -> None:
    if wrong:
        raise AssertionError(f"{when}: {len(wrong)} probe(s) wrong: " + "; ".join(wrong[:10]))


# ---- timed policy changes ----------------------------------------------------------------
def enforced_seconds(agent: AgentProcess) -> list[float]:
    """The agent's own `seconds` of every "policy revision enforced" log line so far."""
    out = []
    for line in agent.log_path.read_text(errors="replace").splitlines():
        if '"policy revision enforced"' in line:
            with contextlib.suppress(ValueError, KeyError):
                out.append(float(json.loads(line)["seconds"]))
    return out


def import_policy(agent: AgentProcess, text: str) -> float:
    started = time.perf_counter()
    api(agent).post("/v1/policies", {"yaml": text})
    return time.perf_counter() - started


def delete_policy(agent: AgentProcess, namespace: str, name: str) -> float:
    started = time.perf_counter()
    api(agent).delete("/v1/policies", {"namespace": namespace, "name": name})
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
    agent: AgentProcess,
    act: Callable[[], float],
    before: Sequence[Case],
    after: Sequence[Case],
) -> None:
    """Check `before` (the old verdicts), run `act` (returns its wall time), then at once
    check `after` (the new verdicts, each probe's first SYN)."""
    require(probe(before), f"{change.label}: before")
    logged = len(enforced_seconds(agent))
    change.seconds.append(act())
    require(probe(after), f"{change.label}: right after the call returned")
    change.probes_checked += len(before) + len(after)
    change.agent_seconds += enforced_seconds(agent)[logged:]


def flip(cases: Sequence[Case]) -> list[Case]:
    return [(s, d, not want) for s, d, want in cases]
