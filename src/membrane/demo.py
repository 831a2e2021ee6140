"""`make demo`: the agent with pods and the seed's policy (demo_agent), then the seed
documents' packet filters on a namespace topology made for the demo.

Builds a client and a server namespace joined by a veth (198.18.0.0/15 only), shows traffic
passing, then runs each filter as a person would type it, and removes everything at the end.
The machine's own networking is never touched.
"""

from __future__ import annotations

import subprocess
import sys
import time

from membrane import demo_agent
from membrane.demo_common import PORT, membrane, say, show, tcp_ok
from membrane.netns import Topology, add_address, ping


def main() -> None:
    demo_agent.main()
    filter_demo()


def filter_demo() -> None:
    with Topology(prefix="demo") as topo:
        pair = topo.pair()
        client, server = pair.client, pair.server
        net = server.address.network  # type: ignore[union-attr]
        second_server = str(net.network_address + 3)
        second_client = str(net.network_address + 4)
        add_address(server.ns, "eth0", f"{second_server}/{net.prefixlen}")
        add_address(client.ns, "eth0", f"{second_client}/{net.prefixlen}")
        topo.popen(server.ns, [sys.executable, "-m", "http.server", str(PORT), "--bind", "0.0.0.0"])
        deadline = time.monotonic() + 10
        while not tcp_ok(client.ns, server.ip) and time.monotonic() < deadline:
            time.sleep(0.05)
        ns, dev = server.ns, "eth0"
        # Only the demo's own device: other filters on this machine are not ours to remove.
        topo.callback(
            subprocess.run,
            [sys.executable, "-m", "membrane", "filter", "detach", "--netns", ns, "--dev", dev],
            capture_output=True,
            check=False,
        )

        say(
            f"Topology: {client.ns} ({client.ip}, {second_client}) --veth--> "
            f"{server.ns} ({server.ip}, {second_server}), HTTP on port {PORT}"
        )
        show(f"ping {server.ip}", ping(client.ns, server.ip))
        show(f"ping {second_server}", ping(client.ns, second_server))
        show(f"TCP {client.ip} -> {server.ip}:{PORT}", tcp_ok(client.ns, server.ip))

        say("Seed 000: drop packets to one address (XDP, LPM deny list)")
        membrane("filter", "drop-dst", "--netns", ns, "--dev", dev, f"{second_server}/32")
        show(f"ping {server.ip}", ping(client.ns, server.ip))
        show(f"ping {second_server}", ping(client.ns, second_server))
        membrane("filter", "stats", "--netns", ns)
        membrane("filter", "events", "--netns", ns)

        say("Seed 001: drop all TCP (XDP), added live to the same program")
        membrane("filter", "drop-proto", "--netns", ns, "--dev", dev, "tcp")
        show(f"TCP {client.ip} -> {server.ip}:{PORT}", tcp_ok(client.ns, server.ip))
        show(f"ping {server.ip}", ping(client.ns, server.ip))
        membrane("filter", "drop-proto", "--netns", ns, "--dev", dev, "--remove", "tcp")
        show(f"TCP {client.ip} -> {server.ip}:{PORT}", tcp_ok(client.ns, server.ip))

        say(f"Seed 002: only {client.ip} may reach {server.ip}:{PORT} (tc)")
        membrane(
            "filter",
            "allow-only",
            "--netns",
            ns,
            "--dev",
            dev,
            "--src",
            client.ip,
            "--dst",
            server.ip,
            "--dport",
            str(PORT),
        )
        show(f"TCP {client.ip} -> {server.ip}:{PORT}", tcp_ok(client.ns, server.ip))
        show(
            f"TCP {second_client} -> {server.ip}:{PORT}",
            tcp_ok(client.ns, server.ip, src=second_client),
        )
        show(f"ping {second_client} -> {server.ip}", ping(client.ns, server.ip))

        say("What is attached, and where (the filters outlive this command)")
        membrane("filter", "list")

        say("Detach: every pin and link goes, traffic flows again")
        membrane("filter", "detach", "--netns", ns, "--dev", dev)
        show(f"ping {second_server}", ping(client.ns, second_server))
        show(
            f"TCP {second_client} -> {server.ip}:{PORT}",
            tcp_ok(client.ns, server.ip, src=second_client),
        )
    say("Demo topology removed.")


if __name__ == "__main__":
    main()
