"""The agent's metrics servers scraped by a real Prometheus server (Debian's `prometheus`)
and queried with PromQL after allowed and denied traffic: cilium_* from
--prometheus-serve-addr, hubble_* from --hubble-metrics-server, Cilium's names, labels and
label values. Prometheus and both metrics servers listen on 127.0.0.1 only, on free ports;
Prometheus keeps its data in the test's temporary directory and is stopped by PID.

A bulk TCP transfer between two pods then shows the datapath's per-CPU forward counters
following real traffic (every byte counted, in both directions), while the same connection
yields only a handful of trace flows (medium monitor aggregation): at from-endpoint where a
pod sends, at to-endpoint where it receives, for its opening, its first reply and its
close."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import textwrap
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from membrane.testing.agent import agent_unusable_reason
from membrane.testing.cluster import Cluster, running_cluster
from membrane.testing.traffic import free_loopback_port, listen, socket_in
from membrane.testing.waiting import wait_for

pytestmark = pytest.mark.root

PROMETHEUS = "prometheus"
SCRAPE_INTERVAL = "1s"
# the node maps and the service maps (membrane.service)
PRESSURE_MAPS = ("ct", "ct6", "policy", "ipcache", "ipcache6", "svc_frontends", "svc_backends",
                 "svc_slots", "svc_affinity", "svc_sock")  # fmt: skip
BULK_PORT = 9000  # x/a takes anything (no policy selects it)
BULK_BYTES = 4 << 20


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


@contextlib.contextmanager
def prometheus_server(workdir: Path, targets: dict[str, str]) -> Iterator[str]:
    """A Prometheus server scraping `targets` (job -> host:port) every second; yields its
    base URL once ready and stops it (SIGTERM, then SIGKILL) however the body ends."""
    binary = shutil.which(PROMETHEUS)
    if binary is None:
        pytest.skip("the `prometheus` server is not installed (scripts/setup.sh installs it)")
    scrapes = "".join(
        f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
        for job, target in targets.items()
    )
    config = workdir / "prometheus.yml"
    config.write_text(
        textwrap.dedent(f"""\
            global:
              scrape_interval: {SCRAPE_INTERVAL}
              scrape_timeout: {SCRAPE_INTERVAL}
              evaluation_interval: {SCRAPE_INTERVAL}
            scrape_configs:
            """)
        + scrapes
    )
    port = free_loopback_port()
    url = f"http://127.0.0.1:{port}"
    log = (workdir / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(
                    f"prometheus exited: {(workdir / 'prometheus.log').read_text()}"
                )
            with contextlib.suppress(OSError):
                return get(f"{url}/-/ready") is not None
            return False

        wait_for("prometheus ready", ready, timeout=60)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def query(url: str, promql: str) -> list[dict[str, Any]]:
    """The instant vector PromQL answers now."""
    body = get(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    answer = json.loads(body)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def eventually(url: str, promql: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Wait until `promql` has an answer (a comparison filters to nothing while false)."""
    return wait_for(promql, lambda: query(url, promql), timeout=timeout)


POLICY = """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: b-from-a-on-80, namespace: x}
    spec:
      endpointSelector: {matchLabels: {pod: b}}
      ingress:
      - fromEndpoints:
        - matchLabels: {pod: a}
        toPorts:
        - ports: [{port: "80", protocol: TCP}]
"""


def test_prometheus_scrapes_agent_and_flow_metrics(tmp_path: Path) -> None:
    reason = agent_unusable_reason()
    if reason:
        pytest.skip(reason)
    agent_addr, hubble_addr = (
        f"127.0.0.1:{free_loopback_port()}",
        f"127.0.0.1:{free_loopback_port()}",
    )
    options = ["--prometheus-serve-addr", agent_addr, "--hubble-metrics-server", hubble_addr]
    (tmp_path / "agent").mkdir()
    (tmp_path / "prometheus").mkdir()
    with (
        running_cluster(
            tmp_path / "agent", namespaces=("x",), pod_names=("a", "b"), extra_args=options
        ) as net,
        prometheus_server(
            tmp_path / "prometheus", {"cilium-agent": agent_addr, "hubble": hubble_addr}
        ) as prom,
    ):
        net.import_policy(POLICY)
        # x/a -> x/b: 80 allowed by the rule, 81 denied (default deny of x/b's ingress)
        reach = net.reach(sources=["x/a"], destinations=["x/b"], ports=((80, "TCP"), (81, "TCP")))
        net.check(reach.deny("x/a", "x/b", port=81))

        assert eventually(prom, 'up{job="cilium-agent"} == 1')
        assert eventually(prom, 'up{job="hubble"} == 1')
        # flows, by Hubble's labels
        assert eventually(prom, 'sum(hubble_flows_processed_total{type="PolicyVerdict",'
                                'verdict="FORWARDED",protocol="TCP"}) > 0')  # fmt: skip
        assert eventually(prom, 'sum(hubble_flows_processed_total{type="Drop",'
                                'verdict="DROPPED",protocol="TCP"}) > 0')  # fmt: skip
        assert eventually(prom, 'hubble_drop_total{reason="POLICY_DENIED",protocol="TCP"} > 0')
        assert eventually(
            prom,
            'hubble_policy_verdicts_total{direction="ingress",match="l3-l4",action="forwarded"}'
            " > 0",
        )
        assert eventually(
            prom,
            'hubble_policy_verdicts_total{direction="ingress",match="none",action="dropped"} > 0',
        )
        assert eventually(prom, 'hubble_tcp_flags_total{flag="SYN",family="IPv4"} > 0')
        assert eventually(prom, 'hubble_lost_events_total{source="perf_event_ring_buffer"} >= 0')
        # the agent's: drops from the datapath's per-CPU counters, Cilium's reason text
        drops = eventually(
            prom, 'cilium_drop_count_total{reason="Policy denied",direction="INGRESS"} > 0'
        )
        # every SYN to port 81 is a drop (the probe's retransmissions too): at least as
        # many packets as the flow events Hubble counted
        hubble_drops = query(prom, 'sum(hubble_drop_total{reason="POLICY_DENIED"})')
        assert float(drops[0]["value"][1]) >= float(hubble_drops[0]["value"][1]) > 0
        assert eventually(prom, 'cilium_drop_bytes_total{reason="Policy denied"} > 0')
        assert eventually(prom, 'cilium_forward_count_total{direction="INGRESS"} > 0')
        assert eventually(prom, 'cilium_policy_change_total{outcome="success"} >= 1')
        assert eventually(prom, "cilium_endpoint == 2")
        assert eventually(prom, "cilium_policy == 1")
        assert eventually(
            prom, 'cilium_policy_regeneration_time_stats_seconds_count{scope="total"} > 0'
        )
        pressure = eventually(prom, "cilium_bpf_map_pressure >= 0")
        ratios = {r["metric"]["map_name"]: float(r["value"][1]) for r in pressure}
        assert set(ratios) == set(PRESSURE_MAPS)
        assert all(0 <= ratio < 1 for ratio in ratios.values()), ratios
        # the pods' and the node's addresses, the policy's entries, the probes' connections
        for name in ("ipcache", "policy", "ct"):
            assert eventually(prom, f'cilium_bpf_map_pressure{{map_name="{name}"}} > 0')
        # trace flows, by the observation point
        for point in ("to-endpoint", "from-endpoint"):
            assert eventually(prom, 'sum(hubble_flows_processed_total{type="Trace",'
                                    f'subtype="{point}",verdict="FORWARDED"}}) > 0')  # fmt: skip

        before = forwards(agent_addr)
        sport = bulk_transfer(net, "x/b", "x/a", BULK_BYTES)
        grown = wait_for(
            "the forward counters to count the transfer",
            lambda: (
                (after := forwards(agent_addr))
                and all(
                    after[("bytes", d)] - before[("bytes", d)] >= BULK_BYTES
                    for d in ("EGRESS", "INGRESS")
                )
                and after
            ),
        )
        # x/b's egress and x/a's ingress each pass every byte at least once
        assert eventually(prom, f'cilium_forward_bytes_total{{direction="EGRESS"}} >= {BULK_BYTES}')
        packets = {d: grown[("packets", d)] - before[("packets", d)] for d in ("EGRESS", "INGRESS")}
        traced = wait_for(
            "the transfer's close in the trace flows",
            lambda: (found := connection_traces(net, sport)) and len(found) >= 6 and found,
        )
        points = {(f["trace_observation_point"], f["trace_reason"], f["Summary"]) for f in traced}
        assert {
            ("FROM_ENDPOINT", "NEW", "TCP Flags: SYN"),  # x/b opens
            ("TO_ENDPOINT", "NEW", "TCP Flags: SYN"),  # delivered to x/a
            ("FROM_ENDPOINT", "REPLY", "TCP Flags: SYN, ACK"),  # x/a answers
            ("TO_ENDPOINT", "REPLY", "TCP Flags: SYN, ACK"),
        } <= points, points
        assert {p for p, r, summary in points if "FIN" in summary} == {
            "FROM_ENDPOINT",
            "TO_ENDPOINT",
        }, points
        for f in traced:
            assert f["event_type"]["type"] == 4 and f["verdict"] == "FORWARDED", f
            assert f["event_type"].get("sub_type", 0) == (
                5 if f["trace_observation_point"] == "FROM_ENDPOINT" else 0
            ), f
            # x/b opened it: its packets are EGRESS at x/b and INGRESS at x/a, replies too
            at_client = (f["trace_observation_point"] == "FROM_ENDPOINT") != f["is_reply"]
            assert f["traffic_direction"] == ("EGRESS" if at_client else "INGRESS"), f
        # sampled: a connection of thousands of segments (hundreds as GSO packets) traced
        # at its news only, never per packet
        assert len(traced) <= 12 < min(packets.values()), (len(traced), packets)


def forwards(agent_addr: str) -> dict[tuple[str, str], float]:
    """(packets | bytes, direction) -> the agent's cilium_forward_*_total now."""
    text = get(f"http://{agent_addr}/metrics").decode()
    out = {}
    for family in text_string_to_metric_families(text):
        kind = {"cilium_forward_count": "packets", "cilium_forward_bytes": "bytes"}.get(family.name)
        for sample in family.samples if kind else ():
            if sample.name.endswith("_total"):
                out[(kind, sample.labels["direction"])] = sample.value
    return out


def bulk_transfer(net: Cluster, client: str, server: str, size: int) -> int:
    """`size` bytes from `client` to `server`:BULK_PORT over one TCP connection, closed by
    both sides; returns the client's port."""
    dst = net.pods[server]
    listener = listen(dst.netns, dst.ip, BULK_PORT, backlog=1)
    listener.setblocking(True)
    listener.settimeout(10)
    sock = socket_in(net.pods[client].netns)
    try:
        sock.settimeout(10)
        sock.connect((dst.ip, BULK_PORT))
        peer, _ = listener.accept()
        with peer:
            peer.settimeout(10)
            received: list[int] = []

            def read() -> None:  # the receiver reads while the client sends
                while chunk := peer.recv(1 << 20):
                    received.append(len(chunk))

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            sock.sendall(b"m" * size)
            sock.shutdown(socket.SHUT_WR)
            reader.join(10)
            assert sum(received) == size
        return sock.getsockname()[1]
    finally:
        sock.close()
        listener.close()


def connection_traces(net: Cluster, sport: int) -> list[dict[str, Any]]:
    """Trace flows of the bulk connection (either way)."""
    ports = {(sport, BULK_PORT), (BULK_PORT, sport)}
    return [
        f
        for f in (r["flow"] for r in net.agent.observe(4000) if "flow" in r)
        if f.get("event_type", {}).get("type") == 4
        and (
            f.get("l4", {}).get("TCP", {}).get("source_port"),
            f.get("l4", {}).get("TCP", {}).get("destination_port"),
        )
        in ports
    ]
