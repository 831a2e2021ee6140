"""Throughput between two pods of a real agent with a 10,000-CIDR, 1,000-identity policy on
the server, against no policy and against the same rules as nftables rules.

One `membrane agent run` (its own node namespace, state directory and pod prefix) gets:
  client        app=iperf-client
  server        app=iperf-server: the one the policy selects
  stranger      allowed by nothing: proves the policy (and the nftables rules) enforce
  peer-0..N-1   role=peer, peer=<i>: N distinct identities the policy allows
The peers are created first, one API call each, and timed. The policy, one
CiliumNetworkPolicy: the server admits TCP and UDP port 5201 from 10,000 CIDR prefixes
(half as fromCIDR, half as fromCIDRSet, all inside 198.19.0.0/16 away from the node's
/24, none covering a pod), from the N peers (fromEndpoints role=peer) and from the client.
Before the rounds it is imported once to check it: its entries are counted in the pinned
policy map, the client is admitted and the stranger refused, and after its deletion the
stranger is admitted again. Scenarios, all client -> server:

  none      no policy in the agent
  policy    the policy above, imported through the API before the tests of the round
            and deleted after them (import and delete times are reported)
  nft       no BPF policy; the same rules as nftables rules in the node namespace's
            forward chain: one `ip daddr SERVER ip saddr PREFIX accept` rule per CIDR,
            per peer and for the client (10,000 + N + 1 rules walked one by one), then
            `ip daddr SERVER drop`
  nft-set   the same with the sources in one interval set (`ip saddr @allowed`)

Measured with iperf3 from the client: TCP (one stream, receiver bits/s) and UDP with
64-byte payloads at unlimited rate (-b 0; receiver packets/s = packets - lost), each
against a fresh one-shot server. Every round runs every scenario (the order rotates by
one each round); ratios are taken per round against `none` of that round, then the median.

    python -m bench.policy_scale [--duration S] [--rounds N] [--peers N]
        [--peer-budget S] [--cidrs N] [--scenarios a,b,...]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import yaml

from bench._common import (
    RULES,
    chosen_scenarios,
    emit,
    exit_on_sigterm,
    machine,
    median,
    random_prefixes,
    scenario_arguments,
)
from membrane import netns
from membrane.api.client import ApiClient
from membrane.datapath import NodeMaps
from membrane.testing.agent import NODE_IP, POD_CIDR, AgentProcess, running_agent
from membrane.testing.pods import Pod, add_pod
from membrane.testing.traffic import IPERF_PORT, connect, iperf, listen

CIDR_RANGE = IPv4Network("198.19.0.0/16")  # the policy's prefixes; pods are in POD_CIDR
NODE_NET = IPv4Network("198.19.0.0/24")  # kept clear: the node's address lives here
NAMESPACE = "bench"
NFT_TABLE = "membrane_bench"
TARGET_VS_NONE = 0.95
TARGET_VS_NFT = 10.0
SCENARIOS = ("none", "policy", "nft", "nft-set")


def policy_prefixes(count: int, seed: int = 7) -> list[IPv4Network]:
    """`count` distinct prefixes inside 198.19.0.0/16 that stay clear of the node's /24:
    mostly /32 (hosts), some /28 and /24 (networks, as many as fit), random but fixed."""
    return random_prefixes(count, CIDR_RANGE, NODE_NET, ((32, 7), (28, 2), (24, 1)), seed)


def policy_document(prefixes: list[IPv4Network]) -> str:
    ports = [{"ports": [{"port": str(IPERF_PORT), "protocol": p} for p in ("TCP", "UDP")]}]
    half = len(prefixes) // 2
    doc = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "policy-scale", "namespace": NAMESPACE},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "iperf-server"}},
            "ingress": [
                {"fromCIDR": [str(p) for p in prefixes[:half]], "toPorts": ports},
                {"fromCIDRSet": [{"cidr": str(p)} for p in prefixes[half:]], "toPorts": ports},
                {"fromEndpoints": [{"matchLabels": {"role": "peer"}}], "toPorts": ports},
                {"fromEndpoints": [{"matchLabels": {"app": "iperf-client"}}], "toPorts": ports},
            ],
        },
    }
    return yaml.safe_dump(doc, sort_keys=False)


# ---- pods --------------------------------------------------------------------------------
def add_peers(client: ApiClient, wanted: int, budget_s: float) -> tuple[list[Pod], dict[str, Any]]:
    """Up to `wanted` peers with distinct labels (so distinct identities), one request
    each, stopping when `budget_s` is spent; the peers and how long their adds took."""
    pods: list[Pod] = []
    took: list[float] = []
    started = time.monotonic()
    while len(took) < wanted and time.monotonic() - started < budget_s:
        labels = {"role": "peer", "peer": str(len(took))}
        pod, seconds = add_pod(client, NAMESPACE, f"peer-{len(took)}", labels)
        pods.append(pod)
        took.append(seconds)
        if len(took) % 100 == 0:
            print(f"  {len(took)} peers, last add {took[-1] * 1e3:.0f} ms", file=sys.stderr)
    tenth = max(1, len(took) // 10)
    return pods, {
        "created": len(took),
        "wanted": wanted,
        "budget_s": budget_s,
        "seconds": round(time.monotonic() - started, 1),
        "first_10pct_ms_per_add": round(sum(took[:tenth]) / tenth * 1e3, 1),
        "last_10pct_ms_per_add": round(sum(took[-tenth:]) / tenth * 1e3, 1),
    }


# ---- checks ------------------------------------------------------------------------------
def policy_entries(agent: AgentProcess, ep_id: int) -> int:
    """Entries the agent's pinned policy map holds for endpoint `ep_id` (both
    generations; outside a policy switch only one has entries)."""
    with NodeMaps.open(str(agent.bpf_dir)) as maps:
        return sum(1 for key, _ in maps.policy.lookup_batch() if int(key.ep_id) == ep_id)


def connects(client: Pod, server: Pod, port: int, timeout: float = 1.0) -> bool:
    """Whether a TCP connection from `client` to `server`:`port` is accepted (a listener
    of our own in the server's namespace)."""
    with listen(server.netns, server.ip, port):
        return connect(client.netns, server.ip, port, timeout)


class BpfPolicy:
    """The policy, imported through the agent's API and deleted again, timed each time."""

    def __init__(self, agent: AgentProcess, server: Pod, document: str, entries: int) -> None:
        self.agent, self.server, self.document, self.entries = agent, server, document, entries
        self.import_s: list[float] = []
        self.enforced_s: list[float] = []  # what the agent reports (enforced_in_seconds)
        self.delete_s: list[float] = []

    def apply(self) -> None:
        t = time.perf_counter()
        answer = self.agent.client(timeout=None).post("/v1/policies", {"yaml": self.document})
        self.import_s.append(time.perf_counter() - t)
        self.enforced_s.append(float(answer["enforced_in_seconds"]))

    def remove(self) -> None:
        t = time.perf_counter()
        self.agent.client(timeout=None).delete("/v1/policies", {"all": "1"})
        self.delete_s.append(time.perf_counter() - t)

    def check(self, client: Pod, stranger: Pod) -> dict[str, bool]:
        """Import: the server's entries are all in the policy map, the client is admitted,
        the stranger refused; delete: the entries are gone, the stranger is admitted."""
        self.apply()
        try:
            held = policy_entries(self.agent, self.server.id)
            seen = {
                "client -> server": connects(client, self.server, IPERF_PORT),
                "stranger -> server": connects(stranger, self.server, IPERF_PORT),
            }
        finally:
            self.remove()
        seen["stranger -> server, policy deleted"] = connects(stranger, self.server, IPERF_PORT)
        left = policy_entries(self.agent, self.server.id)
        if (held, left) != (self.entries, 0):
            raise RuntimeError(
                f"server policy entries: {held} (expected {self.entries}), {left} after delete"
            )
        wanted = {
            "client -> server": True,
            "stranger -> server": False,
            "stranger -> server, policy deleted": True,
        }
        if seen != wanted:
            raise RuntimeError(f"the policy is not enforced as written: {seen}")
        return seen


# ---- nftables ----------------------------------------------------------------------------
def nft_rules(server: str, sources: list[str], as_set: bool) -> str:
    """A table with a forward chain in the node namespace: accept `sources` to `server`
    (one rule each, or one rule over an interval set), drop the rest to `server`."""
    lines = [f"table ip {NFT_TABLE} {{"]
    if as_set:
        lines += [
            "  set allowed { type ipv4_addr; flags interval; auto-merge;",
            "    elements = { " + ", ".join(sources) + " } }",
        ]
    lines.append("  chain forward { type filter hook forward priority filter; policy accept;")
    if as_set:
        lines.append(f"    ip daddr {server} ip saddr @allowed accept")
    else:
        lines += [f"    ip daddr {server} ip saddr {src} accept" for src in sources]
    lines += [f"    ip daddr {server} drop", "  }", "}", ""]
    return "\n".join(lines)


class Nftables:
    def __init__(self, node_netns: str, server: str, sources: list[str]) -> None:
        self.ns, self.server, self.sources = node_netns, server, sources

    def load(self, as_set: bool) -> None:
        netns.run(self.ns, ["nft", "-f", "-"], input=nft_rules(self.server, self.sources, as_set))
        listed = json.loads(
            netns.run(self.ns, ["nft", "-j", "list", "table", "ip", NFT_TABLE]).stdout
        )
        rules = sum(1 for item in listed["nftables"] if "rule" in item)
        expected = 2 if as_set else len(self.sources) + 1
        if rules != expected:
            raise RuntimeError(f"nftables holds {rules} rules, expected {expected}")

    def check(self, as_set: bool, client: Pod, stranger: Pod, server: Pod) -> dict[str, bool]:
        """Load the rules, see that they admit the client and refuse the stranger."""
        self.load(as_set)
        try:
            seen = {
                "client -> server": connects(client, server, IPERF_PORT),
                "stranger -> server": connects(stranger, server, IPERF_PORT),
            }
        finally:
            self.unload()
        if seen != {"client -> server": True, "stranger -> server": False}:
            raise RuntimeError(f"the nftables rules do not act as written: {seen}")
        return seen

    def unload(self) -> None:
        netns.run(self.ns, ["nft", "delete", "table", "ip", NFT_TABLE], check=False)


# ---- measuring ---------------------------------------------------------------------------
@dataclass
class Scenario:
    name: str
    setup: Callable[[], None] = lambda: None
    teardown: Callable[[], None] = lambda: None
    tcp_bps: list[float] = field(default_factory=list)
    udp_pps: list[float] = field(default_factory=list)
    agent_cpu_s: list[float] = field(default_factory=list)  # while its tests ran


def ratio(values: list[float], base: list[float]) -> float:
    return round(median([v / b for v, b in zip(values, base, strict=True)]), 3)


def summarize(scenarios: dict[str, Scenario]) -> dict[str, dict[str, Any]]:
    none = scenarios.get("none")
    rows: dict[str, dict[str, Any]] = {}
    for s in scenarios.values():
        row: dict[str, Any] = {
            "tcp_gbit_s": round(median(s.tcp_bps) / 1e9, 2),
            "udp_kpps": round(median(s.udp_pps) / 1e3, 1),
            "tcp_rounds_gbit_s": [round(v / 1e9, 2) for v in s.tcp_bps],
            "udp_rounds_kpps": [round(v / 1e3, 1) for v in s.udp_pps],
            # the agent's CPU while the scenario's two tests ran: it should idle in all
            "agent_cpu_s_rounds": s.agent_cpu_s,
        }
        if none is not None:
            row["tcp_vs_none"] = ratio(s.tcp_bps, none.tcp_bps)
            row["udp_vs_none"] = ratio(s.udp_pps, none.udp_pps)
        rows[s.name] = row
    return rows


def targets(scenarios: dict[str, Scenario]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    policy = scenarios.get("policy")
    if policy is None:
        return out
    for proto, series in (("TCP", "tcp_bps"), ("UDP", "udp_pps")):
        if "none" in scenarios:
            value = ratio(getattr(policy, series), getattr(scenarios["none"], series))
            out.append(
                {
                    "name": f"policy {proto} >= {TARGET_VS_NONE:.0%} of no policy",
                    "value": value,
                    "limit": TARGET_VS_NONE,
                    "met": value >= TARGET_VS_NONE,
                }
            )
        if "nft" in scenarios:
            nft = getattr(scenarios["nft"], series)
            value = round(ratio(getattr(policy, series), nft), 2)
            target = {
                "name": f"policy {proto} >= {TARGET_VS_NFT:g}x nftables (rules one by one)",
                "value": value,
                "limit": TARGET_VS_NFT,
                "met": value >= TARGET_VS_NFT,
            }
            if "none" in scenarios:  # what no policy at all reaches: the ceiling
                target["none_vs_nft"] = round(ratio(getattr(scenarios["none"], series), nft), 2)
            out.append(target)
    return out


def check_tools() -> None:
    missing = [tool for tool in ("iperf3", "nft", "nsenter") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(
            f"missing: {', '.join(missing)} (scripts/setup.sh installs iperf3 and nftables)"
        )


def main() -> None:
    parser = scenario_arguments(__doc__, SCENARIOS, duration=4.0, rounds=4)
    parser.add_argument("--peers", type=int, default=1000, help="peer identities wanted")
    parser.add_argument(
        "--peer-budget", type=float, default=300.0, help="stop adding peers after S seconds"
    )
    parser.add_argument("--cidrs", type=int, default=RULES, help="CIDR prefixes in the policy")
    args = parser.parse_args()
    chosen = chosen_scenarios(parser, args, SCENARIOS)
    check_tools()
    exit_on_sigterm()
    host = machine()
    started = time.monotonic()
    prefixes = policy_prefixes(args.cidrs)
    if any(p.overlaps(IPv4Network(POD_CIDR)) or IPv4Address(NODE_IP) in p for p in prefixes):
        raise RuntimeError("a policy prefix covers a pod or the node")

    tag = f"mps{os.getpid() % 100000}"
    with running_agent(tag, log_level="warning", memory_limit=None) as agent:
        print(f"agent: node netns {agent.node_netns}, pods {agent.prefix}*", file=sys.stderr)
        api = agent.client(timeout=120.0)
        client = add_pod(api, NAMESPACE, "client", {"app": "iperf-client"})[0]
        server = add_pod(api, NAMESPACE, "server", {"app": "iperf-server"})[0]
        stranger = add_pod(api, NAMESPACE, "stranger", {"app": "stranger"})[0]
        peer_pods, peers = add_peers(api, args.peers, args.peer_budget)
        agent.check_alive()
        print(f"{peers['created']} peers in {peers['seconds']} s; checking", file=sys.stderr)
        expected = 2 * (len(prefixes) + peers["created"] + 1)  # TCP and UDP per identity
        policy = BpfPolicy(agent, server, policy_document(prefixes), expected)
        enforced = policy.check(client, stranger)
        # the policy's sources in its order: CIDRs, peers, the client
        sources = [str(p) for p in prefixes] + [p.ip for p in peer_pods] + [client.ip]
        nft = Nftables(agent.node_netns, server.ip, sources)
        nft_enforced: dict[str, dict[str, bool]] = {}
        for variant, as_set in (("nft", False), ("nft-set", True)):
            if variant in chosen:
                nft_enforced[variant] = nft.check(as_set, client, stranger, server)
        setup_s = time.monotonic() - started
        print(f"policy imported in {policy.import_s[0]:.1f} s; measuring", file=sys.stderr)

        all_scenarios = {
            "none": Scenario("none"),
            "policy": Scenario("policy", policy.apply, policy.remove),
            "nft": Scenario("nft", lambda: nft.load(False), nft.unload),
            "nft-set": Scenario("nft-set", lambda: nft.load(True), nft.unload),
        }
        scenarios = {name: all_scenarios[name] for name in SCENARIOS if name in chosen}
        order = list(scenarios.values())
        path = (client.netns, server.netns, server.ip)  # client, server, server address
        for rnd in range(args.rounds):
            for s in order[rnd % len(order) :] + order[: rnd % len(order)]:
                s.setup()
                try:
                    cpu = agent.cpu_s()
                    s.tcp_bps.append(iperf(*path, args.duration, udp=False))
                    s.udp_pps.append(iperf(*path, args.duration, udp=True))
                    s.agent_cpu_s.append(round(agent.cpu_s() - cpu, 2))
                finally:
                    s.teardown()
            agent.check_alive()
            print(f"  round {rnd + 1}/{args.rounds} done", file=sys.stderr)
        rss = round(agent.memory_kib()["rss_kib"] / 1024, 1)

    rows = summarize(scenarios)
    out = {
        "bench": "policy_scale",
        "machine": {**host, "loadavg_1m_at_end": os.getloadavg()[0]},
        "method": {
            "path": "client pod -> veth -> node netns (routing, forward) -> veth -> server pod; "
            "endpoint programs on both veths in every scenario",
            "tool": "iperf3, one TCP stream; UDP -l 64 -b 0; receiver-side figures",
            "duration_s": args.duration,
            "rounds": args.rounds,
            "statistic": "median over rounds; ratios per round against `none` of that "
            "round, then the median; scenario order rotates each round",
            "policy": {
                "cidr_prefixes": len(prefixes),
                "peer_identities": peers["created"],
                "server_policy_map_entries": expected,
                "enforcement_checked": enforced,
            },
            "nft_rules": len(sources) + 1,
            "nft_enforcement_checked": nft_enforced,
            "seconds_setup": round(setup_s),
            "seconds_total": round(time.monotonic() - started),
        },
        "agent": {
            "peers": peers,
            "policy_import_s": [round(v, 2) for v in policy.import_s],
            "policy_enforced_in_seconds": [round(v, 2) for v in policy.enforced_s],
            "policy_delete_s": [round(v, 2) for v in policy.delete_s],
            "rss_mib_at_end": rss,
        },
        "scenarios": rows,
        "targets": targets(scenarios),
    }
    summary = [
        f"peers: {peers['created']} created in {peers['seconds']} s "
        f"({peers['first_10pct_ms_per_add']} -> {peers['last_10pct_ms_per_add']} ms per add); "
        f"policy import {median(policy.import_s):.1f} s (median of {len(policy.import_s)}), "
        f"delete {median(policy.delete_s):.1f} s",
        f"{'scenario':10} {'TCP Gbit/s':>10} {'vs none':>8} {'UDP kpps':>9} {'vs none':>8}",
    ]
    for name, r in rows.items():
        summary.append(
            f"{name:10} {r['tcp_gbit_s']:10.2f} {r.get('tcp_vs_none', 1):8.2f} "
            f"{r['udp_kpps']:9.1f} {r.get('udp_vs_none', 1):8.2f}"
        )
    for t in out["targets"]:
        ceiling = f" (no policy: {t['none_vs_nft']}x)" if "none_vs_nft" in t else ""
        verdict = "met" if t["met"] else "MISSED"
        summary.append(f"target: {t['name']}: {t['value']}{ceiling} -> {verdict}")
    emit(out, summary)


if __name__ == "__main__":
    main()
