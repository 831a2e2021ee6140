"""`membrane agent reset`: remove everything an agent made on its node, with the agent
stopped: every pod namespace and veth it recorded (of a container runtime's pod, only the
veth: the namespace is the runtime's), its pinned datapath (links and maps),
its state, and the node namespace when it lives in one. The opposite of adoption."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from ipaddress import IPv4Address

from membrane import netns
from membrane.agent.config import AgentConfig
from membrane.agent.endpoints import WARM_PEER
from membrane.agent.state import StateFile
from membrane.datapath.endpoint_prog import detach_all_endpoints, detach_endpoint
from membrane.endpoint.node import NodeInfo, delete_node_link, delete_node_links_named
from membrane.endpoint.plumbing import delete_pod
from membrane.errors import UserError
from membrane.security.policy.manager import forget_tracing_policies
from membrane.service.manager import ServiceStore


def reset_node(config: AgentConfig) -> dict[str, int]:
    lock_path = config.state_dir / "agent.lock"
    lock = None
    if lock_path.exists():
        lock = os.open(lock_path, os.O_RDWR)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise UserError(
                "state-dir", "an agent is running with this state; stop it first"
            ) from None
    try:
        state = StateFile(config.state_dir).load()
        node = NodeInfo(config.node_netns, IPv4Address(config.node_ip))
        node_there = config.node_netns is None or netns.exists(config.node_netns)
        pods = 0
        for ep in state.endpoints.values():
            detach_endpoint(config.bpf_dir, ep.id)
            if ep.container_id is not None:  # a runtime's namespace (CNI): only our veth
                if node_there:
                    delete_node_link(node, ep.host_ifname)
            elif node_there:
                delete_pod(node, ep.netns, ep.host_ifname)
            elif netns.exists(ep.netns):
                netns.delete(ep.netns)
            pods += 1
        detach_all_endpoints(config.bpf_dir)  # links of endpoints the state never recorded
        if node_there:
            delete_node_links_named(node, WARM_PEER)  # a veth pair made ahead, not yet used
        shutil.rmtree(config.bpf_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # the agents' directory and our root, if empty
            os.removedirs(os.path.dirname(config.bpf_dir))
        if config.node_netns and netns.exists(config.node_netns):
            netns.delete(config.node_netns)
        StateFile(config.state_dir).remove()
        ServiceStore(config.state_dir).remove()
        forget_tracing_policies(config.state_dir)  # their pins went with bpf_dir
        return {"endpoints": pods}
    finally:
        if lock is not None:
            os.close(lock)
