"""Entry point of the `membrane` command: `membrane <noun> <verb>`.

Start-up is kept short because every command is its own process (a CNI plugin pays it per
container): the subcommands load lazily (lazy.py) and each one imports only what it uses."""

from __future__ import annotations

import sys

import typer

from membrane.cli.lazy import LazyGroup
from membrane.errors import UserError

app = typer.Typer(
    name="membrane",
    cls=LazyGroup,
    help="eBPF networking, security and observability for Linux containers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def installed_version() -> str:
    # Imported here: importlib.metadata costs ~25 ms, which only --version should pay.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("membrane")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from membrane import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"membrane {installed_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    pass


def fail(message: str, code: int = 2) -> None:
    """Print one error line on stderr and exit."""
    print(f"membrane: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except UserError as err:
        fail(str(err), err.exit_code)
    except typer.TyperException as err:
        # click's errors: typer (>= 0.28) vendors click, with this public base class
        if type(err).__name__ == "NoArgsIsHelpError":  # told apart as typer itself does
            # the help; typer's rich formatting has printed it already and left this empty
            if help_text := err.format_message():
                print(help_text)
            raise SystemExit(0) from None
        # click prints usage text and a box; our convention is one line naming the problem
        fail(err.format_message().replace("\n", " "), err.exit_code)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except BrokenPipeError:  # e.g. `membrane filter events -f | head`
        sys.stderr.close()
        raise SystemExit(0) from None
    raise SystemExit(code if isinstance(code, int) else 0)
