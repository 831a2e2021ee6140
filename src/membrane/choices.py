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


def parse_bool(value: bool | str, field: str) -> bool:
    """true/false (also 1/0, yes/no) as options spell them."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise UserError(field, f"{value!r} is not true or false")


def whole_number(value: int | str, field: str, least: int) -> int:
    """An integer option of at least `least`."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UserError(field, f"{value!r} is not a whole number") from None
    if number < least:
        raise UserError(field, f"{number} is less than {least}")
    return number
