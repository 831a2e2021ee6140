"""`membrane service`: Kubernetes services (ClusterIP, NodePort, externalIPs) served by the
agent's socket LB."""

from __future__ import annotations

import sys
from typing import Any

import typer

from membrane.api.client import ApiClient, path_of
from membrane.choices import check_choice
from membrane.cli.api_options import API_SOCKET, OUTPUT, parse_key_values, split_ns_name
from membrane.cli.commands import typer_app
from membrane.cli.output import print_json, print_table
from membrane.errors import UserError

app = typer_app("service", no_args_is_help=True)


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


def _ports(svc: dict[str, Any]) -> str:
    return ",".join(
        f"{p['port']}{':' + str(p['node_port']) if p['node_port'] else ''}/{p['protocol']}"
        for p in svc["ports"]
    )


def _host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _backends(svc: dict[str, Any]) -> str:
    active = sum(1 for b in svc["backends"] if b["state"] == "active")
    return f"{active}/{len(svc['backends'])}"


@app.command(
    "import",
    epilog="Example:\n\n  membrane service import web.yaml\n\n  kubectl get svc,endpointslices "
    "-n shop -o yaml | membrane service import -",
)
def import_(
    file: str = typer.Argument(
        ..., metavar="FILE", help="Service and EndpointSlice YAML (multi-document), or - for stdin."
    ),
    output: str = OUTPUT,
    api_socket: str = API_SOCKET,
) -> None:
    """Import Kubernetes Services and EndpointSlices as written. A Service with a selector
    and no EndpointSlice follows the pods its selector matches. Re-importing a Service keeps
    its ClusterIP."""
    check_choice(output, ("table", "json"), "--output")
    result = ApiClient.connect(api_socket).post("/v1/services/import", {"yaml": _read(file)})
    for warning in result.get("warnings", ()):
        typer.echo(f"warning: {warning}", err=True)
    if output == "json":
        print_json(result)
        return
    for svc in result["services"]:
        typer.echo(
            f"service {svc['namespace']}/{svc['name']}: {','.join(svc['cluster_ips'])} "
            f"{_ports(svc)} ({_backends(svc)} backends active)"
        )
    for name in result["endpoint_slices"]:
        typer.echo(f"endpointslice {name}")


def _port_spec(text: str) -> dict[str, Any]:
    """PORT[:TARGET][/PROTO] -> a ServicePort."""
    body, _, protocol = text.partition("/")
    port, _, target = body.partition(":")
    spec: dict[str, Any] = {"protocol": protocol.upper() or "TCP"}
    try:
        spec["port"] = int(port)
        if target:
            spec["targetPort"] = int(target) if target.isdigit() else target
    except ValueError:
        raise UserError("--port", f"{text!r} is not PORT[:TARGET][/TCP|UDP]") from None
    return spec


def _backend(text: str) -> dict[str, Any]:
    """ADDR[:PORT][,weight=N][,state=S]; an IPv6 address with a port is [ADDR]:PORT."""
    head, *options = text.split(",")
    backend: dict[str, Any] = {}
    if head.startswith("["):
        address, _, rest = head[1:].partition("]")
        port = rest.removeprefix(":")
    elif head.count(":") == 1:
        address, _, port = head.partition(":")
    else:
        address, port = head, ""
    backend["address"] = address
    if port:
        if not port.isdigit():
            raise UserError("--backend", f"{text!r}: {port!r} is not a port number")
        backend["port"] = int(port)
    for key, value in parse_key_values(options, "--backend").items():
        if key == "weight":
            if not str(value).isdigit():
                raise UserError("--backend", f"{text!r}: weight {value!r} is not a number")
            backend["weight"] = int(str(value))
        elif key == "state":
            backend["state"] = value
        else:
            raise UserError("--backend", f"{text!r}: {key!r} is not weight or state")
    return backend


@app.command(
    "add",
    epilog="Examples:\n\n  membrane service add shop/web --port 80:8080 "
    "--backend 198.18.0.5 --backend 198.18.0.6,weight=2\n\n"
    "  membrane service add shop/dns --port 53/UDP --selector app=dns --algorithm maglev",
)
def add(
    target: str = typer.Argument(..., metavar="NS/NAME"),
    port: list[str] = typer.Option(
        ..., "--port", help="PORT[:TARGET][/TCP|UDP]; TARGET a number or a port name."
    ),
    backend: list[str] = typer.Option(
        [], "--backend", help="ADDR[:PORT][,weight=N][,state=active|terminating|maintenance]."
    ),
    selector: list[str] = typer.Option([], "--selector", help="KEY=VALUE: the pods it serves."),
    cluster_ip: str = typer.Option(None, "--cluster-ip", help="Default: allocated."),
    service_type: str = typer.Option("ClusterIP", "--type", help="ClusterIP or NodePort."),
    node_port: int = typer.Option(None, "--node-port", help="Default: allocated (NodePort)."),
    external_ip: list[str] = typer.Option([], "--external-ip"),
    algorithm: str = typer.Option(None, "--algorithm", help="random or maglev."),
    affinity_timeout: int = typer.Option(
        None, "--session-affinity-timeout", help="sessionAffinity ClientIP for SECONDS."
    ),
    output: str = OUTPUT,
    api_socket: str = API_SOCKET,
) -> None:
    """Add a Service by hand: its backends given here, or the pods its selector matches."""
    check_choice(output, ("table", "json"), "--output")
    ns, name = split_ns_name(target, "service")
    ports = [_port_spec(p) for p in port]
    if len(ports) > 1:
        for i, p in enumerate(ports):
            p["name"] = f"p{i}"
    if node_port is not None:
        if len(ports) > 1:
            raise UserError("--node-port", "give it with one --port only")
        ports[0]["nodePort"] = node_port
    spec: dict[str, Any] = {"type": service_type, "ports": ports}
    if cluster_ip:
        spec["clusterIP"] = cluster_ip
    if selector:
        spec["selector"] = parse_key_values(selector, "--selector")
    if external_ip:
        spec["externalIPs"] = external_ip
    if affinity_timeout is not None:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity_timeout}}
    annotations = {"service.cilium.io/lb-algorithm": algorithm} if algorithm else {}
    body = {
        "namespace": ns,
        "name": name,
        "spec": spec,
        "annotations": annotations,
        "backends": [_backend(b) for b in backend],
    }
    svc = ApiClient.connect(api_socket).post("/v1/services", body)
    if output == "json":
        print_json(svc)
    else:
        typer.echo(f"service {ns}/{name}: {','.join(svc['cluster_ips'])} {_ports(svc)}")


@app.command("list")
def list_(output: str = OUTPUT, api_socket: str = API_SOCKET) -> None:
    """Services, their ClusterIPs and ports (PORT:NODEPORT/PROTO) and active backends."""
    check_choice(output, ("table", "json"), "--output")
    services = ApiClient.connect(api_socket).get("/v1/services")["services"]
    if output == "json":
        print_json(services)
        return
    rows = [
        [
            s["namespace"],
            s["name"],
            s["type"],
            ",".join(s["cluster_ips"]),
            _ports(s),
            _backends(s),
            s["lb_algorithm"],
        ]
        for s in services
    ]
    print_table(
        ["NAMESPACE", "NAME", "TYPE", "CLUSTER-IP", "PORTS", "BACKENDS", "ALGORITHM"],
        rows,
        empty="no services",
    )


@app.command("get")
def get(
    target: str = typer.Argument(..., metavar="NS/NAME"),
    output: str = OUTPUT,
    api_socket: str = API_SOCKET,
) -> None:
    """One service: its frontends and each backend's state."""
    check_choice(output, ("table", "json"), "--output")
    ns, name = split_ns_name(target, "service")
    svc = ApiClient.connect(api_socket).get(path_of("v1", "services", ns, name))
    if output == "json":
        print_json(svc)
        return
    affinity = svc["session_affinity"]
    if svc["affinity_timeout_seconds"]:
        affinity += f" ({svc['affinity_timeout_seconds']}s)"
    for label, value in (
        ("name", f"{svc['namespace']}/{svc['name']}"),
        ("type", svc["type"]),
        ("cluster-ips", ",".join(svc["cluster_ips"])),
        ("ports", _ports(svc)),
        ("external-ips", ",".join(svc["external_ips"]) or "-"),
        ("selector", ",".join(f"{k}={v}" for k, v in (svc["selector"] or {}).items()) or "-"),
        ("algorithm", svc["lb_algorithm"]),
        ("affinity", affinity),
        ("traffic-policy", f"external {svc['external_traffic_policy']}, "
                           f"internal {svc['internal_traffic_policy']}"),
    ):  # fmt: skip
        typer.echo(f"{label + ':':<16}{value}")
    rows = [
        [
            str(b["service_port"]),
            f"[{b['address']}]:{b['port']}"
            if ":" in b["address"]
            else f"{b['address']}:{b['port']}",
            b["protocol"],
            b["state"],
            str(b["weight"]),
        ]
        for b in svc["backends"]
    ]
    typer.echo("")
    print_table(["PORT", "BACKEND", "PROTO", "STATE", "WEIGHT"], rows, empty="no backends")


@app.command("delete")
def delete(
    target: str = typer.Argument(..., metavar="NS/NAME"),
    output: str = OUTPUT,
    api_socket: str = API_SOCKET,
) -> None:
    """Delete a service and its EndpointSlices; connections already made keep their backend."""
    check_choice(output, ("table", "json"), "--output")
    ns, name = split_ns_name(target, "service")
    svc = ApiClient.connect(api_socket).delete(path_of("v1", "services", ns, name))
    if output == "json":
        print_json(svc)
    else:
        typer.echo(f"service {ns}/{name} deleted")
