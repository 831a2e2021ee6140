"""The subcommands of `membrane`, in the order `membrane --help` lists them: each one's name,
the module that defines it (an `app`, a typer.Typer) and its help text.

The one place a subcommand is added and its help is written: the root lists these without
importing any module, and a module is imported only when its subcommand runs (see lazy.py).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import typer


class Subcommand(NamedTuple):
    name: str
    module: str
    help: str


SUBCOMMANDS = (
    Subcommand(
        "observe",
        "membrane.cli.observe",
        "Flows the endpoints' datapath saw: each new connection's policy verdict and every "
        "drop, with both sides' pods and identities and the rule that decided.",
    ),
    Subcommand(
        "probe",
        "membrane.cli.probe",
        "Load and attach a tiny program for each hook, map type and helper Membrane uses, "
        "and report which ones this kernel allows (and why not, when it refuses).",
    ),
    Subcommand(
        "agent", "membrane.cli.agent", "The node agent: endpoints, identities, policy, flows."
    ),
    Subcommand(
        "endpoint", "membrane.cli.endpoint", "Endpoints (pods): network namespaces with labels."
    ),
    Subcommand("namespace", "membrane.cli.namespace", "Namespaces and their labels."),
    Subcommand(
        "cni",
        "membrane.cli.cni",
        "The CNI plugin for container runtimes: install or remove the network config and the "
        "membrane-cni executable; containers then become endpoints with their labels.",
    ),
    Subcommand("policy", "membrane.cli.policy", "Network policies: import, list, delete, explain."),
    Subcommand(
        "service",
        "membrane.cli.service",
        "Kubernetes services (ClusterIP, NodePort, externalIPs) balanced at the socket: import "
        "Service and EndpointSlice YAML, add, list, get, delete.",
    ),
    Subcommand(
        "filter",
        "membrane.cli.filter",
        "Packet filters in XDP and tc: drop by destination, drop by protocol, allow only a "
        "given flow to a port. Filters stay in force after the command exits.",
    ),
    Subcommand(
        "lb",
        "membrane.cli.lb",
        "A standalone XDP L4 load balancer (Katran class): VIPs, Maglev consistent hashing, "
        "IP-in-IP to backends that answer clients directly (DSR), per-backend counters.",
    ),
    Subcommand(
        "security",
        "membrane.cli.security",
        "Runtime security (Tetragon class): every exec and exit with its ancestry and pod, "
        "and tracing policies whose selectors run and whose actions (Sigkill, Signal, "
        "refusing connect) happen in the kernel; events in Tetragon's schema.",
    ),
    Subcommand(
        "trace",
        "membrane.cli.trace",
        "Tracing tools (bcc/bpftrace-class) on stable kernel hooks: tracepoints, raw "
        "tracepoints, uprobes and perf events. Filters run in the kernel; Ctrl-C stops with a "
        "summary; lost events are always reported.",
    ),
)
BY_NAME = {sub.name: sub for sub in SUBCOMMANDS}


def help_of(name: str) -> str:
    return BY_NAME[name].help


def typer_app(name: str, **settings: Any) -> typer.Typer:
    """The typer app of subcommand `name`, with its help text from here. (Shell completion
    is the root's business, and the root has it off.)"""
    return typer.Typer(name=name, help=help_of(name), add_completion=False, **settings)
