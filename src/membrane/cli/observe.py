"""`membrane observe`: recent and live flows from the agent, like `hubble observe`, in
Hubble's flow schema (observer.GetFlowsResponse)."""

from __future__ import annotations

import typer

from membrane.choices import check_choice
from membrane.cli.commands import help_of, typer_app
from membrane.errors import UserError
from membrane.observe.flowfilter import FlowFilter
from membrane.observe.format import FORMATS, FlowPrinter, parse_response

FLOWS_PATH = "/v1/flows"
EPILOG = (
    "Examples:\n\n  membrane observe --last 50\n\n"
    "  membrane observe -f --verdict DROPPED\n\n"
    "  membrane observe -f --pod shop/db --port 5432 -o json\n\n"
    "  membrane observe --verdict DROPPED --print-policy-names"
)


def observe(
    last: int = typer.Option(20, "--last", help="Show the last N recorded flows."),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="Then keep printing new flows until Ctrl-C."
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
    namespace: str = typer.Option(
        None, "--namespace", "-n", help="Only flows with either side in this namespace."
    ),
    pod: str = typer.Option(
        None,
        "--pod",
        help="Only flows with this pod on either side: NAMESPACE/POD (POD alone: in "
        "namespace default).",
    ),
    verdict: str = typer.Option(None, "--verdict", help="FORWARDED or DROPPED."),
    protocol: str = typer.Option(None, "--protocol", help="tcp, udp, sctp, icmp or icmpv6."),
    port: str = typer.Option(None, "--port", help="Only flows from or to this port."),
    api_socket: str = typer.Option(
        None,
        "--api-socket",
        envvar="MEMBRANE_API_SOCKET",
        help="The agent's API socket (default: /run/membrane/membrane.sock).",
    ),
) -> None:
    output = check_choice(output, FORMATS, "--output")
    if last < 0:
        raise UserError("--last", f"{last} is negative (give 0 to show only new flows)")
    options = {
        "namespace": namespace,
        "pod": pod,
        "verdict": verdict,
        "protocol": protocol,
        "port": port,
    }
    # Checked here too, so that a bad option names the option, not a query parameter.
    flow_filter = FlowFilter.from_params(
        {k: v for k, v in options.items() if v is not None}, option_prefix="--"
    )
    params = {"last": str(last), "follow": "1" if follow else "0", **flow_filter.to_params()}

    from membrane.api.client import ApiClient

    client = ApiClient.connect(api_socket)
    printer = FlowPrinter(output, follow, print_policy_names)
    if follow:
        try:
            for item in client.stream(FLOWS_PATH, params):
                printer.item(parse_response(item))
        except KeyboardInterrupt:  # the way a follow ends: quietly
            pass
    else:
        for item in client.get(FLOWS_PATH, params)["flows"]:
            printer.item(parse_response(item))
    printer.close()


app = typer_app("observe")
app.command("observe", help=help_of("observe"), epilog=EPILOG)(observe)
