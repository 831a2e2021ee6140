"""`membrane observe`: recent and live flows from the agent, like `hubble observe`: the same
flags with the same rules (observe.filter_options), sent as a GetFlowsRequest over Hubble's
gRPC Observer API, the flows printed in Hubble's formats (observe.format).

`--not` negates the flag after it, so the order of the flags on the command line matters;
click hands over each option's values apart, so the command keeps the order in which the
parser met them (FlagOrderCommand)."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import typer
from typer.core import TyperCommand

from membrane.cli.commands import help_of, typer_app
from membrane.cli.frozen_imports import importing_for_good
from membrane.observe.filter_options import FILTER_FLAGS, FilterFlag

ORDER_KEY = "membrane.observe.flag_order"
FILTERS_PANEL = "Filters (one flag's values OR, different flags AND; --not negates the next)"
EPILOG = (
    "Filter rules (as `hubble observe`): a flow must match every filter flag given, and at "
    "least one value of each. A flag without --from-/--to- (--ip, --pod, --label, --port, "
    "--identity, --namespace, ...) matches either side: it makes one filter for the source "
    "and one for the destination, and a flow passes either. -n NAMESPACE names the "
    "namespace of --pod/--service values that have none, or alone selects the namespace. "
    "--not puts the next filter flag on the blacklist: flows that match it are left out. "
    "--since/--until take a duration back from now (5m, 1h30m) or an RFC 3339 time.\n\n"
    "Examples:\n\n  membrane observe --last 50\n\n"
    "  membrane observe -f --verdict DROPPED\n\n"
    "  membrane observe --from-pod kube-system/ --to-label app=web\n\n"
    "  membrane observe -n shop --pod db --port 5432 -o json\n\n"
    "  membrane observe --ip 198.18.0.0/16 --not --verdict FORWARDED\n\n"
    "  membrane observe -t drop --since 10m --print-policy-names\n\n"
    "  membrane observe --protocol udp --to-port 53 --print-raw-filters"
)


class FlagOrderCommand(TyperCommand):
    """Keeps, in `ctx.meta`, the parameters in the order the command line gave them (one
    entry per occurrence)."""

    def make_parser(self, ctx: Any) -> Any:
        parser = super().make_parser(ctx)
        parse_args = parser.parse_args

        def parse_in_order(args: list[str]) -> Any:
            opts, rest, order = parse_args(args=args)
            ctx.meta[ORDER_KEY] = [param.name for param in order]
            return opts, rest, order

        parser.parse_args = parse_in_order
        return parser


def _param_name(flag: FilterFlag) -> str:
    return "filter_" + flag.name.replace("-", "_")


PARAM_FLAGS = {_param_name(flag): flag for flag in FILTER_FLAGS}


def filter_flags_in_order(ctx: typer.Context, values: dict[str, Any]) -> list[tuple[str, Any]]:
    """(flag name, value or None) for each filter flag, in command-line order."""
    queues = {name: list(v or ()) for name, v in values.items() if isinstance(v, list)}
    pairs = []
    for name in ctx.meta.get(ORDER_KEY, ()):
        flag = PARAM_FLAGS.get(name)
        if flag is not None:
            pairs.append((flag.name, queues[name].pop(0) if flag.takes_value else None))
    return pairs


def observe(
    ctx: typer.Context,
    last: int = typer.Option(
        0, "--last", help="Show the last N stored flows (20 when no selector is given)."
    ),
    first: int = typer.Option(0, "--first", help="Show the first (oldest) N stored flows."),
    all_flows: bool = typer.Option(False, "--all", help="Show all stored flows."),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="Then keep printing new flows until Ctrl-C."
    ),
    since: str = typer.Option(
        None, "--since", help="Flows from this time on: 5m, 1h30m back, or RFC 3339."
    ),
    until: str = typer.Option(
        None, "--until", help="Flows up to this time (not with --follow): 5m, RFC 3339."
    ),
    output: str = typer.Option(
        "compact",
        "-o",
        "--output",
        help="compact (one line per flow), json (one observer.GetFlowsResponse per line, "
        "as `hubble observe -o json`), dict or table.",
    ),
    print_policy_names: bool = typer.Option(
        False,
        "--print-policy-names",
        help="Name the policies that allowed or denied each flow.",
    ),
    print_raw_filters: bool = typer.Option(
        False,
        "--print-raw-filters",
        help="Print the whitelist and blacklist FlowFilters the flags make (YAML of "
        "JSON, as Hubble prints them) and exit.",
    ),
    allowlist: list[str] = typer.Option(
        None, "--allowlist", help="A whitelist FlowFilter in Hubble's JSON (repeatable)."
    ),
    denylist: list[str] = typer.Option(
        None, "--denylist", help="A blacklist FlowFilter in Hubble's JSON (repeatable)."
    ),
    server: str = typer.Option(
        None,
        "--server",
        envvar="MEMBRANE_HUBBLE_SERVER",
        help="The Observer API: unix:///PATH or HOST:PORT (default: hubble.sock beside "
        "the agent's API socket).",
    ),
    api_socket: str = typer.Option(
        None,
        "--api-socket",
        envvar="MEMBRANE_API_SOCKET",
        help="The agent's API socket (default: /run/membrane/membrane.sock), beside which "
        "its Observer API listens.",
    ),
    **filters: Any,
) -> None:
    with importing_for_good():  # the protobuf modules above all (see entry.py)
        from membrane.choices import check_choice
        from membrane.hubble.client import ObserverClient, default_server
        from membrane.observe.filter_options import flows_request, raw_filters_yaml
        from membrane.observe.format import FORMATS, FlowPrinter

    output = check_choice(output, FORMATS, "--output")
    request = flows_request(
        filter_flags_in_order(ctx, filters),
        last=last,
        first=first,
        all_flows=all_flows,
        follow=follow,
        since=since,
        until=until,
        allowlist=allowlist or (),
        denylist=denylist or (),
    )
    if print_raw_filters:
        typer.echo(raw_filters_yaml(request), nl=False)
        return

    printer = FlowPrinter(output, follow, print_policy_names)
    # Ctrl-C ends a follow quietly, while it waits on the socket (the client) or while a
    # flow is being printed (here).
    with (
        ObserverClient.connect(server or default_server(api_socket)) as client,
        contextlib.suppress(KeyboardInterrupt),
    ):
        for response in client.get_flows(request):
            printer.item(response)
    printer.close()


def _filter_parameter(flag: FilterFlag) -> inspect.Parameter:
    names = [f"--{flag.name}", *([flag.short] if flag.short else [])]
    if flag.takes_value:
        default = typer.Option(None, *names, help=flag.help, rich_help_panel=FILTERS_PANEL)
        annotation: Any = list[str] | None
    else:  # a switch: counted, so that each occurrence keeps its place
        default = typer.Option(
            0,
            *names,
            count=True,
            show_default=False,
            metavar="",
            help=flag.help,
            rich_help_panel=FILTERS_PANEL,
        )
        annotation = int
    return inspect.Parameter(
        _param_name(flag), inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


def _declare_filter_flags() -> None:
    """The filter flags come from filter_options' table: one option each, in its order."""
    signature = inspect.signature(observe, eval_str=True)
    fixed = [p for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD]
    extra = [_filter_parameter(flag) for flag in FILTER_FLAGS]
    observe.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*fixed, *extra]
    )
    observe.__annotations__.update({p.name: p.annotation for p in extra})


_declare_filter_flags()
app = typer_app("observe")
app.command("observe", help=help_of("observe"), epilog=EPILOG, cls=FlagOrderCommand)(observe)
