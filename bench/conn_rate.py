"""New TCP connections per second through one endpoint with 0, 1, 1,000 and 10,000 rules in
force: the agent's policy against the same rules in nftables (a set) and in iptables (one
rule per source).

Where a policy is consulted is the first packet of each connection, so unlike one long
iperf3 stream this measures the policy's lookup on every connection. One `membrane agent
run` (node namespace, state directory and pod prefix of its own) gets three pods:
  client    app=churn-client: several client processes (membrane.testing.connection_churn)
            keep 64 connections under way: connect, send 64 bytes, read the echo, close
  server    app=churn-server: the echo server of the policy tests on port 7000
  stranger  allowed by nothing: proves every rule set enforces
Rule sets with N sources (N /32 addresses in 198.19.0.0/16, away from the node's /24, none
a pod), each admitting TCP 7000 to the server from the N sources and from the client:
  none           no policy anywhere
  bpf-N          a CiliumNetworkPolicy selecting the server: N `fromCIDR` /32 entries
                 (N CIDR identities) and `fromEndpoints` app=churn-client, imported
                 through the agent's API before the scenario's test, deleted after it
  nft-set-N      nftables as a practitioner writes it, in the node namespace's forward
                 chain (on the path, like bench/policy_scale.py's baseline):
                 `ct state established,related accept`, then
                 `ip daddr SERVER ip saddr . tcp dport @allowed accept` (a set of N + 1
                 elements), then `ip daddr SERVER drop`
  iptables-N     iptables (the installed variant) in the node namespace, linear rules: a
                 chain the forward chain jumps to for the server, ESTABLISHED,RELATED first,
                 then one `-s SRC/32 -p tcp --dport 7000 -j ACCEPT` rule per source (the
                 client last), then DROP
Each rule set is checked the first time it is loaded: the client connects, the stranger
does not. Every round measures `none` between every two scenarios (none, a, none, b, ...,
none; the order rotates by one each round), --duration seconds each, and compares each
measurement with the mean of the `none` ones just before and after it: the load others put
on a shared machine moves the rate by tens of percent within a minute, and this cancels
it. Medians over rounds. Per-connection policy cost = 1/rate - 1/rate(none around it), in
microseconds.

    python -m bench.conn_rate [--duration S] [--rounds N] [--sizes 1,1000,10000]
        [--clients N] [--inflight N] [--scenarios a,b,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import Any

import yaml

from bench._common import emit, exit_on_sigterm, machine, median, random_prefixes
from membrane import netns
from membrane.testing.agent import AgentProcess, running_agent
from membrane.testing.pods import Pod, add_pod, start_echo_server
from membrane.testing.traffic import connect, connection_rate

PORT = 7000
NAMESPACE = "bench"
SOURCE_RANGE = IPv4Network("198.19.0.0/16")  # the rules' sources; pods are in 198.18.0.0/16
NODE_NET = IPv4Network("198.19.0.0/24")  # kept clear: the node's address lives here
NFT_TABLE = "membrane_conn_rate"
IPT_CHAIN = "MEMBRANE-CONN-RATE"
SIZES = (1, 1_000, 10_000)
TARGET_VS_NONE = 0.9  # bpf with the most rules >= 0.9x no policy
TARGET_VS_NFT = 1.0  # ... and >= the nftables set with as many rules
POLICY_NAME = "conn-rate"


def sources(count: int, seed: int = 11) -> list[str]:
    """`count` distinct /32 addresses in 198.19.0.0/16 outside the node's /24: random but
    the same every run (and the smaller sets are prefixes of the larger ones)."""
    nets = random_prefixes(max(count, 1), SOURCE_RANGE, NODE_NET, ((32, 1),), seed)
    return [str(n.network_address) for n in nets[:count]]


# ---- the rule sets ------------------------------------------------------------------------
def policy_document(cidrs: list[str]) -> str:
    ports = [{"ports": [{"port": str(PORT), "protocol": "TCP"}]}]
    doc = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": POLICY_NAME, "namespace": NAMESPACE},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "churn-server"}},
            "ingress": [
                {"fromCIDR": [f"{ip}/32" for ip in cidrs], "toPorts": ports},
                {"fromEndpoints": [{"matchLabels": {"app": "churn-client"}}], "toPorts": ports},
            ],
        },
    }
    return yaml.safe_dump(doc, sort_keys=False)


def nft_ruleset(server: str, allowed: list[str]) -> str:
    elements = ", ".join(f"{ip} . {PORT}" for ip in allowed)
    return "\n".join(
        [
            f"table ip {NFT_TABLE} {{",
            "  set allowed { type ipv4_addr . inet_service;",
            f"    elements = {{ {elements} }} }}",
            "  chain forward { type filter hook forward priority filter; policy accept;",
            "    ct state established,related accept",
            f"    ip daddr {server} ip saddr . tcp dport @allowed accept",
            f"    ip daddr {server} drop",
            "  }",
            "}",
            "",
        ]
    )


def iptables_rules(server: str, allowed: list[str]) -> str:
    """iptables-restore input (--noflush): the chain, the jump to it, its rules."""
    lines = [
        "*filter",
        f":{IPT_CHAIN} - [0:0]",
        f"-A FORWARD -d {server}/32 -j {IPT_CHAIN}",
        f"-A {IPT_CHAIN} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
    ]
    lines += [f"-A {IPT_CHAIN} -s {ip}/32 -p tcp --dport {PORT} -j ACCEPT" for ip in allowed]
    lines += [f"-A {IPT_CHAIN} -j DROP", "COMMIT", ""]
    return "\n".join(lines)


class RuleSets:
    """Loads and removes each kind of rule set; the node namespace holds the netfilter ones."""

    def __init__(self, agent: AgentProcess, server: Pod, client: Pod) -> None:
        self.agent, self.server, self.client = agent, server, client
        self.import_s: dict[int, list[float]] = {}
        self.loaded = 0  # rules the nft/iptables set holds, checked after each load

    def bpf_load(self, n: int) -> None:
        t = time.perf_counter()
        self.agent.client(timeout=None).post("/v1/policies", {"yaml": policy_document(sources(n))})
        self.import_s.setdefault(n, []).append(round(time.perf_counter() - t, 2))

    def bpf_unload(self) -> None:
        self.agent.client(timeout=None).delete("/v1/policies", {"all": "1"})

    def nft_load(self, n: int) -> None:
        ns = self.agent.node_netns
        allowed = [*sources(n), self.client.ip]
        netns.run(ns, ["nft", "-f", "-"], input=nft_ruleset(self.server.ip, allowed))
        listed = json.loads(netns.run(ns, ["nft", "-j", "list", "set", "ip", NFT_TABLE,
                                           "allowed"]).stdout)  # fmt: skip
        held = next(item["set"] for item in listed["nftables"] if "set" in item)
        if len(held.get("elem", [])) != len(allowed):
            raise RuntimeError(f"nft set holds {len(held.get('elem', []))} of {len(allowed)}")

    def nft_unload(self) -> None:
        netns.run(self.agent.node_netns, ["nft", "delete", "table", "ip", NFT_TABLE], check=False)

    def iptables_load(self, n: int) -> None:
        ns = self.agent.node_netns
        allowed = [*sources(n), self.client.ip]
        netns.run(
            ns, ["iptables-restore", "--noflush"], input=iptables_rules(self.server.ip, allowed)
        )
        listed = netns.run(ns, ["iptables", "-S", IPT_CHAIN]).stdout.splitlines()
        if len(listed) != len(allowed) + 3:  # -N, ESTABLISHED, the sources, DROP
            raise RuntimeError(f"iptables chain holds {len(listed)} lines, not {len(allowed) + 3}")

    def iptables_unload(self) -> None:
        ns = self.agent.node_netns
        jump = ["-D", "FORWARD", "-d", f"{self.server.ip}/32", "-j", IPT_CHAIN]
        for args in (jump, ["-F", IPT_CHAIN], ["-X", IPT_CHAIN]):
            netns.run(ns, ["iptables", *args], check=False)


# ---- measuring ----------------------------------------------------------------------------
@dataclass
class Scenario:
    name: str
    rules: int
    setup: Callable[[], None] = lambda: None
    teardown: Callable[[], None] = lambda: None
    per_s: list[float] = field(default_factory=list)
    # per measurement, the mean of the `none` measurements just before and just after it
    base: list[float] = field(default_factory=list)
    agent_cpu_s: list[float] = field(default_factory=list)  # while it was measured
    failed: dict[str, int] = field(default_factory=dict)
    checked: dict[str, bool] | None = None


def scenarios_for(sizes: list[int], rules: RuleSets) -> dict[str, Scenario]:
    out = {"none": Scenario("none", 0)}
    for n in sizes:
        out[f"bpf-{n}"] = Scenario(f"bpf-{n}", n, lambda n=n: rules.bpf_load(n), rules.bpf_unload)
    for n in sizes:
        out[f"nft-set-{n}"] = Scenario(
            f"nft-set-{n}", n, lambda n=n: rules.nft_load(n), rules.nft_unload
        )
    for n in sizes:
        out[f"iptables-{n}"] = Scenario(
            f"iptables-{n}", n, lambda n=n: rules.iptables_load(n), rules.iptables_unload
        )
    return out


def check(client: Pod, stranger: Pod, server: Pod) -> dict[str, bool]:
    """Who gets a connection to the server's echo port now (0.5 s: the first SYN's fate)."""
    return {
        "client -> server": connect(client.netns, server.ip, PORT, 0.5),
        "stranger -> server": connect(stranger.netns, server.ip, PORT, 0.5),
    }


def relative(s: Scenario) -> list[float]:
    """Each measurement against the `none` ones around it: drift (others' load on a shared
    machine moves the rate by tens of percent within a minute) cancels out."""
    return [v / b for v, b in zip(s.per_s, s.base, strict=True)]


def summarize(scenarios: dict[str, Scenario]) -> dict[str, dict[str, Any]]:
    rows = {}
    for s in scenarios.values():
        row: dict[str, Any] = {"rules": s.rules, "connections_per_s": round(median(s.per_s))}
        if s.base:
            row["vs_none"] = round(median(relative(s)), 3)
            # what the rules add to one connection: 1/rate - 1/rate(none), in microseconds
            row["policy_cost_us_per_connection"] = round(
                median([1e6 / v - 1e6 / b for v, b in zip(s.per_s, s.base, strict=True)]), 1
            )
        row |= {
            "rounds_per_s": [round(v) for v in s.per_s],
            "rounds_none_around_per_s": [round(v) for v in s.base],
            # the agent's CPU while the connections ran (it reads a flow record per new
            # connection and endpoint)
            "agent_cpu_s_rounds": s.agent_cpu_s,
            "failed": s.failed,
            "enforcement_checked": s.checked,
        }
        rows[s.name] = row
    return rows


def targets(scenarios: dict[str, Scenario], largest: int) -> list[dict[str, Any]]:
    bpf, nft = scenarios.get(f"bpf-{largest}"), scenarios.get(f"nft-set-{largest}")
    out: list[dict[str, Any]] = []
    if bpf is None:
        return out
    value = round(median(relative(bpf)), 3)
    out.append(
        {
            "name": f"bpf with {largest} rules >= {TARGET_VS_NONE:g}x the rate with no policy",
            "value": value,
            "limit": TARGET_VS_NONE,
            "met": value >= TARGET_VS_NONE,
        }
    )
    if nft is not None:  # round by round, each against its own `none` neighbours
        value = round(median([b / n for b, n in zip(relative(bpf), relative(nft), strict=True)]), 3)
        out.append(
            {
                "name": f"bpf with {largest} rules >= the nftables set with as many",
                "value": value,
                "limit": TARGET_VS_NFT,
                "met": value >= TARGET_VS_NFT,
            }
        )
    return out


def check_tools() -> None:
    missing = [t for t in ("nft", "iptables", "iptables-restore", "nsenter") if not shutil.which(t)]
    if missing:
        raise SystemExit(
            f"missing: {', '.join(missing)} (scripts/setup.sh installs nftables and iptables)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=1.5, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=4, help="rounds over all scenarios")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="rule counts")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--inflight", type=int, default=64, help="connections under way")
    parser.add_argument("--scenarios", default="", help="comma-separated subset (default all)")
    args = parser.parse_args()
    sizes = sorted({int(n) for n in args.sizes.split(",") if n})
    if not sizes or sizes[0] < 1:
        parser.error("--sizes: rule counts of 1 or more")
    check_tools()
    exit_on_sigterm()
    host = machine()
    started = time.monotonic()

    tag = f"mcr{os.getpid() % 100000}"
    with running_agent(tag, log_level="warning", memory_limit=None) as agent, ExitStack() as stack:
        print(f"agent: node netns {agent.node_netns}, pods {agent.prefix}*", file=sys.stderr)
        api = agent.client(timeout=120.0)
        client = add_pod(api, NAMESPACE, "client", {"app": "churn-client"})[0]
        server = add_pod(api, NAMESPACE, "server", {"app": "churn-server"})[0]
        stranger = add_pod(api, NAMESPACE, "stranger", {"app": "stranger"})[0]
        stack.callback(netns.stop, start_echo_server(server.netns, (PORT,)))
        rules = RuleSets(agent, server, client)
        everything = scenarios_for(sizes, rules)
        wanted = [s for s in args.scenarios.split(",") if s] or list(everything)
        if unknown := set(wanted) - set(everything):
            parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
        scenarios = {n: s for n, s in everything.items() if n in wanted or n == "none"}
        none, others = scenarios["none"], [x for x in scenarios.values() if x.name != "none"]
        setup_s = time.monotonic() - started

        def measure(s: Scenario) -> float:
            s.setup()
            try:
                if s.checked is None:
                    s.checked = check(client, stranger, server)
                    expected = {"client -> server": True, "stranger -> server": s.rules == 0}
                    if s.checked != expected:
                        raise RuntimeError(f"{s.name} does not enforce: {s.checked}")
                cpu = agent.cpu_s()
                got = connection_rate(
                    client.netns, server.ip, PORT, args.duration, args.clients, args.inflight
                )
                s.agent_cpu_s.append(round(agent.cpu_s() - cpu, 2))
            finally:
                s.teardown()
            s.per_s.append(got.per_s)
            for kind, n in got.failed.items():
                s.failed[kind] = s.failed.get(kind, 0) + n
            return got.per_s

        for rnd in range(args.rounds):  # none, a, none, b, none, ... (order rotating)
            before = measure(none)
            for s in others[rnd % len(others) :] + others[: rnd % len(others)]:
                measure(s)
                after = measure(none)
                s.base.append((before + after) / 2)
                before = after
            agent.check_alive()
            print(f"  round {rnd + 1}/{args.rounds} done", file=sys.stderr)

    rows = summarize(scenarios)
    out = {
        "bench": "conn_rate",
        "machine": {**host, "loadavg_1m_at_end": os.getloadavg()[0]},
        "method": {
            "path": "client pod -> veth -> node netns (routing, forward) -> veth -> server "
            "pod; endpoint programs on both veths in every scenario",
            "connection": "connect, send 64 bytes, read the echo, close (client first)",
            "clients": args.clients,
            "inflight": args.inflight,
            "server": "membrane.testing.echo_server (one asyncio process)",
            "duration_s": args.duration,
            "rounds": args.rounds,
            "statistic": "each round measures none, a, none, b, none, ... (order rotating "
            "each round); every measurement is compared with the mean of the none "
            "measurements just before and after it; medians over rounds",
            "policy_cost_us_per_connection": "1e6/rate - 1e6/rate(none around it)",
            "sizes": sizes,
            "seconds_setup": round(setup_s),
            "seconds_total": round(time.monotonic() - started),
        },
        "agent": {"policy_import_s": {str(n): v for n, v in rules.import_s.items()}},
        "scenarios": rows,
        "targets": targets(scenarios, sizes[-1]),
    }
    summary = [
        f"{'scenario':16} {'conn/s':>8} {'vs none':>8} {'us/conn':>8} {'agent s':>8}  failed"
    ]
    for name, r in rows.items():
        failed = ", ".join(f"{k} {v}" for k, v in r["failed"].items()) or "-"
        summary.append(
            f"{name:16} {r['connections_per_s']:8} {r.get('vs_none', 1):8.2f} "
            f"{r.get('policy_cost_us_per_connection', 0):8.1f} "
            f"{median(r['agent_cpu_s_rounds']):8.2f}  {failed}"
        )
    for t in out["targets"]:
        summary.append(f"target: {t['name']}: {t['value']} -> {'met' if t['met'] else 'MISSED'}")
    emit(out, summary)


if __name__ == "__main__":
    main()
