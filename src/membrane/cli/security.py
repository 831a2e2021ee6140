"""`membrane security`: runtime security of the agent. `events` prints the process
lifecycle and tracing-policy events in Tetragon's schema (`tetra getevents`'s flags and
formats); `status` says what runs and what the kernel lacks; `policy` (cli.security_policy)
applies tracing policies."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable

import typer

from membrane.cli.api_options import API_SOCKET
from membrane.cli.commands import typer_app
from membrane.cli.security_policy import policy_app

app = typer_app("security", no_args_is_help=True)
app.add_typer(policy_app, name="policy")

EVENTS_EPILOG = """Examples:

\b
  membrane security events --last 50
  membrane security events -f -o json
  membrane security events -f --namespace shop --pods '^web-' --event-types PROCESS_EXEC
  membrane security events --processes curl --policy-names block-connect

Filters (as `tetra getevents`): values of one flag OR, different flags AND. -o json prints
one tetragon.GetEventsResponse per line in protobuf JSON with proto field names."""


@app.command("events", epilog=EVENTS_EPILOG)
def events(
    follow: bool = typer.Option(False, "--follow", "-f", help="Then keep printing new events."),
    last: int = typer.Option(
        None, "--last", help="The last N stored events (default 20; with -f: 0).", min=0
    ),
    output: str = typer.Option("compact", "-o", "--output", help="compact or json."),
    pods: list[str] = typer.Option(None, "--pods", help="Pod name regular expressions."),
    namespace: list[str] = typer.Option(None, "--namespace", "-n", help="Pod namespaces."),
    processes: list[str] = typer.Option(
        None, "--processes", help="Binary path regular expressions."
    ),
    event_types: list[str] = typer.Option(
        None, "--event-types", help="PROCESS_EXEC, PROCESS_EXIT, PROCESS_TRACEPOINT, ..."
    ),
    policy_names: list[str] = typer.Option(
        None, "--policy-names", help="Events of these tracing policies."
    ),
    api_socket: str = API_SOCKET,
) -> None:
    """Process exec/exit and tracing policy events, recent and live."""
    from membrane.api.client import ApiClient
    from membrane.choices import check_choice

    check_choice(output, ("compact", "json"), "--output")
    allow = _filter(pods, namespace, processes, event_types, policy_names)
    params = {
        "request": json.dumps({"allow_list": [allow]} if allow else {}),
        "last": last,
        "follow": "1" if follow else None,
    }
    show = _printer(output)
    client = ApiClient.connect(api_socket)
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        for obj in client.stream("/v1/security/events", params):
            show(obj)


def _filter(
    pods: list[str] | None,
    namespace: list[str] | None,
    processes: list[str] | None,
    event_types: list[str] | None,
    policy_names: list[str] | None,
) -> dict:
    from membrane.errors import UserError
    from membrane.tetragon.tetragon import events_pb2

    allow: dict = {}
    if pods:
        allow["pod_regex"] = pods
    if namespace:
        allow["namespace"] = namespace
    if processes:
        allow["binary_regex"] = processes
    if policy_names:
        allow["policy_names"] = policy_names
    if event_types:
        known = [n for n in events_pb2.EventType.DESCRIPTOR.values_by_name if n != "UNDEF"]
        for t in event_types:
            if t.upper() not in known:
                raise UserError("--event-types", f"{t!r} is not one of {', '.join(known)}")
        allow["event_set"] = [t.upper() for t in event_types]
    return allow


def _printer(output: str) -> Callable[[dict], None]:
    if output == "json":
        return lambda obj: print(json.dumps(obj, separators=(",", ":")), flush=True)
    from google.protobuf import json_format

    from membrane.security.format import compact_line
    from membrane.tetragon.tetragon import events_pb2

    def show(obj: dict) -> None:
        event = json_format.ParseDict(
            obj, events_pb2.GetEventsResponse(), ignore_unknown_fields=True
        )
        print(compact_line(event), flush=True)

    return show


@app.command("status")
def status(
    output: str = typer.Option("table", "-o", "--output", help="table or json."),
    api_socket: str = API_SOCKET,
) -> None:
    """What runtime security runs in the agent, what the kernel lacks, and its counters."""
    from membrane.api.client import ApiClient
    from membrane.choices import check_choice
    from membrane.cli.output import print_json

    check_choice(output, ("table", "json"), "--output")
    state = ApiClient.connect(api_socket).get("/v1/security/status")
    if output == "json":
        print_json(state)
        return
    for key, value in state.items():
        typer.echo(f"{key.replace('_', '-') + ':':<20}{value}")
