"""Options every client command of the agent API shares."""

from __future__ import annotations

import typer

from membrane.errors import UserError

API_SOCKET = typer.Option(
    None,
    "--api-socket",
    help="The agent's API socket (default $MEMBRANE_API_SOCKET, else /run/membrane/membrane.sock).",
    show_default=False,
)
OUTPUT = typer.Option("table", "-o", "--output", help="table or json.")


def split_ns_name(value: str, field: str) -> tuple[str, str]:
    """NS/NAME → (NS, NAME)."""
    ns, sep, name = value.partition("/")
    if not sep or not ns or not name or "/" in name:
        raise UserError(field, f"{value!r} is not NS/NAME")
    return ns, name


def parse_key_values(items: list[str], field: str, allow_removal: bool = False) -> dict:
    """KEY=VALUE items (and KEY- to remove, where allowed) → dict (None = remove)."""
    out: dict[str, str | None] = {}
    for item in items:
        if allow_removal and item.endswith("-") and "=" not in item:
            out[item[:-1]] = None
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            hint = " or KEY- to remove it" if allow_removal else ""
            raise UserError(field, f"{item!r} is not KEY=VALUE{hint}")
        out[key] = value
    return out
