"""Entry point of the `membrane` command: `membrane <noun> <verb>`."""

from __future__ import annotations

import sys

import typer
from typer._click import exceptions as click_exceptions

from membrane.errors import UserError

app = typer.Typer(
    name="membrane",
    help="eBPF networking, security and observability for Linux containers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _register() -> None:
    from membrane.cli import agent as agent_cli
    from membrane.cli import endpoint as endpoint_cli
    from membrane.cli import filter as filter_cli
    from membrane.cli import namespace as namespace_cli
    from membrane.cli import observe as observe_cli
    from membrane.cli import policy as policy_cli
    from membrane.cli import probe as probe_cli
    from membrane.cli import trace as trace_cli

    app.add_typer(agent_cli.app, name="agent")
    app.add_typer(endpoint_cli.app, name="endpoint")
    app.add_typer(namespace_cli.app, name="namespace")
    app.add_typer(policy_cli.app, name="policy")
    app.command("observe", epilog=observe_cli.EPILOG)(observe_cli.observe)
    app.add_typer(filter_cli.app, name="filter")
    app.add_typer(trace_cli.app, name="trace")
    app.command("probe")(probe_cli.probe)


def fail(message: str, code: int = 2) -> None:
    """Print one error line on stderr and exit."""
    print(f"membrane: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main() -> None:
    _register()
    try:
        code = app(standalone_mode=False)
    except UserError as err:
        fail(str(err), err.exit_code)
    except click_exceptions.NoArgsIsHelpError as err:
        print(err.ctx.get_help() if err.ctx else err.format_message())
        raise SystemExit(0) from None
    except click_exceptions.UsageError as err:
        # click prints usage text and a box; our convention is one line naming the problem
        fail(err.format_message().replace("\n", " "), 2)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except BrokenPipeError:  # e.g. `membrane filter events -f | head`
        sys.stderr.close()
        raise SystemExit(0) from None
    raise SystemExit(code if isinstance(code, int) else 0)
