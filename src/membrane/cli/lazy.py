"""The root command group, which imports a subcommand's module only when that subcommand runs.

Importing every subcommand up front cost ~0.5 s per `membrane` process (the agent and filter
modules pull in pyroute2, numpy and the BPF loader); a client command needs none of it."""

from __future__ import annotations

import functools
import importlib
from typing import Any

import typer
import typer.main
from typer.core import TyperCommand, TyperGroup

from membrane.cli.commands import BY_NAME, SUBCOMMANDS
from membrane.cli.frozen_imports import importing_for_good

Command = TyperCommand | TyperGroup


@functools.cache
def load(name: str) -> Command:
    """The real command of subcommand `name`: its module imported, its typer app built."""
    with importing_for_good():
        app = importlib.import_module(BY_NAME[name].module).app
        command = typer.main.get_command(app)
    command.name = name
    return command


class LazyGroup(TyperGroup):
    """Lists the subcommands of commands.SUBCOMMANDS from stand-ins that carry only a name and
    a help text (all that `--help` and "Did you mean" read) and swaps in the real command
    when one is about to run."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        for sub in SUBCOMMANDS:
            self.commands.setdefault(sub.name, TyperCommand(sub.name, help=sub.help))

    def resolve_command(
        self, ctx: typer.Context, args: list[str]
    ) -> tuple[str | None, Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if name in BY_NAME:
            command = load(name)
        return name, command, rest
