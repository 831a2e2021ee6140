"""`membrane endpoint`: pods on this node."""

from __future__ import annotations

from typing import Any

import typer

from membrane.api.client import ApiClient, path_of
from membrane.choices import check_choice
from membrane.cli.api_options import API_SOCKET, OUTPUT, parse_key_values, split_ns_name
from membrane.cli.commands import typer_app
from membrane.cli.output import print_json, print_table
from membrane.errors import UserError

app = typer_app("endpoint", no_args_is_help=True)


def _ports(items: list[str]) -> list[dict[str, Any]]:
    ports = []
    for item in items:
        name, sep, rest = item.partition("=")
        number, _, proto = rest.partition("/")
        if not sep or not name or not number.isdigit():
            raise UserError("--port", f"{item!r} is not NAME=PORT[/PROTO]")
        ports.append({"name": name, "port": int(number), "protocol": (proto or "TCP").upper()})
    return ports


def _print(endpoints: list[dict[str, Any]], output: str) -> None:
    rows = [
        [
            str(e["id"]),
            f"{e['namespace']}/{e['name']}",
            e["ipv4"],
            e.get("ipv6") or "-",
            str(e["identity"]),
            ",".join(f"{k}={v}" for k, v in sorted(e["labels"].items())),
            e["netns"],
        ]
        for e in endpoints
    ]
    print_table(
        ["ID", "ENDPOINT", "IPV4", "IPV6", "IDENTITY", "LABELS", "NETNS"],
        rows,
        empty="no endpoints",
    )


@app.command(
    "add",
    epilog="Example:\n\n  membrane endpoint add default/frontend --label app=frontend "
    "--port http=80/TCP -o json",
)
def add(
    endpoint: str = typer.Argument(..., metavar="NS/NAME"),
    label: list[str] = typer.Option([], "--label", "-l", help="KEY=VALUE (repeatable)."),
    port: list[str] = typer.Option(
        [], "--port", "-p", help="Named port NAME=PORT/PROTO (repeatable)."
    ),
    output: str = OUTPUT,
    api_socket: str = API_SOCKET,
) -> None:
    """Create a pod: a network namespace, a veth to the node, an address, its datapath."""
    check_choice(output, ("table", "json"), "--output")
    ns, name = split_ns_name(endpoint, "endpoint")
    body = {
        "namespace": ns,
        "name": name,
        "labels": parse_key_values(label, "--label"),
        "ports": _ports(port),
    }
    ep = ApiClient.connect(api_socket).post("/v1/endpoints", body)
    if output == "json":
        print_json(ep)
    else:
        typer.echo(
            f"endpoint {ns}/{name}: id {ep['id']}, "
            f"{', '.join(a for a in (ep['ipv4'], ep.get('ipv6')) if a)}, "
            f"identity {ep['identity']}, netns {ep['netns']}"
        )


@app.command("list")
def list_(output: str = OUTPUT, api_socket: str = API_SOCKET) -> None:
    """List the endpoints of this node."""
    check_choice(output, ("table", "json"), "--output")
    eps = ApiClient.connect(api_socket).get("/v1/endpoints")["endpoints"]
    print_json(eps) if output == "json" else _print(eps, output)


@app.command("get")
def get(
    endpoint: str = typer.Argument(..., metavar="NS/NAME"),
    output: str = OUTPUT,
    api_socket: str = API_SOCKET,
) -> None:
    """Show one endpoint."""
    check_choice(output, ("table", "json"), "--output")
    ns, name = split_ns_name(endpoint, "endpoint")
    ep = ApiClient.connect(api_socket).get(path_of("v1", "endpoints", ns, name))
    if output == "json":
        print_json(ep)
        return
    for key in (
        "id",
        "namespace",
        "name",
        "ipv4",
        "ipv6",
        "identity",
        "netns",
        "host_ifname",
        "attach_mode",
    ):
        typer.echo(f"{key + ':':<16}{ep.get(key, '')}")
    typer.echo(f"{'labels:':<16}{', '.join(f'{k}={v}' for k, v in sorted(ep['labels'].items()))}")
    typer.echo(f"{'ports:':<16}{', '.join(ep['ports'])}")
    typer.echo(f"{'identity labels:':<16}")
    for lb in ep["identity_labels"]:
        typer.echo(f"  {lb}")


@app.command("delete")
def delete(
    endpoint: str = typer.Argument(..., metavar="NS/NAME"), api_socket: str = API_SOCKET
) -> None:
    """Delete a pod: its datapath, veth, namespace and address."""
    ns, name = split_ns_name(endpoint, "endpoint")
    ApiClient.connect(api_socket).delete(path_of("v1", "endpoints", ns, name))
    typer.echo(f"endpoint {ns}/{name} deleted")
