"""Every `membrane trace` tool refuses bad values of the options they share (those of
membrane.trace.options), unknown options and missing privileges the way DESIGN.md says:
exit 2, one stderr line naming the problem, before anything is loaded.

The tools are found as the CLI finds them (`discover()`), and each is checked for the
shared options its command declares, so a new tool is covered without touching this file.
Tool-specific options are tested in each tool's own module."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import typer.models
from trace_support import run_trace

from membrane.testing.cli import WITHOUT_CAPABILITIES, user_error
from membrane.trace import options
from membrane.trace.tools import Tool, discover

pytestmark = pytest.mark.root

TOOLS = discover()

# What a tool with required arguments needs to get as far as its options.
REQUIRED_ARGUMENTS = {"latency": ["read"]}

# A shared option (its declaration in membrane.trace.options) -> bad uses and the word the
# one error line must name.
BAD: list[tuple[Any, list[str], str]] = [
    (options.PID, ["--pid", "0"], "--pid"),
    (options.PID, ["--pid", "-3"], "--pid"),
    (options.PID, ["--pid", "999999999"], "--pid"),
    (options.PID, ["--pid", "abc"], "--pid"),
    (options.COMM, ["--comm", "a-name-longer-than-fifteen"], "--comm"),
    (options.COMM, ["--comm", ""], "--comm"),
    (options.UID, ["--uid", "-1"], "--uid"),
    (options.UID, ["--uid", "4294967295"], "--uid"),
    (options.DURATION, ["--duration", "0"], "--duration"),
    (options.DURATION, ["--duration", "-1"], "--duration"),
    (options.OUTPUT, ["-o", "yaml"], "--output"),
    (options.OUTPUT, ["-o", "csv"], "--output"),
    (options.TIMESTAMP, ["--timestamp=yes"], "--timestamp"),
]


def declared(tool: Tool) -> list[Any]:
    """The typer declarations (defaults) of the tool command's parameters."""
    return [p.default for p in inspect.signature(tool.command).parameters.values()]


def takes(tool: Tool, option: Any) -> bool:
    return any(d is option for d in declared(tool))


def argv(tool: Tool, *args: str) -> list[str]:
    return [tool.name, *REQUIRED_ARGUMENTS.get(tool.name, []), *args]


def bad_uses() -> list[Any]:
    return [
        pytest.param(tool, args, word, id=f"{tool.name} {' '.join(args)}")
        for tool in TOOLS
        for option, args, word in BAD
        if takes(tool, option)
    ]


def by_name(tools: list[Tool]) -> dict[str, Any]:
    return {"argvalues": tools, "ids": [t.name for t in tools]}


def test_every_tool_is_covered() -> None:
    """Each tool declares the shared options, and gets the arguments it requires."""
    assert {"exec", "open", "latency", "tcplife"} <= {t.name for t in TOOLS}
    for tool in TOOLS:
        common = (options.PID, options.COMM, options.UID, options.DURATION, options.OUTPUT)
        assert all(takes(tool, o) for o in common), f"{tool.name} lacks a shared option"
        required = [
            d
            for d in declared(tool)
            if isinstance(d, typer.models.ArgumentInfo) and d.default is ...
        ]
        assert bool(required) == (tool.name in REQUIRED_ARGUMENTS), (
            f"{tool.name}: say in REQUIRED_ARGUMENTS what its required arguments need"
        )


@pytest.mark.parametrize(("tool", "args", "word"), bad_uses())
def test_bad_shared_option_is_one_line_and_exit_2(tool: Tool, args: list[str], word: str) -> None:
    user_error(run_trace(*argv(tool, *args)), word)


@pytest.mark.parametrize("tool", **by_name(TOOLS))
def test_unknown_option_is_one_line_and_exit_2(tool: Tool) -> None:
    user_error(run_trace(*argv(tool, "--bogus")), "--bogus")


def test_unknown_tool() -> None:
    user_error(run_trace("nosuch"), "nosuch")


@pytest.mark.parametrize("tool", **by_name(TOOLS))
def test_not_root_is_one_line_and_exit_2(tool: Tool) -> None:
    user_error(run_trace(*argv(tool, "-d", "1"), prefix=WITHOUT_CAPABILITIES), "root", "CAP_BPF")
