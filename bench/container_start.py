"""What Membrane adds to a container's start and stop, with the real podman (CNI backend,
runc) and the real agent, against the CNI `bridge` plugin that runtimes ship with.

  start      `podman run --rm IMAGE true`, alternating between a Membrane network and a
             `bridge` network (host-local addresses in 198.18.250.0/24, a bridge in the
             root namespace that the benchmark creates and removes), `--runs` of each
             after a warm-up; medians, and the ratio Membrane/bridge per pair. Target
             <= 1.2x bridge.
  add        CNI ADD (then DEL) latency as a runtime sees it: the installed plugin run
             with the spec's environment into a namespace made for it, `--samples` times
             with 0 containers running and again with `--containers` running (started
             with podman on the Membrane network); p50/p99. The agent reads podman's
             database on every ADD, so its size is part of the cost. The agent deletes
             a veth after answering the DEL: each ADD comes once the previous one's veth
             is gone (how long after the DEL that was is reported too).
  soak       `--soak` `podman run --rm` in a row on the Membrane network: what the node
             holds (endpoints, addresses, veths, pins, map entries, namespaces) before and
             after must be equal.

    python -m bench.container_start [--runs 50] [--samples 100] [--containers 500]
                                    [--soak 200] [--phases start,add,soak]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench._common import emit, exit_on_sigterm, machine, percentile
from membrane import netns
from membrane.testing.agent import AgentProcess, running_agent
from membrane.testing.podman import PodmanSandbox, footprint

MEMBRANE, BRIDGE = "mbbench", "brbench"
BRIDGE_SUBNET = "198.18.250.0/24"
PHASES = ("start", "add", "soak")


def timed_run(podman: PodmanSandbox, network: str, image: str) -> float:
    started = time.perf_counter()
    podman.run("--rm", "--network", network, image, "true")
    return time.perf_counter() - started


def start_cost(podman: PodmanSandbox, image: str, runs: int) -> dict[str, Any]:
    for _ in range(3):  # warm-up: page cache, the agent's first endpoint, podman's caches
        timed_run(podman, MEMBRANE, image)
        timed_run(podman, BRIDGE, image)
    ours, bridge, ratios = [], [], []
    for i in range(runs):
        order = (MEMBRANE, BRIDGE) if i % 2 == 0 else (BRIDGE, MEMBRANE)
        took = {network: timed_run(podman, network, image) for network in order}
        ours.append(took[MEMBRANE])
        bridge.append(took[BRIDGE])
        ratios.append(took[MEMBRANE] / took[BRIDGE])
    return {
        "runs": runs,
        "membrane_median_s": statistics.median(ours),
        "bridge_median_s": statistics.median(bridge),
        "membrane_p90_s": percentile(ours, 0.9),
        "bridge_p90_s": percentile(bridge, 0.9),
        "ratio_of_medians": statistics.median(ours) / statistics.median(bridge),
        "ratio_per_pair_median": statistics.median(ratios),
        "target_ratio": 1.2,
    }


def plugin_call(podman: PodmanSandbox, command: str, container_id: str, ns: str) -> float:
    conf = json.loads((podman.conf_dir / f"{MEMBRANE}.conflist").read_text())
    config = {"cniVersion": conf["cniVersion"], "name": MEMBRANE, **conf["plugins"][0]}
    env = {
        **os.environ,
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns.path(ns),
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(podman.bin_dir),
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAME=bench-{container_id[:8]}",
    }
    started = time.perf_counter()
    done = subprocess.run(
        [str(podman.bin_dir / "membrane-cni")],
        input=json.dumps(config),
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"CNI {command} failed: {done.stdout} {done.stderr}")
    return took


def teardown_wait(ns: str, timeout_s: float = 10.0) -> float:
    """How long after a DEL's answer the container's eth0 is gone: the agent answers a
    DEL before it deletes the veth (a runtime then removes the namespace, and with it
    the veth, anyway); the next ADD would wait for that work."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        try:
            netns.ifindex(ns, "eth0")
        except LookupError:
            return time.perf_counter() - started
        time.sleep(0.001)
    raise RuntimeError(f"eth0 in {ns} still there {timeout_s} s after the DEL")


def add_latency(podman: PodmanSandbox, samples: int, tag: str) -> dict[str, Any]:
    """ADD and DEL `samples` times into a namespace of our own (a runtime's stand-in); each
    ADD after the previous DEL's veth is gone, as a runtime's next container meets it."""
    ns = f"{tag}-cni"
    netns.create(ns)
    adds, dels, teardowns = [], [], []
    try:
        for i in range(samples):
            container_id = f"{i:08x}" + os.urandom(28).hex()
            adds.append(plugin_call(podman, "ADD", container_id, ns))
            dels.append(plugin_call(podman, "DEL", container_id, ns))
            teardowns.append(teardown_wait(ns))
    finally:
        netns.delete(ns)
    return {
        "samples": samples,
        "add_p50_ms": 1000 * percentile(adds, 0.5),
        "add_p99_ms": 1000 * percentile(adds, 0.99),
        "del_p50_ms": 1000 * percentile(dels, 0.5),
        "del_p99_ms": 1000 * percentile(dels, 0.99),
        "veth_gone_after_del_p50_ms": 1000 * percentile(teardowns, 0.5),
    }


def settles_to(agent: AgentProcess, before: dict[str, Any], timeout_s: float = 10.0) -> bool:
    """Whether the node's footprint comes back to `before` (the agent takes a veth down
    after answering its DEL)."""
    deadline = time.monotonic() + timeout_s
    while footprint(agent) != before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def with_containers(podman: PodmanSandbox, image: str, count: int) -> float:
    started = time.perf_counter()
    for i in range(count):
        podman.run("-d", "--name", f"bench{i}", "--network", MEMBRANE,
                   "--label", f"app=bench{i % 10}", image, "sleep", "86400")  # fmt: skip
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="podman runs per network")
    parser.add_argument("--samples", type=int, default=100, help="CNI ADD/DEL per population")
    parser.add_argument("--containers", type=int, default=500, help="running while measuring")
    parser.add_argument("--soak", type=int, default=200, help="podman run --rm in a row")
    parser.add_argument("--phases", default=",".join(PHASES))
    args = parser.parse_args()
    phases = [p for p in args.phases.split(",") if p]
    if unknown := set(phases) - set(PHASES):
        parser.error(f"unknown phases {', '.join(sorted(unknown))}")
    exit_on_sigterm()
    tag = f"mbcs{os.getpid() % 1000}"
    result: dict[str, Any] = {"benchmark": "container_start", "machine": machine()}
    summary = []
    with (
        running_agent(tag, log_level="info") as agent,
        PodmanSandbox.create(Path(agent.state_dir).parent / "podman") as podman,
    ):
        image = podman.build_image()
        podman.install_membrane(MEMBRANE, agent.socket)
        podman.install_bridge(BRIDGE, BRIDGE_SUBNET)
        if "start" in phases:
            start = result["start"] = start_cost(podman, image, args.runs)
            summary.append(
                f"podman run --rm true: membrane {start['membrane_median_s'] * 1000:.0f} ms, "
                f"bridge {start['bridge_median_s'] * 1000:.0f} ms (median of {args.runs}), "
                f"ratio {start['ratio_per_pair_median']:.2f} (target <= 1.2)"
            )
        if "soak" in phases:
            before = footprint(agent)
            started = time.perf_counter()
            for i in range(args.soak):
                podman.run("--rm", "--network", MEMBRANE, "--label", f"run={i}", image, "true")
            took = time.perf_counter() - started
            leaked = not settles_to(agent, before)
            result["soak"] = {"runs": args.soak, "seconds": took, "leaked": leaked}
            summary.append(
                f"soak: {args.soak} podman run --rm in {took:.0f} s, "
                f"{'LEAKED' if leaked else 'nothing leaked'}"
            )
        if "add" in phases:
            idle = add_latency(podman, args.samples, tag)
            filled = with_containers(podman, image, args.containers)
            busy = add_latency(podman, args.samples, tag)
            result["add"] = {
                "no_containers": idle,
                "containers_running": args.containers,
                "seconds_to_start_them": filled,
                "with_containers": busy,
            }
            for label, r in (("0", idle), (str(args.containers), busy)):
                summary.append(
                    f"CNI ADD with {label} containers: p50 {r['add_p50_ms']:.0f} ms, "
                    f"p99 {r['add_p99_ms']:.0f} ms; DEL p50 {r['del_p50_ms']:.0f} ms "
                    f"(veth gone {r['veth_gone_after_del_p50_ms']:.0f} ms after it)"
                )
    emit(result, summary)


if __name__ == "__main__":
    main()
