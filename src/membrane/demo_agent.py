"""The agent part of `make demo`: pods, the seed's frontend/backend policy, live flows.

Runs a real agent whose node lives in its own network namespace (the machine's own
networking is never touched), creates pods with the CLI, imports the policy, shows which
connections pass, explains one verdict and prints the flows the datapath reported. Every
pod, pin and namespace is removed at the end (`membrane agent reset`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from membrane.demo_common import BOLD, DIM, PORT, RESET, membrane, say, show, tcp_ok
from membrane.netns import popen, stop

NODE = "membrane-demo"
POLICY = """\
# Seed 000's two policies, in the form Cilium accepts: backends admit frontends;
# frontends refuse each other (ingressDeny wins over any allow).
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: allow-frontend-to-backend
spec:
  endpointSelector:
    matchLabels:
      app: backend
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: frontend
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: block-frontend-to-frontend
spec:
  endpointSelector:
    matchLabels:
      app: frontend
  ingress:
  - fromEntities: [all]
  ingressDeny:
  - fromEndpoints:
    - matchLabels:
        app: frontend
"""
PODS = {"frontend-1": "frontend", "frontend-2": "frontend", "backend-1": "backend"}


def _wait_ready(agent: subprocess.Popen[str]) -> None:
    assert agent.stdout is not None
    line = agent.stdout.readline()
    if "ready" not in line:
        raise SystemExit("demo: the agent did not start (see its log above)")


def _matrix(ips: dict[str, str], netns_of: dict[str, str]) -> None:
    for src in PODS:
        for dst in PODS:
            if src != dst:
                show(f"{src} -> {dst}:{PORT}", tcp_ok(netns_of[src], ips[dst]))


def main() -> None:
    work = tempfile.mkdtemp(prefix="membrane-demo-")
    sock = os.path.join(work, "api.sock")
    state = os.path.join(work, "state")
    os.environ["MEMBRANE_API_SOCKET"] = sock
    cmd = [sys.executable, "-m", "membrane", "agent", "run", "--node-netns", NODE]
    cmd += ["--state-dir", state, "--api-socket", sock, "--netns-prefix", "demo-"]
    say("Start the agent (its node side lives in the network namespace membrane-demo)")
    print(f"{DIM}${RESET} membrane agent run --node-netns {NODE} --state-dir {state} &")
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    servers: list[subprocess.Popen[str]] = []
    try:
        _wait_ready(agent)
        say("Pods: each is a network namespace with a veth to the node and an address")
        ips: dict[str, str] = {}
        netns_of: dict[str, str] = {}
        for name, app in PODS.items():
            membrane("endpoint", "add", f"default/{name}", "--label", f"app={app}")
            netns_of[name] = f"demo-default-{name}"
        membrane("endpoint", "list")
        out = subprocess.run(
            [sys.executable, "-m", "membrane", "endpoint", "list", "-o", "json"],
            capture_output=True,
            text=True,
            check=True,
        )
        for ep in json.loads(out.stdout):
            ips[ep["name"]] = ep["ipv4"]
        for name in PODS:
            servers.append(popen(netns_of[name], [sys.executable, "-m", "http.server", str(PORT)]))
        deadline = time.monotonic() + 10
        while not tcp_ok(netns_of["frontend-1"], ips["backend-1"]):
            if time.monotonic() > deadline:
                raise SystemExit("demo: the pods' web servers did not start")
            time.sleep(0.05)

        say("No policy selects any pod: everything passes")
        _matrix(ips, netns_of)

        path = os.path.join(work, "frontend-backend.yaml")
        with open(path, "w") as f:
            f.write(POLICY)
        say("Import the policy")
        print(f"{DIM}{POLICY}{RESET}")
        membrane("policy", "import", path)
        _matrix(ips, netns_of)

        say("Why is frontend-1 -> frontend-2 dropped?")
        membrane(
            "policy",
            "trace",
            "--src",
            "default/frontend-1",
            "--dst",
            "default/frontend-2",
            "--dport",
            f"{PORT}/TCP",
        )
        say("Flows: every new connection's verdict and every drop, with the deciding policy")
        membrane("observe", "--last", "12")
    finally:
        for proc in servers:
            stop(proc)
        agent.terminate()
        agent.wait(10)
        subprocess.run(
            [*cmd[:3], "agent", "reset", "--yes", "--node-netns", NODE, "--state-dir", state],
            capture_output=True,
            check=False,
        )
    say(f"{BOLD}Agent demo done:{RESET} pods, pins and the node namespace removed.")


if __name__ == "__main__":
    main()
