"""Whether the agent's flow pipeline keeps up with a flood of flow events, and how fast a
follower of every flow is served.

Floods: a real agent, and a copy of the endpoint program loaded on the agent's pinned node
maps (its `events` ring among them) run with BPF_PROG_TEST_RUN on one CPU, `burst` times per
call, on a packet of an endpoint the datapath has no state for, so every run is a drop with
a flow event, paced to --rate events/s for --seconds. Each run floods the same agent three
times: with no follower; with a `GetFlows(follow=true)` grpcio client (stubs generated from
our protos, in another process, parsing every message, as Hubble's clients do); and with
`membrane observe -f -o json` (our client) writing into a pipe that a counter reads.
Counted per flood: events produced, the datapath ring's losses (the pinned events_lost
map: PERF_EVENT_RING_BUFFER), what the store ingested (ServerStatus.seen_flows), what was
drained but not ingested (the reader's staging queue: OBSERVER_EVENTS_QUEUE), the agent's
CPU; per follower: flows received and its rate over the flood, the lost-events notices it
got by source (received + told lost must equal what was ingested since it joined), its own
CPU per flow, and the agent's CPU per message it was sent (the agent's CPU over that flood
less the no-follower flood's, per message).

Serving (no agent; processes of their own): a store fed at --rate with the flood's rows and
a follower for --serve-seconds, served by our server (hubble.grpc_server) and by grpc.aio
handed the same serialized messages (the simplest alternative), each to a grpcio follower
and to a raw one (hubble.wire, messages counted, not parsed: what the server can send when
the client costs next to nothing); each server's CPU per message, less the CPU of feeding
alone.

Costs, on the flood's rows in this process: building a flow.Flow per event (what the agent
did before) against encoding batches (observe.encode) of equal events and of events that
each have their own source port, parsing one back (what a filter or a query costs per
item), and the reader's per-batch work.

    python -m bench.flow_pipeline [--rate N] [--seconds S] [--burst N] [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bench._common import emit, exit_on_sigterm, machine, packet
from membrane.bpf import Map, test_run
from membrane.bpf.ringbuf import HEADER_SIZE, RingBuffer
from membrane.datapath import load_endpoint
from membrane.datapath.abi import PROG_FROM_CONTAINER
from membrane.hubble import HUBBLE_SOCKET_NAME
from membrane.testing.agent import membrane_command, running_agent

FLOOD_EP_ID = 4000  # an endpoint id the agent never gives: no state, every packet drops
FLOOD_IP = "198.18.250.10"
PEER_IP = "198.18.250.20"
FLOOD_CPU = 1
SAMPLE_ROWS = 10_000  # rows the costs are measured on (< a 1 MiB ring)
SETTLE_S = 10.0  # the longest the store and a follower may take to catch up
SEGMENT_ROWS = 4096  # rows per batch the serving comparison feeds its store
PROGRESS_EVERY = 1000  # a follower notes the time every this many flows
QUIET_S = 1.0  # a follower has caught up once nothing came for this long
HERE = [sys.executable, "-m", "bench.flow_pipeline"]


# ---- followers (processes of their own) -------------------------------------------------------
class Tally:
    """A follower's counts: flows with the time every PROGRESS_EVERY, notices by source."""

    def __init__(self) -> None:
        self.flows = 0
        self.lost: dict[str, int] = {}
        self.progress: list[tuple[float, int]] = []

    def flow(self) -> None:
        self.flows += 1
        if self.flows % PROGRESS_EVERY == 1:
            self.progress.append((time.monotonic(), self.flows))

    def notice(self, source: str, count: int) -> None:
        self.lost[source] = self.lost.get(source, 0) + count

    def end_when_quiet(self, end: Callable[[], None]) -> None:
        """On SIGUSR1 (the flood is over): `end()` once no flow came for QUIET_S."""

        def watch() -> None:
            seen = -1
            while seen != self.flows:
                seen = self.flows
                time.sleep(QUIET_S)
            end()

        signal.signal(
            signal.SIGUSR1, lambda *_: threading.Thread(target=watch, daemon=True).start()
        )

    def report(self, cpu_s: float | None = None) -> None:
        """The counts as JSON, with `cpu_s` (default: this process's CPU)."""
        self.progress.append((time.monotonic(), self.flows))
        if cpu_s is None:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu_s = usage.ru_utime + usage.ru_stime
        print(json.dumps({**self.__dict__, "cpu_s": cpu_s}), flush=True)


def follow_grpc(address: str) -> None:
    """A grpcio GetFlows(follow=true) client until SIGINT: "ready" once the feed is live,
    then its Tally as JSON."""
    import grpc

    from membrane.hubble.flow import flow_pb2
    from membrane.hubble.observer import observer_pb2, observer_pb2_grpc

    channel = grpc.insecure_channel(address)
    call = observer_pb2_grpc.ObserverStub(channel).GetFlows(
        observer_pb2.GetFlowsRequest(follow=True)
    )
    call.initial_metadata()  # the server sends its headers once the feed is live
    tally = Tally()
    tally.end_when_quiet(call.cancel)
    signal.signal(signal.SIGINT, lambda *_: call.cancel())  # now
    print("ready", flush=True)
    try:
        for response in call:
            if response.HasField("flow"):
                tally.flow()
            elif response.HasField("lost_events"):
                lost = response.lost_events
                tally.notice(flow_pb2.LostEventSource.Name(lost.source), lost.num_events_lost)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.CANCELLED:
            raise
    tally.report()


def follow_raw(address: str) -> None:
    """GetFlows(follow=true) through hubble.wire, the messages counted, not parsed (a
    notice is): what the server can send when the client costs next to nothing."""
    from membrane.hubble import wire
    from membrane.hubble.flow import flow_pb2
    from membrane.hubble.observer import observer_pb2

    channel = wire.Channel(address)
    request = observer_pb2.GetFlowsRequest(follow=True).SerializeToString()
    stream = channel.stream("/observer.Observer/GetFlows", request)
    tally = Tally()
    stopping = threading.Event()
    tally.end_when_quiet(stopping.set)
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    print("ready", flush=True)
    for message in stream:
        if message[:1] == b"\x0a":  # field 1: a flow
            tally.flow()
        else:
            lost = observer_pb2.GetFlowsResponse.FromString(message).lost_events
            tally.notice(flow_pb2.LostEventSource.Name(lost.source), lost.num_events_lost)
        if stopping.is_set():
            break
    stream.close()
    tally.report()


def count_json(observe_pid: int) -> None:
    """`membrane observe -o json` lines from stdin until EOF: "ready" (on stderr) at the
    first, then the Tally as JSON, with that observe's CPU; observe is ended (SIGINT, its
    Ctrl-C) once quiet after SIGUSR1."""
    tally = Tally()
    cpu = [0.0]

    def end_observe() -> None:
        cpu[0] = _process_cpu_s(observe_pid)
        os.kill(observe_pid, signal.SIGINT)  # how a follow ends: quietly, exit 0

    tally.end_when_quiet(end_observe)
    signal.signal(signal.SIGUSR2, lambda *_: tally.__init__())  # warmed up: count from here
    for line in sys.stdin.buffer:
        if line.startswith(b'{"flow"'):
            tally.flow()
            if tally.flows == 1:
                print("ready", file=sys.stderr, flush=True)
        elif b'"lost_events"' in line:
            lost = json.loads(line)["lost_events"]
            tally.notice(lost["source"], int(lost["num_events_lost"]))
    tally.report(cpu[0])


@contextmanager
def grpc_follower(address: str, raw: bool = False) -> Iterator[Callable[..., dict[str, Any]]]:
    """A grpcio follower (`raw`: follow_raw's) in a process of its own; yields `finish`."""
    option = "--follow-raw" if raw else "--follow-grpc"
    proc = subprocess.Popen([*HERE, option, address], stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout is None or proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the follower did not connect")

        def finish(now: bool = False) -> dict[str, Any]:
            """Its counts: `now`, or once it caught up (the flood is over)."""
            proc.send_signal(signal.SIGINT if now else signal.SIGUSR1)
            out, _ = proc.communicate(timeout=120)
            return json.loads(out)

        yield finish
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextmanager
def observe_follower(
    address: str, api_env: dict[str, str]
) -> Iterator[tuple[Callable[[], dict[str, Any]], Callable[[], bool], Callable[[], None]]]:
    """`membrane observe -f -o json` into a counter: (finish, ready, mark): the flows it
    saw and its own CPU; whether it has shown a flow (blocks until it has, or ends); count
    from zero."""
    observe = subprocess.Popen(
        [membrane_command(), "observe", "--server", address, "-f", "-o", "json"],
        stdout=subprocess.PIPE,
        env=api_env,
    )
    counter = subprocess.Popen(
        [*HERE, "--count-json", str(observe.pid)],
        stdin=observe.stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert observe.stdout is not None
    observe.stdout.close()  # the counter's now
    try:

        def ready() -> bool:
            assert counter.stderr is not None
            return counter.stderr.readline().strip() == "ready"

        def finish() -> dict[str, Any]:
            counter.send_signal(signal.SIGUSR1)  # the flood is over: end once caught up
            out, _ = counter.communicate(timeout=120)
            observe.wait(timeout=60)
            return json.loads(out)

        def mark() -> None:
            counter.send_signal(signal.SIGUSR2)
            time.sleep(0.1)  # the signal is handled between two lines: none are coming

        yield finish, ready, mark
    finally:
        for proc in (observe, counter):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- floods ----------------------------------------------------------------------------------
def flood(prog: Any, frame: bytes, rate: float, seconds: float, burst: int) -> dict[str, float]:
    """Bursts of `burst` runs, paced to `rate` runs/s, on FLOOD_CPU."""
    os.sched_setaffinity(0, {FLOOD_CPU % os.cpu_count()})
    produced, kernel_ns = 0, 0
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        ahead = produced / rate - elapsed
        if ahead > 0:
            time.sleep(ahead)  # pacing to the target rate, not waiting for a condition
        result = test_run(prog, frame, repeat=burst)
        produced += burst
        kernel_ns += result.duration_ns * burst
    wall = time.monotonic() - started
    os.sched_setaffinity(0, range(os.cpu_count() or 1))
    return {
        "produced": produced,
        "started": started,
        "wall_s": wall,
        "produced_per_s": produced / wall,
        "kernel_ns_per_event": kernel_ns / produced,
    }


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _rate_between(progress: list[tuple[float, int]], start: float, end: float) -> float:
    """Flows per second a follower received between two moments (its progress notes)."""
    inside = [(t, n) for t, n in progress if start <= t <= end]
    if len(inside) < 2 or inside[-1][0] == inside[0][0]:
        return 0.0
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


class Pipeline:
    """The agent, its flood program and the counters a flood reads."""

    def __init__(self, agent: Any, prog: Any, frame: bytes, args: argparse.Namespace) -> None:
        from membrane.hubble.client import ObserverClient

        self.agent, self.prog, self.frame, self.args = agent, prog, frame, args
        self.address = "unix://" + os.path.join(os.path.dirname(agent.socket), HUBBLE_SOCKET_NAME)
        self.client = ObserverClient.connect(self.address)
        self.events_lost = Map.from_pin(str(agent.bpf_dir / "events_lost"))

    def seen(self) -> int:
        return self.client.server_status().seen_flows

    def ring_lost(self) -> int:
        return int(sum(self.events_lost.lookup(0)))

    def one_flood(self, before: dict[str, int] | None = None) -> dict[str, Any]:
        """A flood, then until the store took all the ring gave it (or SETTLE_S)."""
        seen0, lost0, cpu0 = self.seen(), self.ring_lost(), self.agent.cpu_s()
        made = flood(self.prog, self.frame, self.args.rate, self.args.seconds, self.args.burst)
        by_end = self.seen() - seen0
        settle_started = time.monotonic()

        last = [-1]

        def settled() -> bool:
            # all the ring gave, or nothing more for a while (some dropped after the ring)
            seen, still = self.seen() - seen0, time.monotonic() - settle_started > 1.0
            done = seen >= made["produced"] - (self.ring_lost() - lost0) or (
                still and seen == last[0]
            )
            last[0] = seen
            return done

        _wait_until(settled, SETTLE_S)
        settle_s = time.monotonic() - settle_started
        ingested = self.seen() - seen0
        lost = self.ring_lost() - lost0
        return {
            **made,
            "ring_buffer_lost": lost,
            "store_ingested": ingested,
            "not_ingested": made["produced"] - lost - ingested,  # dropped after the ring
            "store_ingested_by_flood_end": by_end,
            "store_ingest_per_s": ingested / (made["wall_s"] + settle_s),
            "store_catch_up_s_after_flood": settle_s,
            "agent_cpu_s": self.agent.cpu_s() - cpu0,  # the whole agent, serving included
            "ended": time.monotonic(),
        }

    def followed(self, kind: str, alone: dict[str, Any]) -> dict[str, Any]:
        """A flood with a follower of `kind` (grpc, observe) of every flow."""
        if kind == "grpc":
            seen0 = self.seen()  # nothing flows until it joined
            with grpc_follower(self.address) as finish:
                flooded = self.one_flood()
                got = finish()
        else:
            with observe_follower(self.address, self.agent.env) as (finish, ready, mark):
                # it prints nothing before a flow: a few until it has shown one, then
                # (once they have all reached it) it counts from zero
                waiter = threading.Thread(target=ready)
                waiter.start()
                while waiter.is_alive():
                    test_run(self.prog, self.frame, repeat=100)
                    waiter.join(0.05)
                time.sleep(QUIET_S)
                mark()
                seen0 = self.seen()
                flooded = self.one_flood()
                got = finish()
        ingested = self.seen() - seen0  # since it counts
        told = got["lost"].get("HUBBLE_RING_BUFFER", 0)
        received_in_flood = _count_between(got["progress"], flooded["started"], flooded["ended"])
        extra_cpu = flooded["agent_cpu_s"] - alone["agent_cpu_s"]
        flooded["follower"] = {
            "received": got["flows"],
            "told_lost": got["lost"],
            "received_plus_told_lost": got["flows"] + told,
            "ingested_since_it_joined": ingested,
            "exact": got["flows"] + told == ingested,
            "received_per_s": _rate_between(got["progress"], flooded["started"], flooded["ended"]),
            "client_cpu_us_per_flow": got["cpu_s"] / max(got["flows"], 1) * 1e6,
            "agent_cpu_us_per_message": extra_cpu / max(received_in_flood, 1) * 1e6,
        }
        return flooded


def _count_between(progress: list[tuple[float, int]], start: float, end: float) -> int:
    inside = [n for t, n in progress if start <= t <= end]
    return inside[-1] - inside[0] if len(inside) > 1 else 0


# ---- serving comparison (no agent) -----------------------------------------------------------
def serve(kind: str, rows_file: str, rate: float, socket_path: str) -> None:
    """A store fed at `rate` with the rows of `rows_file`, served by `kind` (ours,
    grpc-aio, none) until SIGINT; prints "ready", then its CPU."""
    import numpy as np

    from membrane.agent.flows import AgentResolver, RawSegment
    from membrane.observe.encode import FlowEncoder
    from membrane.observe.store import FlowStore

    rows = np.load(rows_file)
    reps = -(-SEGMENT_ROWS // len(rows))
    batch = np.concatenate([rows] * reps)[:SEGMENT_ROWS]
    encoder = FlowEncoder(AgentResolver(_empty_snapshot()), "bench")  # type: ignore[arg-type]
    store = FlowStore(capacity=65535, node_name="bench")

    async def feed() -> None:
        fed, started = 0, time.monotonic()
        while True:
            store.extend(RawSegment(batch.copy(), encoder))
            fed += len(batch)
            await asyncio.sleep(max(fed / rate - (time.monotonic() - started), 0))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        server: Any = None
        if kind == "ours":
            from membrane.hubble.server import HubbleServer, ObserverService

            server = HubbleServer(ObserverService(store, "bench"), socket_path)
            await server.start()
        elif kind == "grpc-aio":
            server = await _grpc_aio_server(store, socket_path)
        feeding = asyncio.ensure_future(feed())
        print("ready", flush=True)
        cpu0 = time.process_time()
        await stop.wait()
        cpu = time.process_time() - cpu0
        feeding.cancel()
        print(json.dumps({"cpu_s": cpu}), flush=True)
        if server is not None:
            await server.stop(0)

    asyncio.run(main())


async def _grpc_aio_server(store: Any, socket_path: str) -> Any:
    """grpc.aio serving GetFlows follow from the same store, handed serialized messages
    (no re-serializing: the response serializer is the identity)."""
    import grpc

    from membrane.observe.store import FlowQuery, SubscriptionClosed

    async def get_flows(request: bytes, context: Any) -> Any:
        sub = store.subscribe(FlowQuery(follow=True))
        await context.send_initial_metadata(())
        try:
            while True:
                try:
                    messages = await sub.messages(256)
                except SubscriptionClosed:
                    return
                for message in messages:
                    yield message
        finally:
            store.unsubscribe(sub)

    handler = grpc.unary_stream_rpc_method_handler(
        get_flows, request_deserializer=None, response_serializer=None
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("observer.Observer", {"GetFlows": handler}),)
    )
    server.add_insecure_port("unix:" + socket_path)
    await server.start()
    return server


def _empty_snapshot() -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(
        endpoints={},
        endpoints_by_ip={},
        identity_labels={},
        rules={},
        rule_shapes={},
        host_addresses=(),
    )


def serving(rows: Any, rate: float, seconds: float) -> dict[str, Any]:
    """Each server for `seconds` with a grpcio follower, and with a raw one (and feeding
    alone, the CPU to take off)."""
    import numpy as np

    workdir = tempfile.mkdtemp(prefix="fp-serve-")
    rows_file = os.path.join(workdir, "rows.npy")
    np.save(rows_file, rows)
    out: dict[str, Any] = {}
    try:
        cases = [("none", None), *((k, c) for k in ("ours", "grpc-aio") for c in ("grpc", "raw"))]
        for kind, client in cases:
            path = os.path.join(workdir, f"{kind}-{client}.sock")
            server = subprocess.Popen(
                [*HERE, "--serve", kind, rows_file, str(rate), path],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert server.stdout is not None
                if server.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"the {kind} server did not start")
                got = None
                if client is None:
                    time.sleep(seconds)  # feeding alone, for as long as the others
                else:
                    with grpc_follower("unix:" + path, raw=client == "raw") as finish:
                        time.sleep(seconds)  # the follower runs for the measured time
                        got = finish(now=True)
                server.send_signal(signal.SIGINT)
                result, _ = server.communicate(timeout=60)
            finally:
                if server.poll() is None:
                    server.kill()
                    server.wait()
            cpu = json.loads(result)["cpu_s"]
            if client is None:
                out["feeding_alone_cpu_s"] = cpu
                continue
            assert got is not None
            received = got["flows"]
            extra = cpu - out["feeding_alone_cpu_s"]
            out[f"{kind}, {client} client"] = {
                "flows_per_s": received / seconds,
                "server_cpu_us_per_message": extra / max(received, 1) * 1e6,
                "client_cpu_us_per_flow": got["cpu_s"] / max(received, 1) * 1e6,
                "server_cpu_s": cpu,
                "received": received,
            }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


# ---- costs in this process --------------------------------------------------------------------
def costs(rows: Any) -> dict[str, float]:
    """Per event: building a flow.Flow (the old way), encoding batches of equal rows and of
    rows with their own source ports, parsing a message back, the reader's batch work."""
    import numpy as np

    from membrane.agent.flows import AgentResolver, RawSegment
    from membrane.hubble.observer import observer_pb2
    from membrane.metrics.flows import FlowCounts
    from membrane.observe.encode import FlowEncoder
    from membrane.observe.record import event_response, flow_events, supported_rows

    snapshot = _empty_snapshot()
    resolver = AgentResolver(snapshot)
    n = len(rows)

    def per_event(fn: Callable[[], Any], count: int = n) -> float:
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) / count * 1e6

    def encode_all(encoder: FlowEncoder, batch: Any) -> list[bytes]:
        out: list[bytes] = []
        for at in range(0, len(batch), 256):
            out += encoder.encode(batch[at : at + 256], at, 1, 0)
        return out

    build = per_event(lambda: [event_response(e, resolver, "bench") for e in flow_events(rows)])
    warm = FlowEncoder(resolver, "bench")
    encode_all(warm, rows)
    equal = per_event(lambda: encode_all(warm, rows))
    distinct = rows.copy()
    distinct["sport"] = np.arange(n) % 65536
    ports = per_event(lambda: encode_all(FlowEncoder(resolver, "bench"), distinct))
    messages = encode_all(warm, rows)
    parse = per_event(lambda: [observer_pb2.GetFlowsResponse.FromString(m) for m in messages])
    hand_over = per_event(lambda: RawSegment(rows[supported_rows(rows)], warm))
    counts = FlowCounts()
    with_metrics = per_event(lambda: counts.observe(rows, snapshot))  # type: ignore[arg-type]
    # The reader names each row's Service as it reads it: the flood's peer a Service's
    # backend, so every row is looked at (one lookup per distinct connection per batch).
    via_backend = FlowEncoder(_backend_resolver(), "bench")
    backend_equal = per_event(lambda: RawSegment(rows[supported_rows(rows)], via_backend))
    backend_ports = per_event(lambda: RawSegment(distinct, via_backend))
    return {
        "rows": n,
        "build_flow_us_per_event": build,
        "encode_equal_events_us_per_event": equal,
        "encode_own_port_each_us_per_event": ports,
        "parse_message_us_per_event": parse,
        "reader_batch_us_per_event": hand_over,
        "reader_metrics_count_us_per_event": with_metrics,
        "reader_batch_peer_is_backend_us_per_event": backend_equal,
        "reader_batch_peer_is_backend_own_port_each_us_per_event": backend_ports,
    }


def _backend_resolver() -> Any:
    """A resolver for which the flood's peer (PEER_IP:5201/TCP) is a Service's backend and
    its source an endpoint; the socket LB's record is a dict here, not the BPF map (a
    lookup of that costs ~1-2 us more, once per distinct connection of a batch)."""
    from types import SimpleNamespace

    from membrane.agent.flows import AgentResolver
    from membrane.service.manager import FlowIndex

    backend = (PEER_IP, 5201, 6)
    index = FlowIndex(backends=frozenset({backend}), services={1: ("bench", "svc")})
    records = {(None, *backend): 1}

    def connection_service(ns: Any, address: str, port: int, proto: int) -> Any:
        revnat = records.get((ns, address, port, proto))
        return None if revnat is None else index.services.get(revnat)

    services = SimpleNamespace(
        flow_index=index, node_netns=None, connection_service=connection_service
    )
    snapshot = _empty_snapshot()
    snapshot.endpoints_by_ip = {FLOOD_IP: SimpleNamespace(netns=None)}
    return AgentResolver(snapshot, services)  # type: ignore[arg-type]


def sample_rows(frame: bytes) -> Any:
    """Flow events of the flood's packet as the agent's reader gets them (a RingBuffer
    batch), from node maps and a ring of our own in a scratch pin directory."""
    from membrane.bpf.fs import PIN_ROOT, ensure_bpffs
    from membrane.datapath import NodeMaps

    ensure_bpffs()
    pin_dir = os.path.join(PIN_ROOT, f"bench-{secrets.token_hex(4)}")
    try:
        with NodeMaps.open(pin_dir) as maps, load_endpoint(pin_dir, FLOOD_EP_ID, FLOOD_IP) as obj:
            ring = RingBuffer(maps.events, dtype=maps.flow_event_dtype(), lost_map=maps.events_lost)
            with ring:
                test_run(obj.program(PROG_FROM_CONTAINER), frame, repeat=SAMPLE_ROWS)
                rows = ring.drain()
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)
    if not len(rows):
        raise RuntimeError("no rows to measure the costs on")
    return rows


def _ring_bytes(agent: Any) -> int:
    with Map.from_pin(str(agent.bpf_dir / "events")) as events:
        return int(events.max_entries)


# ---- main ------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1_200_000, help="target events/s")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--burst", type=int, default=20_000, help="test runs per burst")
    parser.add_argument("--runs", type=int, default=1, help="rounds of the three floods")
    parser.add_argument("--serve-seconds", type=float, default=3.0)
    parser.add_argument("--follow-grpc", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--follow-raw", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--count-json", metavar="OBSERVE_PID", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.follow_grpc:
        return follow_grpc(args.follow_grpc)
    if args.follow_raw:
        return follow_raw(args.follow_raw)
    if args.count_json:
        return count_json(args.count_json)
    if args.serve:
        kind, rows_file, rate, path = args.serve
        return serve(kind, rows_file, float(rate), path)
    exit_on_sigterm()
    host = machine()
    frame = packet(FLOOD_IP, PEER_IP)
    rows = sample_rows(frame)
    runs = []
    options = {"extra_args": ["--kernel-drops", "false"]}
    with running_agent(
        f"fp{os.getpid()}", log_level="warning", memory_limit=None, **options
    ) as agent:
        ring_bytes = _ring_bytes(agent)
        with load_endpoint(str(agent.bpf_dir), FLOOD_EP_ID, FLOOD_IP) as obj:
            pipeline = Pipeline(agent, obj.program(PROG_FROM_CONTAINER), frame, args)
            for _ in range(args.runs):
                alone = pipeline.one_flood()
                grpc_run = pipeline.followed("grpc", alone)
                observe_run = pipeline.followed("observe", alone)
                runs.append({"no_follower": alone, "grpc": grpc_run, "observe": observe_run})
            pipeline.client.close()
            pipeline.events_lost.close()
    result = {
        "bench": "flow_pipeline",
        "machine": host,
        "method": {
            "rate_target_per_s": args.rate,
            "seconds": args.seconds,
            "burst": args.burst,
            "flood_cpu": FLOOD_CPU,
            "event": "policy drop (no endpoint state) from from_container via test_run",
        },
        "runs": runs,
        "serving": serving(rows, args.rate, args.serve_seconds),
        "costs": costs(rows),
        "ring": {
            "bytes": ring_bytes,
            "record_bytes": rows.dtype.itemsize + HEADER_SIZE,
            "holds_ms_at_1M_per_s": ring_bytes / (rows.dtype.itemsize + HEADER_SIZE) / 1e3,
        },
    }
    emit(result, summary(result))


def summary(result: dict[str, Any]) -> list[str]:
    lines = []
    for i, run in enumerate(result["runs"]):
        for name in ("no_follower", "grpc", "observe"):
            r = run[name]
            line = (
                f"run {i} {name:11}: produced {r['produced']:,} at {r['produced_per_s']:,.0f}/s; "
                f"ring lost {r['ring_buffer_lost']:,}, not ingested {r['not_ingested']:,}"
            )
            if "follower" in r:
                f = r["follower"]
                line += (
                    f"; follower {f['received_per_s']:,.0f} flows/s (client "
                    f"{f['client_cpu_us_per_flow']:.1f} us, agent "
                    f"{f['agent_cpu_us_per_message']:.1f} us a flow), told lost "
                    f"{f['told_lost']}, exact {f['exact']}"
                )
            lines.append(line)
    for case, r in result["serving"].items():
        if isinstance(r, dict):
            lines.append(
                f"serving {case:22}: {r['flows_per_s']:,.0f} flows/s, server "
                f"{r['server_cpu_us_per_message']:.1f} us/message, client "
                f"{r['client_cpu_us_per_flow']:.1f} us/flow"
            )
    c = result["costs"]
    lines.append(
        f"per event: build {c['build_flow_us_per_event']:.1f} us, encode equal "
        f"{c['encode_equal_events_us_per_event']:.2f} us / own port "
        f"{c['encode_own_port_each_us_per_event']:.1f} us, parse "
        f"{c['parse_message_us_per_event']:.1f} us, reader batch "
        f"{c['reader_batch_us_per_event']:.3f} us"
    )
    return lines


if __name__ == "__main__":
    sys.exit(main())
