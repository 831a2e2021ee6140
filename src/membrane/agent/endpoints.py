"""Endpoint lifecycle: numbering, addresses, plumbing (namespace, veth, routes) and the
attachment of the endpoint's programs; adoption of recorded endpoints after a restart.

Policy and identities are not this module's: after a lifecycle step the agent reconciles
the datapath (membrane.agent.reconcile).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address

from membrane import netns
from membrane.agent.config import AgentConfig
from membrane.agent.state import AgentState, EndpointRecord, PortSpec
from membrane.api.models import EndpointCreate
from membrane.bpf import BpfObject
from membrane.datapath.endpoint_prog import (
    ATTACH_TCX,
    HeldAttachment,
    attach_ahead,
    attach_endpoint,
    attach_loaded,
    attach_mode,
    build_tags,
    detach_endpoint,
    is_attached,
    load_endpoint,
    pinned_endpoint_ids,
    runs_build,
)
from membrane.datapath.service_nat import service_nat_config
from membrane.datapath.upgrade import pinned_map_ids
from membrane.endpoint.ipam import Ipam
from membrane.endpoint.node import NodeInfo, delete_node_link, delete_node_links_named
from membrane.endpoint.plumbing import (
    PodLink,
    WarmPair,
    create_pod,
    delete_pod,
    inspect_pod,
    make_warm_pair,
)
from membrane.errors import UserError

log = logging.getLogger("membrane.agent")

MAX_ENDPOINT_ID = 0xFFFF
MAX_NETNS_NAME = 200

# What an endpoint's programs are specialised for at load time: id, IPv4, IPv6.
ProgramKey = tuple[int, IPv4Address, IPv6Address | None]
# The pod end of a warm veth pair (made ahead, see preload_next) until an add moves it
# into its pod as eth0. Only this agent makes such names in its node namespace.
WARM_PEER = re.compile(r"mbrw[0-9]+")


def host_ifname(ep_id: int) -> str:
    return f"mbr{ep_id}"


def warm_peer_ifname(ep_id: int) -> str:
    return f"mbrw{ep_id}"


@dataclass
class WarmVeth:
    """The next endpoint's veth pair with its programs attached to the host end."""

    pair: WarmPair
    held: HeldAttachment


@dataclass
class Ahead:
    """What the agent prepared for the next add, on its loader thread, in this order: the
    programs loaded for `key`, then (None if that failed) its veth pair with them
    attached."""

    key: ProgramKey
    programs: Future[BpfObject]
    warm: Future[WarmVeth | None]


def require_attach_mode(mode: str) -> None:
    """Refuse --attach=tcx on a kernel without tcx before anything is changed."""
    from membrane.bpf.probe import supports

    if mode == ATTACH_TCX and not supports("tcx"):
        raise UserError(
            "attach", "this kernel has no tcx (Linux 6.6 or later): use --attach=auto or clsact"
        )


class EndpointLifecycle:
    """Creates, adopts and removes endpoints; owns `state.endpoints` and the ids."""

    def __init__(self, config: AgentConfig, state: AgentState, node: NodeInfo) -> None:
        self.config = config
        self.state = state
        self.node = node
        self.ipam = Ipam(config.pod_cidr, set())
        self.ipam.restore({IPv4Address(ep.ipv4): ep.key for ep in state.endpoints.values()})
        self.ipam6 = None if config.pod_cidr_v6 is None else Ipam(config.pod_cidr_v6)
        if self.ipam6 is not None:
            # Endpoints of another plan (made IPv4-only, or with another IPv6 CIDR) keep
            # what they have; only addresses of this CIDR are this run's to hand out.
            self.ipam6.restore(
                {
                    addr: ep.key
                    for ep in state.endpoints.values()
                    if (addr := _ipv6_of(ep)) is not None and addr in config.pod_cidr_v6
                }
            )
        self._build: tuple[dict[str, str], set[int]] | None = None  # tags, node map ids
        # The next endpoint's programs, loaded ahead (see preload_next).
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="endpoint-loader")
        self._ahead: Ahead | None = None
        # The veth each add just made, for its caller's answer (a CNI result) without a
        # second netlink look at it; dropped when taken or when the endpoint is forgotten.
        self._made: dict[int, PodLink] = {}
        # The per-packet ClusterIP translation's CIDRs: load-time constants of every
        # endpoint's programs (the same for all, so they are not part of a ProgramKey).
        self._service_nat = service_nat_config(
            c for c in (config.service_cidr, config.service_cidr_v6) if c is not None
        )

    # ---- programs loaded and attached ahead ---------------------------------------------
    def preload_next(self) -> None:
        """Prepare the endpoint the next add makes, in the background: its id and addresses
        are handed out in order, so they are known now. The verifier checks its programs,
        then its veth pair is made in the node namespace (both ends down, the pod's under a
        temporary name) and the programs are attached to the host end (tcx attaches wait
        for the kernel's RCU under RTNL, ~15 ms each), so the add (a container's start)
        only moves the pod end into the pod's namespace and sets addresses and routes.
        Called when the agent is idle after a change, not during one. A prediction that no
        longer holds at the add is thrown away (the veth deleted) and the add makes its
        own, so programs only ever run on the device they were loaded for."""
        key = self._next_key()
        if self._ahead is not None and self._ahead.key == key:
            return
        self._drop_ahead()
        if key is not None:
            programs = self._loader.submit(self._load, key)
            warm = self._loader.submit(self._warm_up, key, programs)
            self._ahead = Ahead(key, programs, warm)

    def close(self) -> None:
        """Drop what was prepared ahead: the warm veth pair is deleted (nothing recorded
        is touched)."""
        self._drop_ahead()
        self._loader.shutdown(wait=True)

    def sweep_warm_pairs(self) -> list[str]:
        """Delete warm veth pairs an agent killed before it used or deleted them left in
        the node namespace (their tcx links died with its process; clsact filters go with
        the device). Names matching WARM_PEER are only ever such pairs."""
        return delete_node_links_named(self.node, WARM_PEER)

    def _next_key(self) -> ProgramKey | None:
        try:
            ep_id = self._free_id()
        except UserError:
            return None
        ip = self.ipam.peek()
        ip6 = None if self.ipam6 is None else self.ipam6.peek()
        if ip is None or (self.ipam6 is not None and ip6 is None):
            return None
        return ep_id, IPv4Address(ip), None if ip6 is None else IPv6Address(ip6)

    def _load(self, key: ProgramKey) -> BpfObject:
        return load_endpoint(self.config.bpf_dir, *key, **self._service_nat)

    def _warm_up(self, key: ProgramKey, programs: Future[BpfObject]) -> WarmVeth | None:
        """On the loader thread, after `programs` loaded: the veth pair for `key` with them
        attached, or None (logged) when that fails and the add should make its own."""
        if programs.exception() is not None:
            return None
        ep_id, _, ip6 = key
        pair = None
        try:
            pair = make_warm_pair(
                self.node, host_ifname(ep_id), warm_peer_ifname(ep_id), ipv6=ip6 is not None
            )
            held = attach_ahead(
                programs.result(), pair.host_ifindex, self.config.node_netns, self.config.attach
            )
        except Exception as err:
            if pair is not None:
                delete_node_link(self.node, pair.host_ifname)
            log.warning("no veth made ahead", extra={"fields": {"id": ep_id, "problem": str(err)}})
            return None
        return WarmVeth(pair, held)

    def _take_ahead(self, key: ProgramKey) -> tuple[Future[BpfObject], Future[WarmVeth | None]]:
        """The programs for `key` and its warm veth (a future of None: there is none):
        those prepared ahead when they are for it (and loaded without error), else a load
        started now. What was prepared for another key is thrown away first when its veth
        has the name this add needs."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            if ahead.key == key and not (ahead.programs.done() and ahead.programs.exception()):
                return ahead.programs, ahead.warm
            discarded = self._loader.submit(self._discard, ahead)
            if ahead.key[0] == key[0]:
                discarded.result()
        none: Future[WarmVeth | None] = Future()
        none.set_result(None)
        return self._loader.submit(self._load, key), none

    def _drop_ahead(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            self._loader.submit(self._discard, ahead)

    def _discard(self, ahead: Ahead) -> None:
        """On the loader thread (after the work for `ahead`, which it queued first):
        delete its veth (the kernel detaches the programs with it), close its programs."""
        try:
            warm = ahead.warm.result()
            if warm is not None:
                pair = warm.pair
                delete_node_link(self.node, pair.host_ifname, pair.host_ifindex)
                warm.held.close()
            if ahead.programs.exception() is None:
                ahead.programs.result().close()
        except Exception:
            log.exception("dropping what was prepared ahead failed")

    # ---- after a restart -----------------------------------------------------------------
    def adopt_all(self) -> int:
        """Keep every recorded endpoint; returns how many were whole. A container whose
        runtime removed its namespace while the agent was down (its DEL could not reach us)
        is forgotten: its veth went with the namespace, its programs are then unknown ids."""
        whole = 0
        for ep in list(self.state.endpoints.values()):
            if ep.container_id is not None and not netns.exists(ep.netns):
                log.info("container gone; forgetting it", extra={"fields": {"endpoint": ep.key}})
                self.forget(ep)
                self.unplumb(ep)
            elif self._adopt(ep):
                whole += 1
        return whole

    def _runs_this_build(self, ep: EndpointRecord) -> bool:
        if self._build is None:  # the same for every endpoint: found out once
            self._build = (
                build_tags(self.config.bpf_dir),
                set(pinned_map_ids(self.config.bpf_dir).values()),
            )
        return runs_build(self.config.bpf_dir, ep.id, *self._build)

    def _adopt(self, ep: EndpointRecord) -> bool:
        """Re-create what is missing, never disturb what works. Programs attached in
        another mode than the one asked for are replaced (the new attachment first), and
        so are programs of another build (an upgrade) or that use node maps a migration
        replaced: the new program is swapped in place."""
        if inspect_pod(self.node, ep.netns, ep.host_ifname, IPv4Address(ep.ipv4), _ipv6_of(ep)):
            mode = attach_mode(self.config.bpf_dir, ep.id)
            wanted = self.config.attach in ("auto", mode)
            if not (wanted and is_attached(self.config.bpf_dir, ep.id)):
                self._attach(ep)
            elif not self._runs_this_build(ep):
                log.info("endpoint datapath upgraded", extra={"fields": {"endpoint": ep.key}})
                self._attach(ep)  # swapped in place: the new program replaces the old
            elif ep.attach_mode != mode:  # recorded by an agent that did not note it
                self.state.endpoints[ep.id] = replace(ep, attach_mode=mode or ATTACH_TCX)
            return True
        log.warning("endpoint was broken; re-plumbing it", extra={"fields": {"endpoint": ep.key}})
        # The pod's namespace stays (its processes are the workload); the veth is rebuilt.
        delete_node_link(self.node, ep.host_ifname)
        link = create_pod(
            self.node,
            ep.netns,
            ep.host_ifname,
            IPv4Address(ep.ipv4),
            self._routable(_ipv6_of(ep)),
            reuse_netns=True,
        )
        self._attach(ep, link.host_ifindex)
        return False

    def unknown_ids(self) -> list[int]:
        """Endpoint ids with pinned programs that the state does not know (leftovers of an
        agent that died mid-delete)."""
        return [
            i for i in pinned_endpoint_ids(self.config.bpf_dir) if i not in self.state.endpoints
        ]

    def detach(self, ep_id: int) -> None:
        detach_endpoint(self.config.bpf_dir, ep_id)

    # ---- add and delete ------------------------------------------------------------------
    def create(self, req: EndpointCreate, save: Callable[[], None]) -> EndpointRecord:
        """A new endpoint, recorded (and saved) first, then plumbed and attached: an agent
        killed halfway leaves an endpoint its restart completes, never a pod nobody knows.
        Its programs drop everything until the datapath has its state."""
        key = f"{req.namespace}/{req.name}"
        if any(
            e.namespace == req.namespace and e.name == req.name
            for e in self.state.endpoints.values()
        ):
            raise UserError("endpoint", f"{key} already exists")
        # A runtime's namespace (CNI) is plumbed as it is; otherwise the agent makes one.
        netns_name = req.netns or self.config.pod_netns(req.namespace, req.name)
        if req.netns is not None and not netns.exists(req.netns):
            raise UserError("netns", f"{req.netns} does not exist")
        if req.netns is None and len(netns_name) > MAX_NETNS_NAME:
            raise UserError("name", f"{key} is too long for a namespace")
        ep_id = self._free_id()
        ip = self.ipam.allocate(key)
        try:
            ip6 = None if self.ipam6 is None else self.ipam6.allocate(key)
        except BaseException:
            self.ipam.release(ip)
            raise
        ep = EndpointRecord(
            id=ep_id,
            namespace=req.namespace,
            name=req.name,
            netns=netns_name,
            host_ifname=host_ifname(ep_id),
            ipv4=str(ip),
            ipv6=None if ip6 is None else str(ip6),
            labels=dict(req.labels),
            ports=tuple(PortSpec(p.name, p.port, p.protocol) for p in req.ports),
            created=time.time(),
            container_id=req.container_id,
            container_name=req.container_name,
        )
        self.state.endpoints[ep_id] = ep
        self.state.next_endpoint_id = ep_id % MAX_ENDPOINT_ID + 1
        save()
        try:
            # Programs loaded ahead, or else the verifier checks them (in the kernel,
            # ~20 ms) while the veth is being made; with them, usually, the veth made
            # ahead with them attached.
            loading, warming = self._take_ahead((ep_id, IPv4Address(ip), _ipv6(ip6)))
            warm = warming.result()
            if warm is not None:
                with loading.result():
                    ep, link = self._plug_warm(ep, warm, reuse_netns=req.netns is not None)
            else:
                try:
                    link = create_pod(
                        self.node,
                        netns_name,
                        ep.host_ifname,
                        ip,
                        ip6,
                        reuse_netns=req.netns is not None,
                    )
                except BaseException:
                    _close_when_loaded(loading)
                    raise
                with loading.result() as obj:
                    ep = self._attach(ep, link.host_ifindex, obj)
            self._made[ep_id] = link
        except BaseException:
            del self.state.endpoints[ep_id]
            self._made.pop(ep_id, None)
            # Undo every step even if one of the undos fails: a leftover veth would make
            # every later add with this id fail.
            for undo in (
                lambda: detach_endpoint(self.config.bpf_dir, ep_id),
                lambda: self._unplumb_links(ep),
                lambda: self.ipam.release(ip),
                lambda: self._release6(ip6),
            ):
                try:
                    undo()
                except Exception:
                    log.exception("cleanup after a failed endpoint add failed")
            save()
            raise
        return ep

    def _plug_warm(
        self, ep: EndpointRecord, warm: WarmVeth, reuse_netns: bool
    ) -> tuple[EndpointRecord, PodLink]:
        """Plumb `ep` with the veth made ahead for it and record its programs, attached
        there already. On failure the veth is gone (and with it the programs)."""
        try:
            link = create_pod(
                self.node,
                ep.netns,
                ep.host_ifname,
                IPv4Address(ep.ipv4),
                _ipv6_of(ep),
                reuse_netns=reuse_netns,
                warm=warm.pair,
            )
            mode = warm.held.record(self.config.bpf_dir, ep.id)
        finally:
            warm.held.close()  # recorded (pinned) by now, or to end with the veth
        return self._attached(ep, mode, ahead=True), link

    def forget(self, ep: EndpointRecord) -> None:
        """Drop the record (its address leaves the ipcache at the next reconcile)."""
        del self.state.endpoints[ep.id]
        self._made.pop(ep.id, None)

    def made_link(self, ep: EndpointRecord) -> PodLink | None:
        """The veth `create` made for `ep` (once: taken by the first caller), if `ep` is
        still the endpoint it was made for."""
        link = self._made.pop(ep.id, None)
        if link is None or self.state.endpoints.get(ep.id) is None:
            return None
        return link if link.host_ifname == ep.host_ifname and link.netns == ep.netns else None

    def unplumb(self, ep: EndpointRecord) -> None:
        """Remove a forgotten endpoint's veth, namespace and address (after `detach`)."""
        self._unplumb_links(ep)
        self.ipam.release(IPv4Address(ep.ipv4))
        self._release6(_ipv6_of(ep))

    def _unplumb_links(self, ep: EndpointRecord) -> None:
        """The veth (and the namespace, unless a container runtime owns it)."""
        if ep.container_id is None:
            delete_pod(self.node, ep.netns, ep.host_ifname)
        else:
            delete_node_link(self.node, ep.host_ifname)

    def _release6(self, addr: IPv6Address | None) -> None:
        if addr is not None and self.ipam6 is not None:
            self.ipam6.release(addr)

    def _routable(self, addr: IPv6Address | None) -> IPv6Address | None:
        """`addr`, if this node routes IPv6 (a record of a dual-stack run adopted by an
        IPv4-only one keeps its address on record, but the pod gets none)."""
        return addr if self.node.node_ip6 is not None else None

    def _free_id(self) -> int:
        candidate = self.state.next_endpoint_id
        for _ in range(MAX_ENDPOINT_ID):
            if candidate not in self.state.endpoints:
                return candidate
            candidate = candidate % MAX_ENDPOINT_ID + 1
        raise UserError("endpoint", f"this node has the maximum of {MAX_ENDPOINT_ID} endpoints")

    def _attach(
        self, ep: EndpointRecord, ifindex: int | None = None, loaded: BpfObject | None = None
    ) -> EndpointRecord:
        """Attach (or swap in) the endpoint's programs (`loaded` for it already, or loaded
        now); records and logs the mode."""
        if ifindex is None:
            info = inspect_pod(self.node, ep.netns, ep.host_ifname, IPv4Address(ep.ipv4))
            if info is None:
                raise RuntimeError(f"endpoint {ep.key} has no veth to attach to")
            ifindex = info.host_ifindex
        where = (self.config.bpf_dir, ep.id)
        node_netns, attach = self.config.node_netns, self.config.attach
        if loaded is None:
            mode = attach_endpoint(
                *where,
                IPv4Address(ep.ipv4),
                ifindex,
                node_netns,
                attach,
                ipv6=self._routable(_ipv6_of(ep)),
                **self._service_nat,
            )
        else:
            mode = attach_loaded(loaded, *where, ifindex, node_netns, attach)
        return self._attached(ep, mode)

    def _attached(self, ep: EndpointRecord, mode: str, ahead: bool = False) -> EndpointRecord:
        """Log and record how `ep`'s programs are attached (`ahead`: on its veth made
        ahead)."""
        log.log(
            logging.INFO if mode == ATTACH_TCX else logging.WARNING,
            "endpoint attached",
            extra={"fields": {"endpoint": ep.key, "attach_mode": mode, "ahead": ahead}},
        )
        if ep.attach_mode != mode:
            ep = replace(ep, attach_mode=mode)
            self.state.endpoints[ep.id] = ep
        return ep


def _ipv6_of(ep: EndpointRecord) -> IPv6Address | None:
    return _ipv6(ep.ipv6)


def _ipv6(addr: IPv6Address | IPv4Address | str | None) -> IPv6Address | None:
    return None if addr is None else IPv6Address(addr)


def _close_when_loaded(loading: Future[BpfObject]) -> None:
    """Close programs nobody will attach, once (and if) their load finishes."""

    def close(done: Future[BpfObject]) -> None:
        if not done.cancelled() and done.exception() is None:
            done.result().close()

    if not loading.cancel():
        loading.add_done_callback(close)
