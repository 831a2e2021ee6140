"""Listen addresses as Cilium writes them: `:9962` (every address), `127.0.0.1:9962`,
`[::1]:9962`. Light on imports: the CLI checks options before the agent loads anything."""

from __future__ import annotations

from ipaddress import ip_address

from membrane.errors import UserError

ALL_ADDRESSES = ""  # `:PORT`


def parse_listen_address(text: str, option: str) -> tuple[str, int] | None:
    """(host, port) of `text`, host "" for every address; None for "" (off)."""
    if not text:
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise UserError(option, f"{text!r} is not HOST:PORT or :PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise UserError(option, f"{text!r}: write an IPv6 address in brackets, [::1]:PORT")
    if host:
        try:
            ip_address(host)
        except ValueError:
            raise UserError(option, f"{host!r} is not an IP address") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise UserError(option, f"{port_text!r} is not a port (1-65535)")
    return host, int(port_text)
