"""`membrane security policy`: TracingPolicy / TracingPolicyNamespaced (Tetragon's format)
applied to the agent, whose selectors run and whose actions (Sigkill, Signal, Override on
connect) happen in the kernel. `policy_app` is what `membrane security` (cli.security)
mounts as `policy`."""

from __future__ import annotations

import typer

from membrane.api.client import ApiClient
from membrane.choices import check_choice
from membrane.cli.api_options import API_SOCKET, OUTPUT
from membrane.cli.output import print_json, print_table
from membrane.cli.policy import _read

policy_app = typer.Typer(
    name="policy",
    help="Tracing policies (Tetragon's TracingPolicy YAML): apply, list, delete.",
    no_args_is_help=True,
    add_completion=False,
)

APPLY_EPILOG = """Example: kill any process but one binary that opens /etc/shadow

\b
  apiVersion: cilium.io/v1alpha1
  kind: TracingPolicy
  metadata: {name: shadow}
  spec:
    tracepoints:
    - subsystem: syscalls
      event: sys_enter_openat
      args: [{index: 6, type: string}]
      selectors:
      - matchArgs: [{index: 6, operator: Equal, values: ["/etc/shadow"]}]
        matchBinaries: [{operator: NotIn, values: ["/usr/sbin/unix_chkpwd"]}]
        matchActions: [{action: Sigkill}]

  membrane security policy apply shadow.yaml
"""


def _ref(p: dict) -> str:
    return f"{p['namespace']}/{p['name']}" if p["namespace"] else p["name"]


@policy_app.command("apply", epilog=APPLY_EPILOG)
def apply(
    file: str = typer.Argument(..., metavar="FILE", help="YAML (multi-document), or - for stdin."),
    output: str = OUTPUT,
    api_socket: str = API_SOCKET,
) -> None:
    """Apply tracing policies: each is checked whole (every field, the hooks on this
    kernel) before anything loads, and in force in the kernel when this returns. A
    policy with the name of one in force replaces it without a gap."""
    check_choice(output, ("table", "json"), "--output")
    result = ApiClient.connect(api_socket).post("/v1/security/policies", {"yaml": _read(file)})
    if output == "json":
        print_json(result)
        return
    for p in result["policies"]:
        hooks = ", ".join(h["target"] for h in p["hooks"])
        typer.echo(f"{p['kind']} {_ref(p)} applied ({hooks})")


@policy_app.command("list")
def list_(output: str = OUTPUT, api_socket: str = API_SOCKET) -> None:
    """Tracing policies in force, with their hooks and the calls they refused."""
    check_choice(output, ("table", "json"), "--output")
    result = ApiClient.connect(api_socket).get("/v1/security/policies")
    if output == "json":
        print_json(result)
        return
    rows = [
        [_ref(p), p["kind"], p.get("error") or ", ".join(h["target"] for h in p["hooks"]),
         str(sum(h["denied"] for h in p["hooks"]))]
        for p in result["policies"]
    ]  # fmt: skip
    print_table(["NAME", "KIND", "HOOKS", "REFUSED"], rows, empty="no tracing policies")
    if result.get("events_lost"):
        typer.echo(f"warning: {result['events_lost']} policy events lost (ring full)", err=True)


@policy_app.command("delete")
def delete(
    name: str = typer.Argument(..., metavar="NAME|NS/NAME"),
    output: str = OUTPUT,
    api_socket: str = API_SOCKET,
) -> None:
    """Remove a tracing policy: its programs are detached, nothing of it stays."""
    check_choice(output, ("table", "json"), "--output")
    namespace, sep, bare = name.rpartition("/")
    params = {"namespace": namespace} if sep else None
    result = ApiClient.connect(api_socket).delete(f"/v1/security/policies/{bare}", params)
    if output == "json":
        print_json(result)
        return
    for p in result["policies"]:
        typer.echo(f"{p['kind']} {_ref(p)} deleted")
