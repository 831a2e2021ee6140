"""`membrane` starts quickly: the root lists its subcommands without importing them, and a
client command imports neither the other subcommands nor the heavy libraries the agent and
the datapath use. (How quickly is measured by bench/cli_latency.py, not here.)"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest

from membrane.cli.commands import SUBCOMMANDS, Subcommand
from membrane.cli.lazy import load

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
NO_AGENT = "/nonexistent/membrane.sock"

# Run the CLI in a fresh interpreter, then report which modules it imported.
PROBE = """
import sys
from membrane.cli.main import main
sys.argv = ["membrane", *sys.argv[1:]]
try:
    main()
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


def heavy_in(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


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
