"""`membrane observe --last 20` against an agent holding many flows (issue 11: < 200 ms
end to end with 100k flows stored), and what the flow store costs on the way.

    python -m bench.observe_last [--flows N] [--runs R]

The real agent starts with `--hubble-buffer-size` large enough for N flows and a flow log
of N realistic flows (pods on both sides, labels, TCP, a policy verdict), which it reads
back into its store on start (the refill time is reported too). Then, alternated run by
run: the CLI end to end (a new process: start-up, gRPC connect, the query, printing; its
wall time and its CPU time, which other load on the machine moves less), the same query
from this process over the Observer API (the agent's share), and three floors at that
moment: `membrane --version`, the bare interpreter (`python -c pass`), and the libraries
any typer command printing Hubble's flows imports (typer and the generated flow and
observer modules, with protobuf): what is left above that is our own code and the query.
Cases: `--last 20` (compact and `-o json`), a filter that matches only the oldest flows
(the store's worst case: a scan of every flow), and `--first 20`. A second agent with the
default buffer (4095) is measured alike. Prints JSON; summary on stderr.

Each CLI process runs twice per round: with the environment as it is (where
PYTHONDONTWRITEBYTECODE is set, as in our sandboxes, every membrane module is compiled
from source at each start) and with bytecode cached (a PYTHONPYCACHEPREFIX warmed first:
what an installed package has, pip compiling at install time).

`--baseline-src DIR` times the CLI of another source tree too (an older commit's `src`,
with the build outputs `make bpf` writes there copied in), bytecode cached, alternated
with this tree's run by run against the same agent: a before/after that the machine's
load moves alike.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import emit, exit_on_sigterm, machine, median
from membrane.hubble.client import ObserverClient, default_server
from membrane.hubble.flow import flow_pb2
from membrane.hubble.observer import observer_pb2
from membrane.observe.format import json_line
from membrane.observe.record import flow_response
from membrane.testing.agent import membrane_command, running_agent

TARGET_MS = 200.0
# What any typer command that prints Hubble's flows imports before a line of ours runs,
# imported the way membrane.cli.entry imports (no garbage collection, then frozen).
LIBRARIES = (
    "import gc; gc.disable(); import typer; from membrane.hubble.flow import flow_pb2; "
    "from membrane.hubble.observer import observer_pb2; gc.freeze()"
)
START = 1_796_500_000  # seconds: the flows' first time
RARE_NAMESPACE = "rare"  # only the first 10 flows: a filter for them scans every flow


def flow(n: int) -> observer_pb2.GetFlowsResponse:
    f = flow_pb2.Flow(uuid=f"bench-{n:08d}", verdict=flow_pb2.FORWARDED, node_name="bench")
    f.time.FromNanoseconds(START * 1_000_000_000 + n * 1_000_000)
    f.IP.source, f.IP.destination, f.IP.ipVersion = "198.18.0.10", "198.18.0.11", flow_pb2.IPv4
    f.l4.TCP.source_port, f.l4.TCP.destination_port = 40000 + n % 20000, 80
    f.l4.TCP.flags.SYN = True
    namespace = RARE_NAMESPACE if n < 10 else "shop"
    for side, name, ident in ((f.source, "web", 256), (f.destination, "db", 257)):
        side.ID, side.identity, side.namespace, side.pod_name = ident - 240, ident, namespace, name
        side.labels.extend([f"k8s:app={name}", f"k8s:io.kubernetes.pod.namespace={namespace}"])
    f.Type = flow_pb2.L3_L4
    f.event_type.type = 5
    f.traffic_direction = flow_pb2.INGRESS
    f.Summary = "TCP Flags: SYN"
    return flow_response(f)


def write_flow_log(path: Path, count: int) -> None:
    with open(path, "w") as out:
        for n in range(count):
            out.write(json_line(flow(n)) + "\n")


def buffer_for(count: int) -> int:
    size = 4095
    while size < count:
        size = size * 2 + 1
    return size


def run(argv: list[str], env: dict[str, str] | None = None) -> float:
    """Runs `argv` to its end; the process's CPU time (user + system) in ms."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, check=True, capture_output=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return 1000 * (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)


def cached_bytecode_env(prefix: str) -> dict[str, str]:
    """The environment with bytecode written to and read from `prefix`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = prefix
    return env


def timed_ms(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


class Series:
    """Wall times (and CPU times of processes) of one measurement, in ms."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def process(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        t0 = time.perf_counter()
        self.cpu.append(run(argv, env))
        self.wall.append((time.perf_counter() - t0) * 1000)

    def call(self, fn: Any) -> None:
        self.wall.append(timed_ms(fn))


def measure(
    socket: str, runs: int, cached: dict[str, str], baseline: dict[str, str] | None
) -> dict[str, Any]:
    server = default_server(socket)
    client = ObserverClient.connect(server)
    rare = flow_pb2.FlowFilter(source_pod=[f"{RARE_NAMESPACE}/"])
    cases = {
        "--last 20": (["--last", "20"], observer_pb2.GetFlowsRequest(number=20)),
        "--last 20 -o json": (
            ["--last", "20", "-o", "json"],
            observer_pb2.GetFlowsRequest(number=20),
        ),
        "--last 20 (filter matching the oldest only)": (
            ["--last", "20", "--from-pod", f"{RARE_NAMESPACE}/"],
            observer_pb2.GetFlowsRequest(number=20, whitelist=[rare]),
        ),
        "--first 20": (["--first", "20"], observer_pb2.GetFlowsRequest(number=20, first=True)),
    }
    version = [membrane_command(), "--version"]  # `membrane`'s own floor, now
    interpreter = [sys.executable, "-c", "pass"]
    libraries = [sys.executable, "-c", LIBRARIES]
    out: dict[str, Any] = {}
    for name, (flags, request) in cases.items():
        argv = [membrane_command(), "observe", "--server", server, *flags]
        run(argv, cached)  # writes the bytecode the cached runs read
        run(libraries, cached)
        if baseline:
            run(argv, baseline)
        cli, cli_cached, api, before = Series(), Series(), Series(), Series()
        floor, floor_cached, bare, libs = Series(), Series(), Series(), Series()
        for _ in range(runs):  # alternated, so that drift hits all alike
            cli.process(argv)
            cli_cached.process(argv, cached)
            if baseline:
                before.process(argv, baseline)
            api.call(lambda request=request: list(client.get_flows(request)))
            floor.process(version)
            floor_cached.process(version, cached)
            bare.process(interpreter)
            libs.process(libraries, cached)
        got = [r for r in client.get_flows(request) if r.HasField("flow")]
        out[f"observe {name}"] = entry = {
            "cli_ms_median": round(median(cli.wall), 1),
            "cli_ms_max": round(max(cli.wall), 1),
            "cli_cpu_ms_median": round(median(cli.cpu), 1),
            "cli_bytecode_cached_ms_median": round(median(cli_cached.wall), 1),
            "cli_bytecode_cached_ms_max": round(max(cli_cached.wall), 1),
            "cli_bytecode_cached_cpu_ms_median": round(median(cli_cached.cpu), 1),
            "api_in_process_ms_median": round(median(api.wall), 2),  # ObserverClient, wire
            "cli_floor_version_ms_median": round(median(floor.wall), 1),  # `membrane --version`
            "cli_floor_version_bytecode_cached_ms_median": round(median(floor_cached.wall), 1),
            "floor_interpreter_ms_median": round(median(bare.wall), 1),  # python -c pass
            "floor_libraries_ms_median": round(median(libs.wall), 1),  # typer + protobuf
            "floor_libraries_cpu_ms_median": round(median(libs.cpu), 1),
            "flows_returned": len(got),
            "target_ms": TARGET_MS,
            "met": median(cli.wall) < TARGET_MS,
            "met_bytecode_cached": median(cli_cached.wall) < TARGET_MS,
        }
        if baseline:  # the other tree's CLI, bytecode cached: compare with the cached run
            entry["baseline_cli_bytecode_cached_ms_median"] = round(median(before.wall), 1)
            entry["baseline_cli_bytecode_cached_cpu_ms_median"] = round(median(before.cpu), 1)
    status = client.server_status()
    out["server_status"] = {"num_flows": status.num_flows, "max_flows": status.max_flows}
    client.close()
    return out


def scenario(
    count: int, buffer: int, runs: int, tag: str, baseline_src: str | None
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="membrane-bench-observe-") as tmp:
        log = Path(tmp) / "flows.log"
        write_flow_log(log, count)
        args = ["--hubble-buffer-size", str(buffer), "--flow-log", str(log)]
        t0 = time.perf_counter()
        with running_agent(tag, Path(tmp), log_level="info", extra_args=args) as agent:
            started_s = time.perf_counter() - t0
            cached = cached_bytecode_env(str(Path(tmp) / "pycache"))
            run([membrane_command(), "--version"], cached)
            baseline = None
            if baseline_src:
                baseline = {**cached, "PYTHONPATH": os.path.abspath(baseline_src)}
            result = measure(agent.socket, runs, cached, baseline)
            result["agent_start_with_refill_s"] = round(started_s, 2)
            result["flow_log_bytes"] = log.stat().st_size
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument(
        "--baseline-src",
        help="another tree's src directory whose CLI is timed alternately beside this one",
    )
    args = parser.parse_args()
    exit_on_sigterm()
    result: dict[str, Any] = {"machine": machine(), "flows_written": args.flows}
    result["PYTHONDONTWRITEBYTECODE"] = os.environ.get("PYTHONDONTWRITEBYTECODE", "")
    big = buffer_for(args.flows)
    result["baseline_src"] = args.baseline_src
    result[f"buffer {big}"] = scenario(args.flows, big, args.runs, "mbbol", args.baseline_src)
    result["buffer 4095 (default)"] = scenario(
        args.flows, 4095, args.runs, "mbbod", args.baseline_src
    )
    summary = []
    for key in (f"buffer {big}", "buffer 4095 (default)"):
        for name, entry in result[key].items():
            if isinstance(entry, dict) and "cli_ms_median" in entry:
                summary.append(
                    f"{key}: {name}: CLI {entry['cli_ms_median']} ms, "
                    f"CPU {entry['cli_cpu_ms_median']} "
                    f"({entry['cli_bytecode_cached_ms_median']} ms bytecode cached; "
                    f"target < {TARGET_MS:g}), "
                    f"agent share {entry['api_in_process_ms_median']} ms, "
                    f"floors: --version {entry['cli_floor_version_ms_median']} ms "
                    f"({entry['cli_floor_version_bytecode_cached_ms_median']} ms), "
                    f"python {entry['floor_interpreter_ms_median']} ms, "
                    f"typer+protobuf {entry['floor_libraries_ms_median']} ms; "
                    f"{entry['flows_returned']} flows"
                )
                if "baseline_cli_bytecode_cached_ms_median" in entry:
                    summary.append(
                        f"    baseline tree's CLI {entry['baseline_cli_bytecode_cached_ms_median']}"
                        f" ms, CPU {entry['baseline_cli_bytecode_cached_cpu_ms_median']} "
                        f"(this tree, bytecode cached: {entry['cli_bytecode_cached_ms_median']}"
                        f" ms, CPU {entry['cli_bytecode_cached_cpu_ms_median']})"
                    )
        summary.append(f"{key}: start with refill {result[key]['agent_start_with_refill_s']} s")
    emit(result, summary)


if __name__ == "__main__":
    main()
