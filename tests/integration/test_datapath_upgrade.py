"""Upgrading the datapath under running connections, in both attach modes: the agent is
restarted with another build of the endpoint object (MEMBRANE_BPF_DIR), first one whose
code differs (another -mcpu), then one whose conntrack entry has another layout (a field
added in front, so every field moves), then this build again. Each time every endpoint's
programs are swapped for the new build's, a changed node map is migrated (its entries
carried over field by field), TCP streams keep flowing, and what policy denies stays
denied. x/a takes no new connections, so what y/a pushes to it on the connection x/a
opened passes only as a reply, through conntrack: an entry lost or misread on the way
stalls that push (x/a sends nothing the push could be re-admitted by)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import cluster_fixture

from membrane.bpf import Map
from membrane.bpf.proginfo import program_info_by_id
from membrane.datapath.endpoint_prog import HOOKS, attached_programs
from membrane.testing.builds import OBJECTS_ENV, build_endpoint_variant
from membrane.testing.cluster import Cluster
from membrane.testing.reachability import MAX_STALL, Peer, Reachability, Stream
from membrane.testing.tc import clsact_filters
from membrane.testing.traffic import listen, socket_in
from membrane.testing.waiting import wait_for

pytestmark = pytest.mark.root

cluster = cluster_fixture(namespaces=("x", "y"), pod_names=("a", "b"))
clsact_cluster = cluster_fixture(namespaces=("x", "y"), pod_names=("a", "b"), attach="clsact")

PODS = ["x/a", "x/b", "y/a", "y/b"]
PUSH_PORT = 90  # no echo server there: the push's own
POLICY = """
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: a-from-x-a, namespace: y}
    spec:
      podSelector: {matchLabels: {pod: a}}
      ingress:
      - from:
        - namespaceSelector: {matchLabels: {ns: x}}
          podSelector: {matchLabels: {pod: a}}
    ---
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: x-a-takes-nothing, namespace: x}
    spec:
      podSelector: {matchLabels: {pod: a}}
      policyTypes: [Ingress]
"""


@pytest.fixture(params=["auto", "clsact"])
def net(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = request.getfixturevalue("cluster" if request.param == "auto" else "clsact_cluster")
    yield c
    if c.agent.env.pop(OBJECTS_ENV, None) is not None:  # a failure left another build
        c.agent.restart()
    c.reset()


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("builds")
    return {
        "code": build_endpoint_variant(root / "code", extra_cflags=["-mcpu=v3"]),
        "layout": build_endpoint_variant(root / "layout", grow=[("ct_entry", "__u64 moved")]),
    }


class Push:
    """The server sends a few bytes every few milliseconds on a connection the client
    opened; the client only reads (its kernel ACKs)."""

    def __init__(self, client: Peer, server: Peer, port: int) -> None:
        listener = listen(server.netns, server.ip, port, backlog=1)
        self.client = socket_in(client.netns)
        self.client.settimeout(5)
        self.client.connect((server.ip, port))
        listener.setblocking(True)
        listener.settimeout(5)
        self.server, _ = listener.accept()
        listener.close()
        self.received = 0
        self.max_gap = 0.0
        self.failure: str | None = None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._send, self._read)]
        for t in self._threads:
            t.start()

    def _send(self) -> None:
        while not self._stop.wait(0.005):
            try:
                self.server.sendall(b"p" * 64)
            except OSError as err:
                self.failure = f"send: {err}"
                return

    def _read(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            try:
                got = len(self.client.recv(65536))
            except OSError as err:
                self.failure = f"after {self.received} bytes: {err}"
                return
            now = time.monotonic()
            self.max_gap, last = max(self.max_gap, now - last), now
            self.received += got

    def flowing(self, more: int = 640) -> None:
        target = self.received + more
        wait_for("pushed bytes to arrive", lambda: self.received >= target or self.failure)
        assert self.failure is None, self.failure

    def close(self) -> None:
        self._stop.set()
        for sock in (self.client, self.server):
            sock.close()
        for t in self._threads:
            t.join(5)


def expected(net: Cluster) -> Reachability:
    reach = net.reach(sources=PODS, destinations=PODS)
    return reach.deny(to="y/a").deny(to="x/a").allow("x/a", "y/a")


def programs(net: Cluster) -> dict[str, dict[str, tuple[int, str]]]:
    """pod -> direction -> (program id, tag), each pod's veth holding one attachment per
    hook (clsact: one filter, as `tc` counts them; tcx: none)."""
    out = {}
    for e in net.agent.endpoints():
        pod = f"{e['namespace']}/{e['name']}"
        attached = attached_programs(str(net.agent.bpf_dir), e["id"])
        assert set(attached) == set(HOOKS), f"{pod}: {attached}"
        out[pod] = {}
        for direction, prog_id in attached.items():
            info = program_info_by_id(prog_id)
            assert info is not None
            out[pod][direction] = (prog_id, info.tag)
            filters = clsact_filters(net.agent.node_netns, e["host_ifname"], direction)
            assert len(filters) == (1 if e["attach_mode"] == "clsact" else 0), (pod, filters)
    return out


def conntrack(net: Cluster) -> tuple[int, int]:
    """(id, value size) of the pinned conntrack map."""
    with Map.from_pin(str(net.agent.bpf_dir / "ct")) as ct:
        return ct.id, ct.value_size


def test_an_upgrade_swaps_every_program_and_no_connection_notices(
    net: Cluster, builds: dict[str, Path]
) -> None:
    net.import_policy(POLICY)
    stream = Stream(net.peers["x/a"], net.peers["y/a"], 80)
    push = Push(net.peers["x/a"], net.peers["y/a"], PUSH_PORT)
    try:
        stream.flowing()
        push.flowing()
        net.check(expected(net))
        for build in ("code", "layout", None):  # None: this build again
            before, ct_before = programs(net), conntrack(net)
            assert net.agent.stop() == 0, net.agent.log_tail()
            if build is None:
                del net.agent.env[OBJECTS_ENV]
            else:
                net.agent.env[OBJECTS_ENV] = str(builds[build])
            net.agent.start()
            after, ct_after = programs(net), conntrack(net)

            assert set(after) == set(before) == set(PODS)
            for pod, attached in after.items():
                for direction, (prog_id, tag) in attached.items():
                    assert prog_id != before[pod][direction][0], f"{build}: {pod} kept its program"
                    assert tag != before[pod][direction][1], f"{build}: {pod} runs the old code"
            if build == "code":  # the same layout: the map itself stays
                assert ct_after == ct_before
            else:  # an entry of 8 bytes more, then less: a new map, entries carried over
                assert ct_after[0] != ct_before[0]
                assert ct_after[1] == ct_before[1] + (8 if build == "layout" else -8)
            stream.flowing()
            push.flowing()
            net.check(expected(net))  # new connections: allowed ones work, denied stay so
        for s in (stream, push):
            assert s.failure is None, s.failure
            assert s.max_gap < MAX_STALL, f"a stream stalled for {s.max_gap:.2f} s"
    finally:
        stream.close()
        push.close()
