"""`membrane namespace`: namespace labels (what namespaceSelector matches)."""

from __future__ import annotations

import typer

from membrane.api.client import ApiClient, path_of
from membrane.choices import check_choice
from membrane.cli.api_options import API_SOCKET, OUTPUT, parse_key_values
from membrane.cli.commands import typer_app
from membrane.cli.output import print_json, print_table
from membrane.errors import UserError

app = typer_app("namespace", no_args_is_help=True)


@app.command("label", epilog="Example:\n\n  membrane namespace label prod team=payments env-")
def label(
    namespace: str = typer.Argument(..., metavar="NS"),
    labels: list[str] = typer.Argument(..., metavar="KEY=VALUE|KEY-"),
    output: str = OUTPUT,
    api_socket: str = API_SOCKET,
) -> None:
    """Set (KEY=VALUE) or remove (KEY-) labels; identities and policies follow at once."""
    check_choice(output, ("table", "json"), "--output")
    changes = parse_key_values(labels, "labels", allow_removal=True)
    if not changes:
        raise UserError("labels", "give at least one KEY=VALUE or KEY-")
    result = ApiClient.connect(api_socket).put(
        path_of("v1", "namespaces", namespace, "labels"), {"labels": changes}
    )
    if output == "json":
        print_json(result)
    else:
        typer.echo(
            f"namespace {namespace}: "
            + ", ".join(f"{k}={v}" for k, v in sorted(result["labels"].items()))
        )


@app.command("list")
def list_(output: str = OUTPUT, api_socket: str = API_SOCKET) -> None:
    """Namespaces with endpoints or labels, and their labels."""
    check_choice(output, ("table", "json"), "--output")
    spaces = ApiClient.connect(api_socket).get("/v1/namespaces")["namespaces"]
    if output == "json":
        print_json(spaces)
        return
    rows = [
        [s["name"], ",".join(f"{k}={v}" for k, v in sorted(s["labels"].items()))] for s in spaces
    ]
    print_table(["NAMESPACE", "LABELS"], rows, empty="no namespaces")
