"""`membrane agent`: run the node agent."""

from __future__ import annotations

import dataclasses

import typer

from membrane.agent.config import (
    DEFAULT_ALLOW_LOCALHOST,
    DEFAULT_HUBBLE_BUFFER_SIZE,
    DEFAULT_NODE_IP,
    DEFAULT_NODE_IPV6,
    DEFAULT_POD_CIDR,
    DEFAULT_POD_CIDR_V6,
    DEFAULT_POLICY_MAP_MAX,
    DEFAULT_SERVICE_CIDR,
    DEFAULT_SERVICE_CIDR_V6,
    DEFAULT_STATE_DIR,
    make_config,
)
from membrane.api.client import DEFAULT_SOCKET, SOCKET_ENV
from membrane.cli.api_options import API_SOCKET, OUTPUT
from membrane.cli.commands import typer_app

app = typer_app("agent", no_args_is_help=True)


@app.command(
    "run",
    epilog="Example:\n\n  membrane agent run --node-netns membrane-node "
    "--state-dir /var/lib/membrane",
)
def run(
    state_dir: str = typer.Option(
        DEFAULT_STATE_DIR, "--state-dir", help="Where the agent keeps what it must remember."
    ),
    api_socket: str = typer.Option(
        DEFAULT_SOCKET,
        "--api-socket",
        envvar=SOCKET_ENV,
        help="Unix socket of the REST API (mode 0600).",
    ),
    node_netns: str = typer.Option(
        None,
        "--node-netns",
        help="Keep the node's host side in this network namespace (created if missing); "
        "default: the root namespace.",
    ),
    pod_cidr: str = typer.Option(DEFAULT_POD_CIDR, "--pod-cidr", help="Addresses for pods."),
    node_ip: str = typer.Option(
        DEFAULT_NODE_IP,
        "--node-ip",
        help="The node's address: the pods' gateway and the host entity.",
    ),
    ipv6: str = typer.Option(
        "true",
        "--ipv6",
        help="true: pods are dual-stack (an IPv6 address beside the IPv4 one); false: "
        "IPv4 only, and IPv6 to or from pods is dropped.",
    ),
    pod_cidr_v6: str = typer.Option(
        DEFAULT_POD_CIDR_V6, "--pod-cidr-v6", help="IPv6 addresses for pods (with --ipv6=true)."
    ),
    node_ipv6: str = typer.Option(
        DEFAULT_NODE_IPV6,
        "--node-ipv6",
        help="The node's IPv6 address: the pods' IPv6 gateway and the host entity.",
    ),
    kube_apiserver_ip: str = typer.Option(
        "",
        "--kube-apiserver-ip",
        help="Addresses (comma-separated) the kube-apiserver entity stands for; none: the "
        "entity matches nothing.",
    ),
    policy_cidr_match_mode: str = typer.Option(
        "world",
        "--policy-cidr-match-mode",
        help="What CiliumNetworkPolicy toCIDR/fromCIDR/CIDR sets match: world (Cilium's "
        "default: addresses outside the cluster) or all (pods' addresses too, as a "
        "Kubernetes NetworkPolicy ipBlock always does).",
    ),
    netns_prefix: str = typer.Option(
        "", "--netns-prefix", help="Prefix of pod namespace names (NS-NAME by default)."
    ),
    allow_localhost: str = typer.Option(
        DEFAULT_ALLOW_LOCALHOST,
        "--allow-localhost",
        help="always: the node and its pods reach each other whatever default deny says "
        "(Kubernetes' rule; deny rules still apply); policy: the node is a peer like any "
        "other.",
    ),
    attach: str = typer.Option(
        "auto",
        "--attach",
        help="How endpoint programs attach: auto (tcx where the kernel has it, kernel >= 6.6; "
        "else tc clsact; what is attached already keeps its mode), tcx or clsact (attachments "
        "in the other mode are replaced).",
    ),
    policy_map_max: str = typer.Option(
        str(DEFAULT_POLICY_MAP_MAX),
        "--policy-map-max",
        help="Entries of the node's policy map (every endpoint's rules share it), set when "
        "the map is created (a pinned map keeps its size). A change that would not fit is "
        "refused before anything is written.",
    ),
    hubble_socket: str = typer.Option(
        "",
        "--hubble-socket",
        help="Unix socket of Hubble's Observer API (gRPC; mode 0660), which `membrane "
        "observe` and Hubble's own CLI read flows from; default: hubble.sock beside "
        "--api-socket.",
    ),
    hubble_listen_address: str = typer.Option(
        "",
        "--hubble-listen-address",
        help="Serve the Observer API on TCP too, HOST:PORT or :PORT (Cilium's port: :4244; "
        "no TLS, so keep it on a trusted network); default: off.",
    ),
    hubble_buffer_size: str = typer.Option(
        str(DEFAULT_HUBBLE_BUFFER_SIZE),
        "--hubble-buffer-size",
        "--hubble-event-buffer-capacity",
        help="Flows the agent keeps for queries (Hubble's ring): one less than a power of "
        "two (1, 3, 7, ..., 4095, ..., 16777215).",
    ),
    flow_log: str = typer.Option(
        "",
        "--flow-log",
        "--hubble-export-file-path",
        help="Also write flows to FILE, one observer.GetFlowsResponse JSON line each "
        "(as `hubble observe -o json`); its tail refills the flow store when the agent "
        "starts. Default: off.",
    ),
    flow_log_max_size_mb: str = typer.Option(
        "10",
        "--flow-log-max-size-mb",
        "--hubble-export-file-max-size-mb",
        help="Rotate the flow log when it would grow past this many MiB (FILE -> FILE.1).",
    ),
    flow_log_max_backups: str = typer.Option(
        "5",
        "--flow-log-max-backups",
        "--hubble-export-file-max-backups",
        help="Rotated flow logs to keep (FILE.1 ... FILE.N).",
    ),
    flow_log_allowlist: str = typer.Option(
        "",
        "--flow-log-allowlist",
        "--hubble-export-allowlist",
        help="Only flows matching any of these FlowFilters go to the flow log: JSON with "
        "proto field names, a list or objects one after another, as Hubble's exporter "
        'takes (\'{"source_pod":["shop/"]}\').',
    ),
    flow_log_denylist: str = typer.Option(
        "",
        "--flow-log-denylist",
        "--hubble-export-denylist",
        help="Flows matching any of these FlowFilters stay out of the flow log (same JSON).",
    ),
    monitor_aggregation: str = typer.Option(
        "medium",
        "--monitor-aggregation",
        help="Trace flows of forwarded packets (Cilium's levels): medium samples per "
        "connection (its first packet and first reply, then SYN, FIN or RST new to a "
        "direction); maximum: none; low/lowest: every packet to a pod; none: every packet "
        "both ways (an event each). Forward counters count every packet at any level.",
    ),
    prometheus_serve_addr: str = typer.Option(
        "",
        "--prometheus-serve-addr",
        help="Serve the agent's Prometheus metrics (cilium_*) on HOST:PORT or :PORT "
        "(Cilium's port: :9962); default: off.",
    ),
    hubble_metrics_server: str = typer.Option(
        "",
        "--hubble-metrics-server",
        help="Serve flow metrics (hubble_*) on HOST:PORT or :PORT (Hubble's port: :9965); "
        "default: off.",
    ),
    kernel_drops: str = typer.Option(
        "true",
        "--kernel-drops",
        help="true: flows also show packets of pods the kernel drops outside the datapath "
        "(no socket, netfilter, no route...; skb:kfree_skb, Linux 5.17 or later); false: off.",
    ),
    cgroup_root: str = typer.Option(
        "",
        "--cgroup-root",
        help="A cgroup v2 directory whose processes the agent's cgroup hooks cover: the "
        "socket LB of services (default: the cgroup2 mount's root) and tracing policies that "
        "refuse connect (default: none).",
    ),
    runtime_security: str = typer.Option(
        "true",
        "--runtime-security",
        help="true: watch every exec and exit on the node (process cache, Tetragon-schema "
        "events for `membrane security events`); false: off.",
    ),
    process_cache_size: str = typer.Option(
        "8192",
        "--process-cache-size",
        help="Exited processes the process cache remembers for later events' parents and "
        "ancestors (live processes are always kept).",
    ),
    security_event_buffer_size: str = typer.Option(
        "8191", "--security-event-buffer-size", help="Security events kept for --last."
    ),
    security_export_file: str = typer.Option(
        "",
        "--security-export-file",
        "--export-filename",
        help="Also write security events to FILE, one GetEventsResponse JSON line each (as "
        "Tetragon's export). Default: off.",
    ),
    security_export_max_size_mb: str = typer.Option(
        "10",
        "--security-export-max-size-mb",
        "--export-file-max-size-mb",
        help="Rotate the export file when it would grow past this many MiB (FILE -> FILE.1).",
    ),
    security_export_max_backups: str = typer.Option(
        "5",
        "--security-export-max-backups",
        "--export-file-max-backups",
        help="Rotated export files to keep.",
    ),
    security_export_allowlist: str = typer.Option(
        "",
        "--security-export-allowlist",
        "--export-allowlist",
        help="Only events matching any of these Tetragon filters are exported: JSON objects, "
        'one per line (\'{"event_set":["PROCESS_EXEC"],"namespace":["shop"]}\').',
    ),
    security_export_denylist: str = typer.Option(
        "",
        "--security-export-denylist",
        "--export-denylist",
        help="Events matching any of these filters are not exported (same JSON).",
    ),
    security_redaction_filters: str = typer.Option(
        "",
        "--security-redaction-filters",
        "--redaction-filters",
        help="Tetragon redaction filters (JSON lines): the text of each capture group of "
        '"redact" regexes in process arguments becomes *****, optionally only for '
        '"binary_regex" binaries.',
    ),
    service_cidr: str = typer.Option(
        DEFAULT_SERVICE_CIDR, "--service-cidr", help="ClusterIPs of services (IPv4)."
    ),
    service_cidr_v6: str = typer.Option(
        DEFAULT_SERVICE_CIDR_V6,
        "--service-cidr-v6",
        help="IPv6 ClusterIPs of services (with --ipv6=true).",
    ),
    bpf_lb_algorithm: str = typer.Option(
        "random",
        "--bpf-lb-algorithm",
        help="How services pick a backend unless their service.cilium.io/lb-algorithm "
        "annotation says: random or maglev (consistent hashing).",
    ),
    bpf_lb_maglev_table_size: str = typer.Option(
        "16381",
        "--bpf-lb-maglev-table-size",
        help="Entries of each Maglev service's table: a prime (Cilium's default 16381); "
        "more entries spread weights more evenly.",
    ),
    devices: str = typer.Option(
        "",
        "--devices",
        help="The node's external devices (names or patterns such as eth*, comma-separated) "
        "where NodePort and externalIP traffic from outside the node is translated per "
        "packet (Cilium's --devices); served as they appear. Default: none.",
    ),
    bpf_lb_mode: str = typer.Option(
        "snat",
        "--bpf-lb-mode",
        help="NodePort traffic to a backend on another host: snat (the node's address as "
        "the source, replies come back through the node) or dsr (IPv4-in-IPv4 to the "
        "backend's host, which answers the client directly).",
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Run the agent in the foreground (structured logs on stderr). SIGTERM stops it and
    leaves the datapath enforcing; a restarted agent adopts what it finds, and a new build
    swaps its programs in without dropping connections (node maps migrated if needed)."""
    from membrane.agent.logs import setup_logging
    from membrane.agent.server import run_agent
    from membrane.choices import check_choice
    from membrane.security.settings import make_security_settings

    check_choice(log_level, ("debug", "info", "warning", "error"), "--log-level")
    config = make_config(
        state_dir,
        api_socket,
        node_netns,
        pod_cidr,
        node_ip,
        netns_prefix,
        allow_localhost,
        attach,
        policy_map_max,
        ipv6=ipv6,
        pod_cidr_v6=pod_cidr_v6,
        node_ipv6=node_ipv6,
        monitor_aggregation=monitor_aggregation,
        kube_apiserver_ips=kube_apiserver_ip,
        cidr_match_mode=policy_cidr_match_mode,
        hubble_socket=hubble_socket,
        hubble_listen_address=hubble_listen_address,
        hubble_buffer_size=hubble_buffer_size,
        flow_log=flow_log,
        flow_log_max_size_mb=flow_log_max_size_mb,
        flow_log_max_backups=flow_log_max_backups,
        flow_log_allowlist=flow_log_allowlist,
        flow_log_denylist=flow_log_denylist,
        prometheus_serve_addr=prometheus_serve_addr,
        hubble_metrics_server=hubble_metrics_server,
        kernel_drops=kernel_drops,
        service_cidr=service_cidr,
        service_cidr_v6=service_cidr_v6,
        lb_algorithm=bpf_lb_algorithm,
        maglev_table_size=bpf_lb_maglev_table_size,
        cgroup_root=cgroup_root,
        devices=devices,
        bpf_lb_mode=bpf_lb_mode,
    )
    security = make_security_settings(
        runtime_security,
        process_cache_size,
        security_event_buffer_size,
        security_export_file,
        security_export_max_size_mb,
        security_export_max_backups,
        security_export_allowlist,
        security_export_denylist,
        security_redaction_filters,
    )
    config = dataclasses.replace(config, security=security)
    setup_logging(log_level)
    run_agent(config)


@app.command("reset")
def reset(
    state_dir: str = typer.Option(DEFAULT_STATE_DIR, "--state-dir"),
    node_netns: str = typer.Option(None, "--node-netns"),
    pod_cidr: str = typer.Option(DEFAULT_POD_CIDR, "--pod-cidr"),
    node_ip: str = typer.Option(DEFAULT_NODE_IP, "--node-ip"),
    yes: bool = typer.Option(False, "--yes", help="Really remove everything."),
) -> None:
    """Remove every pod, the pinned datapath and the state of a stopped agent (and its node
    namespace). Enforcement ends: this is the way to uninstall."""
    from membrane.agent.reset import reset_node
    from membrane.errors import UserError

    if not yes:
        raise UserError("--yes", "reset removes every pod and the datapath; add --yes")
    config = make_config(state_dir, DEFAULT_SOCKET, node_netns, pod_cidr, node_ip)
    removed = reset_node(config)
    typer.echo(f"removed {removed['endpoints']} endpoints, the datapath and the state")


@app.command("status")
def status(output: str = OUTPUT, api_socket: str = API_SOCKET) -> None:
    """The running agent: node, endpoints, policies, and whether the node passes its pods'
    policy (--allow-localhost)."""
    from membrane.api.client import ApiClient
    from membrane.choices import check_choice
    from membrane.cli.output import print_json

    check_choice(output, ("table", "json"), "--output")
    health = ApiClient.connect(api_socket).get("/v1/healthz")
    if output == "json":
        print_json(health)
        return
    for key, value in health.items():
        typer.echo(f"{key.replace('_', '-') + ':':<17}{value}")
