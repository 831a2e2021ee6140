"""The check every option parser shares: a value must be one of a fixed set of choices.

Below both the CLI and the trace tools (which define typer commands of their own), so that
neither has to import the other to refuse a bad choice the same way."""

from __future__ import annotations

from collections.abc import Sequence

from membrane.errors import UserError


def check_choice(value: str, choices: Sequence[str], field: str) -> str:
    """`value` if it is one of `choices`, else a UserError naming `field` and the choices."""
    if value not in choices:
        raise UserError(field, f"{value!r} is not one of {', '.join(choices)}")
    return value
