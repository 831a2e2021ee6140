"""`membrane probe`: what this kernel lets Membrane use, found by trying each feature."""

from __future__ import annotations

from dataclasses import asdict

import typer

from membrane.choices import check_choice
from membrane.cli.commands import help_of, typer_app
from membrane.cli.output import print_json, print_table
from membrane.errors import NotPermitted


def probe(
    output: str = typer.Option("table", "-o", "--output", help="table or json."),
) -> None:
    check_choice(output, ("table", "json"), "--output")
    # Imported here so that `membrane --help` works without libbpf.
    from membrane.bpf.probe import missing_capabilities, probe_features

    missing = missing_capabilities()
    if missing:
        raise NotPermitted(
            "privileges",
            f"loading probe programs needs {', '.join(missing)}; run membrane probe as root",
        )
    features = probe_features()
    if output == "json":
        print_json([asdict(f) for f in features])
        return
    print_table(
        ["FEATURE", "CATEGORY", "SUPPORTED", "DETAIL"],
        [[f.name, f.category, "yes" if f.supported else "no", f.detail] for f in features],
    )


app = typer_app("probe")
app.command("probe", help=help_of("probe"))(probe)
