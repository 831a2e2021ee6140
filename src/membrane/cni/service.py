"""The agent's side of the CNI plugin: `POST /v1/cni/{add,del,check}` with the plugin's
CNI_* environment as query parameters and the network configuration as the body, answered
with the CNI spec's own JSON (a result, or an error with its code: HTTP 400), which the
plugin prints as it is.

An endpoint made here is an ordinary endpoint (`membrane endpoint list` shows it, identities
and policies apply) whose namespace is the runtime's: the agent plumbs a veth into it and
never deletes it. Naming and labels:
- namespace: `K8S_POD_NAMESPACE` from CNI_ARGS when the runtime passes it (CRI runtimes do),
  else `default` (podman passes none);
- name: the podman pod's name, else podman's container name, else `K8S_POD_NAME`, made a
  valid Kubernetes name (`_` becomes `-`), else `c-<first 12 of the container id>`; a
  name another endpoint has gets `-<first 12 of the container id>` appended;
- labels: the podman pod's labels (Pod YAML metadata.labels with `podman kube play`), else
  the container's (`podman run --label`), read from podman's database (membrane.cni.podman).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Coroutine, Mapping
from ipaddress import IPv4Address, IPv6Address, ip_interface
from typing import TYPE_CHECKING, Any

from membrane.api.models import EndpointCreate
from membrane.cni import podman
from membrane.datapath.endpoint_prog import is_attached
from membrane.endpoint.plumbing import POD_IFNAME, inspect_pod, pod_problem
from membrane.errors import UserError
from membrane.policy import validate

if TYPE_CHECKING:
    from membrane.agent.agent import Agent
    from membrane.agent.server import AgentServer
    from membrane.agent.state import EndpointRecord

log = logging.getLogger("membrane.agent")

CNI_VERSIONS = ("1.0.0",)
DEFAULT_NAMESPACE = "default"
# The spec's codes, and ours (100 and up are the plugin's own).
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNKNOWN_CONTAINER = 3
ERR_DECODING_FAILURE = 6
ERR_INVALID_ENVIRONMENT = 4
ERR_TRY_AGAIN_LATER = 11
ERR_REFUSED = 100  # the agent refused the endpoint (field: problem)
ERR_AGENT_FAILED = 101  # the agent failed to carry it out
ERR_CHECK_FAILED = 102  # CHECK: a piece of the endpoint is missing or differs
_INVALID_NAME_CHARS = re.compile(r"[^a-z0-9.-]+")


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details

    def answer(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


async def answer(
    server: AgentServer, command: str, env: Mapping[str, str], raw_config: bytes
) -> tuple[int, dict[str, Any]]:
    """The CNI answer to one plugin call, with its HTTP status (200: a result, 400: an
    error). `env` holds the call's CNI_* values (container_id, netns, ifname, args),
    `raw_config` the network configuration as the runtime wrote it. Everything runs on the
    agent's worker thread (it enters namespaces), changes as every change does."""
    agent = server.agent
    version = CNI_VERSIONS[-1]
    try:
        try:
            config = json.loads(raw_config)
        except (ValueError, UnicodeDecodeError) as err:
            problem = "cannot decode the network configuration"
            raise CniError(ERR_DECODING_FAILURE, problem, str(err)) from None
        if not isinstance(config, dict):
            raise CniError(ERR_DECODING_FAILURE, "the network configuration is no JSON object")
        version = str(config.get("cniVersion", version))
        if version not in CNI_VERSIONS:
            raise CniError(
                ERR_INCOMPATIBLE_VERSION,
                f"cniVersion {version} is not supported",
                f"supported: {', '.join(CNI_VERSIONS)}",
            )
        call = _Call.of(env, config)
        if command == "add":
            ep = await server.run_change(_add, agent, call)
            return 200, await server.run_sync(_result, agent, ep, call, version)
        if command == "del":
            await server.run_change(_delete, agent, call)
            # The runtime has its answer once the container is out of force; its programs,
            # veth and address go right after, on the worker, before any later change.
            _in_background(server.run_sync(agent.finish_removals))
            return 200, {"cniVersion": version}
        if command == "check":
            await server.run_sync(_check, agent, call)
            return 200, {"cniVersion": version}
        raise CniError(ERR_INVALID_ENVIRONMENT, f"CNI_COMMAND {command.upper()} is not supported")
    except CniError as err:
        return 400, err.answer(version)
    except UserError as err:
        return 400, CniError(ERR_REFUSED, "membrane refused the endpoint", str(err)).answer(version)
    except Exception as err:
        log.exception("CNI call failed", extra={"fields": {"command": command}})
        failed = CniError(ERR_AGENT_FAILED, "membrane agent failed", f"{type(err).__name__}: {err}")
        return 400, failed.answer(version)


class _Call:
    """One plugin call: the CNI_* environment and the network configuration."""

    def __init__(
        self, container_id: str, netns: str, ifname: str, args: dict[str, str], config: dict
    ) -> None:
        self.container_id, self.netns, self.ifname = container_id, netns, ifname
        self.args, self.config = args, config

    @classmethod
    def of(cls, env: Mapping[str, str], config: dict[str, Any]) -> _Call:
        container_id = env.get("container_id", "")
        if not container_id:
            raise CniError(ERR_INVALID_ENVIRONMENT, "CNI_CONTAINERID is empty")
        ifname = env.get("ifname", "")
        if ifname != POD_IFNAME:
            raise CniError(
                ERR_INVALID_ENVIRONMENT,
                f"CNI_IFNAME {ifname!r} is not supported",
                f"membrane names the container's interface {POD_IFNAME}",
            )
        netns = env.get("netns", "")
        return cls(container_id, netns, ifname, parse_args(env.get("args")), config)


def parse_args(raw: Any) -> dict[str, str]:
    """CNI_ARGS: `K=V;K=V`."""
    out = {}
    for item in str(raw or "").split(";"):
        key, sep, value = item.partition("=")
        if sep and key:
            out[key.strip()] = value.strip()
    return out


def _by_container(agent: Agent, container_id: str) -> EndpointRecord | None:
    return next(
        (ep for ep in agent.snapshot.endpoints.values() if ep.container_id == container_id),
        None,
    )


def _add(agent: Agent, call: _Call) -> EndpointRecord:
    existing = _by_container(agent, call.container_id)
    if existing is not None:  # a repeated ADD: the endpoint as it is
        return existing
    if not call.netns.startswith("/"):
        raise CniError(ERR_INVALID_ENVIRONMENT, f"CNI_NETNS {call.netns!r} is not a path")
    namespace = call.args.get("K8S_POD_NAMESPACE") or DEFAULT_NAMESPACE
    found = podman.lookup(
        str(call.config.get("podmanGraphRoot") or podman.DEFAULT_GRAPH_ROOT), call.container_id
    )
    if found is None:
        log.info(
            "container not in podman's database: no labels",
            extra={"fields": {"container": call.container_id}},
        )
    name = endpoint_name(found.name if found else call.args.get("K8S_POD_NAME"), call.container_id)
    if agent.snapshot.endpoint(namespace, name) is not None:  # e.g. a_b beside a-b
        name = f"{name[:240]}-{call.container_id[:12].lower()}"
    req = EndpointCreate(
        namespace=namespace,
        name=name,
        labels=_usable_labels(found.labels if found else {}, call.container_id),
        netns=call.netns,
        container_id=call.container_id,
        container_name=found.container_name if found else None,
    )
    return agent.add_endpoint(req)


def endpoint_name(runtime_name: str | None, container_id: str) -> str:
    """The runtime's name as a Kubernetes object name, or one from the container id."""
    if runtime_name:
        name = _INVALID_NAME_CHARS.sub("-", runtime_name.lower()).strip("-.")[:253]
        try:
            return validate.check_name(name)
        except ValueError:
            pass
    return f"c-{container_id[:12].lower()}"


def _usable_labels(labels: dict[str, str], container_id: str) -> dict[str, str]:
    """Labels a Kubernetes object could carry; others (podman allows any text) are left
    out, and logged."""
    usable = {}
    for key, value in labels.items():
        try:
            validate.check_k8s_label_key(key)
            validate.check_label_value(value)
        except ValueError as err:
            log.warning(
                "container label left out",
                extra={"fields": {"container": container_id, "label": key, "problem": str(err)}},
            )
            continue
        usable[key] = value
    return usable


def _delete(agent: Agent, call: _Call) -> None:
    ep = _by_container(agent, call.container_id)
    if ep is not None:  # unknown: deleted already (DEL is idempotent)
        agent.delete_endpoint(ep.namespace, ep.name, finish_later=True)


_background: set[asyncio.Task[Any]] = set()  # the loop keeps only weak references


def _in_background(work: Coroutine[Any, Any, Any]) -> None:
    task = asyncio.ensure_future(work)
    _background.add(task)
    task.add_done_callback(_background.discard)


def _check(agent: Agent, call: _Call) -> None:
    ep = _by_container(agent, call.container_id)
    if ep is None:
        raise CniError(ERR_UNKNOWN_CONTAINER, f"membrane has no endpoint for {call.container_id}")
    ipv6 = _routable_ipv6(agent, ep)
    problem = pod_problem(agent.node, ep.netns, ep.host_ifname, IPv4Address(ep.ipv4), ipv6)
    if problem is None and not is_attached(agent.config.bpf_dir, ep.id):
        problem = f"the datapath programs of endpoint {ep.id} are not attached"
    if problem is None:
        problem = _differs_from_prev_result(ep, ipv6, call.config.get("prevResult"))
    if problem is not None:
        raise CniError(ERR_CHECK_FAILED, f"endpoint {ep.key} is broken", problem)


def _differs_from_prev_result(
    ep: EndpointRecord, ipv6: IPv6Address | None, prev: Any
) -> str | None:
    if not isinstance(prev, dict):
        return None
    told = {str(ip_interface(ip["address"]).ip) for ip in prev.get("ips", []) if "address" in ip}
    have = {ep.ipv4} | ({str(ipv6)} if ipv6 else set())
    if told != have:
        return f"prevResult has addresses {sorted(told)}, the endpoint {sorted(have)}"
    return None


def _routable_ipv6(agent: Agent, ep: EndpointRecord) -> IPv6Address | None:
    return IPv6Address(ep.ipv6) if ep.ipv6 and agent.node.node_ip6 is not None else None


def _result(agent: Agent, ep: EndpointRecord, call: _Call, version: str) -> dict[str, Any]:
    """The spec's ADD result: the host veth and the container's interface, its addresses
    (each on the container interface, index 1) and default routes via the node IPs."""
    ipv6 = _routable_ipv6(agent, ep)
    # The veth the add just made (and checked as it made it), else a look at it.
    link = agent.endpoints.made_link(ep) or inspect_pod(
        agent.node, ep.netns, ep.host_ifname, IPv4Address(ep.ipv4), ipv6
    )
    if link is None:
        raise CniError(ERR_AGENT_FAILED, f"endpoint {ep.key} is not intact after the add")
    node = agent.node
    ips = [{"address": f"{ep.ipv4}/32", "gateway": str(node.node_ip), "interface": 1}]
    routes = [{"dst": "0.0.0.0/0", "gw": str(node.node_ip)}]
    if ipv6 is not None and node.node_ip6 is not None:
        ips.append({"address": f"{ipv6}/128", "gateway": str(node.node_ip6), "interface": 1})
        routes.append({"dst": "::/0", "gw": str(node.node_ip6)})
    dns = call.config.get("dns")
    return {
        "cniVersion": version,
        "interfaces": [
            {"name": link.host_ifname, "mac": link.host_mac},
            {"name": call.ifname, "mac": link.pod_mac, "sandbox": ep.netns},
        ],
        "ips": ips,
        "routes": routes,
        "dns": dns if isinstance(dns, dict) else {},
    }
