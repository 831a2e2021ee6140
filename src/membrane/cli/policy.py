"""`membrane policy`: NetworkPolicy, CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import typer

from membrane.api.client import ApiClient
from membrane.choices import check_choice
from membrane.cli.api_options import API_SOCKET, OUTPUT
from membrane.cli.commands import typer_app
from membrane.cli.output import print_json, print_table
from membrane.errors import UserError

app = typer_app("policy", no_args_is_help=True)
KIND = typer.Option(
    None, "--kind", help="NetworkPolicy, CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy."
)


def _read(path: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as err:
        raise UserError("file", f"{path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise UserError("file", f"{path} is not UTF-8 text") from None


def _where(target: str) -> tuple[str | None, str]:
    """NS/NAME for namespaced policies, NAME for clusterwide ones."""
    ns, sep, name = target.partition("/")
    if not sep:
        return None, target
    if not ns or not name or "/" in name:
        raise UserError("policy", f"{target!r} is not NS/NAME (or NAME for a clusterwide policy)")
    return ns, name


def _ref(p: dict[str, Any]) -> str:
    return (
        f"{p['kind']} {p['namespace']}/{p['name']}"
        if p["namespace"]
        else f"{p['kind']} {p['name']}"
    )


@app.command("import", epilog="Example:\n\n  membrane policy import allow-frontend.yaml")
def import_(
    file: str = typer.Argument(
        ..., metavar="FILE", help="YAML file (multi-document), or - for stdin."
    ),
    output: str = OUTPUT,
    api_socket: str = API_SOCKET,
) -> None:
    """Import policies; returns when every affected endpoint enforces them. A policy with
    the kind, namespace and name of one in force replaces it."""
    check_choice(output, ("table", "json"), "--output")
    result = ApiClient.connect(api_socket).post("/v1/policies", {"yaml": _read(file)})
    _warn(result.get("warnings", ()))
    if output == "json":
        print_json(result)
        return
    for p in result["policies"]:
        typer.echo(f"{_ref(p)} imported")
    typer.echo(
        f"revision {result['revision']} enforced in {result['enforced_in_seconds'] * 1000:.1f} ms"
    )


def _warn(lines: Iterable[str]) -> None:
    """What a policy means beyond what it says (ignored fields, entities matching nothing
    here): on stderr, so that -o json/yaml output stays the document."""
    for line in lines:
        typer.echo(f"warning: {line}", err=True)


@app.command("list")
def list_(output: str = OUTPUT, api_socket: str = API_SOCKET) -> None:
    """Policies in force."""
    check_choice(output, ("table", "json"), "--output")
    result = ApiClient.connect(api_socket).get("/v1/policies")
    if output == "json":
        print_json(result)
        return
    rows = [[p["kind"], p["namespace"] or "-", p["name"]] for p in result["policies"]]
    print_table(["KIND", "NAMESPACE", "NAME"], rows, empty="no policies")


@app.command("get")
def get(
    target: str = typer.Argument(..., metavar="NS/NAME|NAME"),
    kind: str = KIND,
    output: str = typer.Option("yaml", "-o", "--output", help="yaml or json."),
    api_socket: str = API_SOCKET,
) -> None:
    """Show a policy as it was imported."""
    check_choice(output, ("yaml", "json"), "--output")
    ns, name = _where(target)
    params = {"namespace": ns, "name": name, "kind": kind}
    found = [
        p
        for p in ApiClient.connect(api_socket).get("/v1/policies", params)["policies"]
        if p["namespace"] == ns
    ]
    if not found:
        raise UserError("policy", f"{target} does not exist")
    docs = [p["document"] for p in found]
    _warn(line for p in found for line in p.get("notes", ()))
    if output == "json":
        print_json(docs[0] if len(docs) == 1 else docs)
    else:
        import yaml  # only this command prints YAML

        typer.echo(yaml.safe_dump_all(docs, sort_keys=False).rstrip())


@app.command("delete")
def delete(
    target: str = typer.Argument(None, metavar="NS/NAME|NAME"),
    all_: bool = typer.Option(False, "--all", help="Delete every policy."),
    kind: str = KIND,
    api_socket: str = API_SOCKET,
) -> None:
    """Delete a policy (or all); returns when every affected endpoint enforces the change."""
    if all_ == bool(target):
        raise UserError("policy", "give NS/NAME (NAME for a clusterwide policy) or --all")
    params: dict[str, Any] = {"all": "1"} if all_ else {}
    if target:
        ns, name = _where(target)
        params = {"namespace": ns, "name": name, "kind": kind}
    result = ApiClient.connect(api_socket).delete("/v1/policies", params)
    for p in result["policies"]:
        typer.echo(f"{_ref(p)} deleted")
    typer.echo(
        f"revision {result['revision']} enforced in {result['enforced_in_seconds'] * 1000:.1f} ms"
    )


@app.command(
    "trace",
    epilog="Example:\n\n  membrane policy trace --src default/frontend "
    "--dst default/backend --dport 80/TCP",
)
def trace(
    src: str = typer.Option(..., "--src", help="NS/NAME, host, world or an IPv4 address."),
    dst: str = typer.Option(..., "--dst", help="NS/NAME, host, world or an IPv4 address."),
    dport: str = typer.Option(..., "--dport", help="PORT/PROTO (TCP, UDP, SCTP), or TYPE/ICMP."),
    output: str = OUTPUT,
    api_socket: str = API_SOCKET,
) -> None:
    """Explain whether a connection is allowed, and which policy rule decides it."""
    check_choice(output, ("table", "json"), "--output")
    number, _, proto = dport.partition("/")
    if not number.isdigit() or int(number) > 65535:
        raise UserError("--dport", f"{dport!r} is not PORT/PROTO with a port 0..65535")
    proto = (proto or "TCP").upper()
    check_choice(proto, ("TCP", "UDP", "SCTP", "ICMP"), "--dport protocol")
    body = {"src": src, "dst": dst, "dport": int(number), "protocol": proto}
    result = ApiClient.connect(api_socket).post("/v1/policy/trace", body)
    if output == "json":
        print_json(result)
        return
    typer.echo(
        f"{result['src']} -> {result['dst']} {result['dport']}/{result['protocol']}: "
        f"{result['verdict']}"
    )
    for step in result["steps"]:
        verdict = "allowed" if step["allowed"] else "denied"
        typer.echo(f"  {step['direction']} of {step['endpoint']}: {verdict}")
        for line in step["explanation"]:
            typer.echo(f"    {line}")
        if step["datapath_allowed"] != step["allowed"]:
            typer.echo(
                "    WARNING: the datapath's entries disagree: "
                + ("allowed" if step["datapath_allowed"] else "denied")
            )
    for line in result.get("notes", ()):
        typer.echo(f"  note: {line}")
