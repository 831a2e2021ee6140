"""The trace tools. Each module here defines `TOOL = Tool(...)`; the CLI finds them all, so
adding a tool touches no shared file."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Tool:
    name: str
    summary: str  # one line, for `membrane trace --list`
    requires: tuple[str, ...]  # feature names of `membrane probe` the tool needs
    command: Callable[..., None]  # the typer command; its docstring is the --help text
    examples: tuple[str, ...] = ()


def discover() -> list[Tool]:
    tools = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        tool = getattr(module, "TOOL", None)
        if isinstance(tool, Tool):
            tools.append(tool)
    return sorted(tools, key=lambda t: t.name)
