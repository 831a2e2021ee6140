"""`membrane` starts quickly: the root lists its subcommands without importing them, and a
client command imports neither the other subcommands nor the heavy libraries the agent and
the datapath use; `membrane observe` prints flows with only the generated protobuf modules.
(How quickly is measured by bench/cli_latency.py and bench/observe_last.py, not here.)"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
from observe_support import observer_server

from membrane.cli.commands import SUBCOMMANDS, Subcommand
from membrane.cli.lazy import load
from membrane.hubble.flow import flow_pb2
from membrane.hubble.observer import observer_pb2
from membrane.observe.store import FlowStore

# grpc: its core imports asyncio (~150 ms); the CLI speaks gRPC through hubble.wire instead.
# json_format: only `-o json` and raw filters need protobuf's JSON mapping.
HEAVY = (
    "numpy",
    "pydantic",
    "pyroute2",
    "aiohttp",
    "yaml",
    "rich",
    "membrane.bpf",
    "asyncio",
    "grpc",
    "google.protobuf.json_format",
)
# What `membrane observe` needs none of, to print flows or its help: the agent's side of
# flows (records with the datapath's numbers, the filter engine and label model its checks
# use, the store, the gRPC server) and the package metadata (~25 ms, for --version).
OBSERVE_NEVER = (
    "importlib.metadata",
    "membrane.abi",
    "membrane.identity",
    "membrane.observe.flowfilter",
    "membrane.observe.record",
    "membrane.observe.store",
    "membrane.hubble.server",
)
NO_AGENT = "/nonexistent/membrane.sock"

# Run the CLI as the console script does, in a fresh interpreter, then report which
# modules it imported.
PROBE = """
import sys
from membrane.cli.entry import run
sys.argv = ["membrane", *sys.argv[1:]]
try:
    run()
except SystemExit as exit:
    code = exit.code
print(code, " ".join(sorted(sys.modules)), file=sys.stderr)
"""


def run_cli(*args: str) -> tuple[int, set[str], str]:
    """Exit code, imported modules and stdout of `membrane ARGS...`."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    code, _, modules = out.stderr.strip().splitlines()[-1].partition(" ")
    return int(code), set(modules.split()), out.stdout


def heavy_in(modules: set[str], heavy: tuple[str, ...] = HEAVY) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in heavy))


def test_help_lists_every_subcommand_without_importing_one() -> None:
    code, modules, stdout = run_cli("--help")
    assert code == 0
    for sub in SUBCOMMANDS:
        assert sub.name in stdout
        assert sub.module not in modules


def test_version_comes_from_the_package_metadata() -> None:
    code, modules, stdout = run_cli("--version")
    assert (code, stdout) == (0, f"membrane {version('membrane')}\n")
    assert not heavy_in(modules)


@pytest.mark.parametrize(
    "args",
    [
        ("endpoint", "list"),
        ("endpoint", "get", "default/a"),
        ("endpoint", "add", "default/a", "--label", "app=a"),
        ("namespace", "list"),
        ("policy", "list"),
        ("policy", "import", "-"),
        ("observe", "--last", "5"),
    ],
)
def test_a_client_command_imports_only_what_it_uses(args: tuple[str, ...]) -> None:
    code, modules, _ = run_cli(*args, "--api-socket", NO_AGENT)
    assert code == 1  # the agent is not there: the command got as far as asking it
    assert not heavy_in(modules)
    others = [s.module for s in SUBCOMMANDS if s.name != args[0] and s.module in modules]
    assert not others


@pytest.mark.parametrize("sub", SUBCOMMANDS, ids=lambda s: s.name)
def test_each_subcommand_loads_with_its_help_from_the_registry(sub: Subcommand) -> None:
    command = load(sub.name)
    assert command.name == sub.name
    assert command.help == sub.help


@pytest.fixture(scope="module")
def observer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The agent's Observer server over a store of three policy verdicts; its address."""
    store = FlowStore(capacity=15, node_name="node-1")
    for port in (40001, 40002, 40003):
        flow = flow_pb2.Flow(verdict=flow_pb2.FORWARDED, node_name="node-1")
        flow.time.seconds = 1_800_000_000 + port
        flow.IP.source, flow.IP.destination = "198.18.0.10", "198.18.0.11"
        flow.l4.TCP.source_port, flow.l4.TCP.destination_port = port, 80
        flow.event_type.type = 5  # a policy verdict
        flow.source.pod_name, flow.source.namespace = "web", "shop"
        store.append(observer_pb2.GetFlowsResponse(flow=flow, node_name="node-1"))
    socket = str(Path(tmp_path_factory.mktemp("observer")) / "hubble.sock")
    with observer_server(store, socket) as address:
        yield address


@pytest.mark.parametrize("output", ["compact", "json"])
def test_observe_prints_flows_with_the_protobuf_modules_alone(observer: str, output: str) -> None:
    code, modules, stdout = run_cli("observe", "--server", observer, "--last", "2", "-o", output)
    assert code == 0
    assert len(stdout.splitlines()) == 2
    assert "shop/web:40003" in stdout or '"source_port":40003' in stdout
    assert not heavy_in(modules, HEAVY + OBSERVE_NEVER)


def test_observe_help_imports_no_protobuf() -> None:
    code, modules, stdout = run_cli("observe", "--help")
    assert code == 0
    assert "--from-pod" in stdout
    # rich is typer's help formatter: the help is the one place it is used
    lean = tuple(h for h in HEAVY if h != "rich") + OBSERVE_NEVER + ("google.protobuf",)
    assert not heavy_in(modules, lean)
