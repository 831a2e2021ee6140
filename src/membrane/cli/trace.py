"""`membrane trace`: the tracing tools, found in membrane.trace.tools."""

from __future__ import annotations

import typer

from membrane.choices import check_choice
from membrane.cli.commands import typer_app
from membrane.cli.output import print_json, print_table
from membrane.trace.tools import discover

app = typer_app("trace", invoke_without_command=True)


@app.callback()
def trace(
    ctx: typer.Context,
    list_tools: bool = typer.Option(
        False, "--list", help="List the tools and whether this kernel supports each."
    ),
    output: str = typer.Option("table", "-o", "--output", help="With --list: table or json."),
) -> None:
    if not list_tools:
        if ctx.invoked_subcommand is None:
            typer.echo(ctx.get_help())
        return
    from membrane.bpf.probe import supports

    output = check_choice(output, ("table", "json"), "--output")
    rows = []
    for tool in discover():
        missing = [f for f in tool.requires if not supports(f)]
        rows.append(
            {
                "tool": tool.name,
                "supported": not missing,
                "missing": missing,
                "summary": tool.summary,
            }
        )
    if output == "json":
        print_json(rows)
    else:
        print_table(
            ["TOOL", "SUPPORTED", "WHAT IT DOES"],
            [
                [
                    r["tool"],
                    "yes" if r["supported"] else f"no ({', '.join(r['missing'])})",
                    r["summary"],
                ]
                for r in rows
            ],
        )
    raise typer.Exit(0)


for _tool in discover():
    app.command(_tool.name)(_tool.command)
