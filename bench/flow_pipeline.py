"""Whether the agent's flow pipeline keeps up with a flood of flow events: a real agent, and a
copy of the endpoint program loaded on the agent's pinned node maps (its `events` ring among
them) run with BPF_PROG_TEST_RUN on one CPU, `repeat` times per burst, on a packet of an
endpoint the datapath has no state for, so every run is a drop with a flow event. Bursts
are paced to --rate events/s for --seconds; two floods on the same agent, the first without
a follower, the second with one.

Counted: events produced (the sum of the repeats), events the agent's flow store ingested
(ServerStatus.seen_flows over the real gRPC socket), the ring buffer's losses (the pinned
events_lost map), and what a `GetFlows follow` client (another process, over the same
socket) received and was told it lost. The follower builds a flow.Flow per event, so it is
slower than the store: what it did not get it must be told, exactly (received + lost =
produced).

Also measured, in this process on rows of the same ring: the old reader's per-event cost
(decode and build a GetFlowsResponse for every row, what the reader did before), and the
new reader's per-batch cost (the numpy metrics count and the hand-over).

    python -m bench.flow_pipeline [--rate N] [--seconds S] [--burst N]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

from bench._common import emit, exit_on_sigterm, machine, packet
from membrane.bpf import Map, test_run
from membrane.bpf.ringbuf import HEADER_SIZE, RingBuffer
from membrane.datapath import load_endpoint
from membrane.datapath.abi import PROG_FROM_CONTAINER
from membrane.hubble import HUBBLE_SOCKET_NAME
from membrane.testing.agent import running_agent

FLOOD_EP_ID = 4000  # an endpoint id the agent never gives: no state, every packet drops
FLOOD_IP = "198.18.250.10"
PEER_IP = "198.18.250.20"
FLOOD_CPU = 1
SAMPLE_ROWS = 10_000  # rows the readers' costs are measured on (< a 1 MiB ring)
SETTLE_S = 10.0  # the longest the store and the follower may take to catch up


def _follower(socket_path: str, ready: Any, stop: Any, out: Any) -> None:
    """GetFlows follow over the real socket; counts flows and notices until told to stop
    and the stream has been quiet for a moment."""
    import grpc

    from membrane.hubble.observer import observer_pb2, observer_pb2_grpc

    channel = grpc.insecure_channel(f"unix:{socket_path}")
    stub = observer_pb2_grpc.ObserverStub(channel)
    call = stub.GetFlows(observer_pb2.GetFlowsRequest(follow=True))
    call.initial_metadata()  # the server sends its headers once the feed is live
    ready.set()
    flows = 0
    lost: dict[str, int] = {}
    first_at = last_at = 0.0
    import threading

    def cancel_when_stopped() -> None:
        stop.wait()
        quiet_since = -1
        while True:  # end once nothing more has come for 1 s
            seen = flows
            time.sleep(1.0)
            if flows == seen and quiet_since == seen:
                break
            quiet_since = flows
        call.cancel()

    threading.Thread(target=cancel_when_stopped, daemon=True).start()
    try:
        for response in call:
            if response.HasField("flow"):
                flows += 1
                last_at = time.monotonic()
                first_at = first_at or last_at
            elif response.HasField("lost_events"):
                source = response.lost_events.source
                from membrane.hubble.flow import flow_pb2

                name = flow_pb2.LostEventSource.Name(source)
                lost[name] = lost.get(name, 0) + response.lost_events.num_events_lost
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.CANCELLED:
            raise
    out.put({"flows": flows, "lost": lost, "active_s": last_at - first_at})


def _seen_flows(socket_path: str) -> int:
    import grpc

    from membrane.hubble.observer import observer_pb2, observer_pb2_grpc

    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        stub = observer_pb2_grpc.ObserverStub(channel)
        return stub.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10).seen_flows


def _lost(events_lost: Map) -> int:
    return int(sum(events_lost.lookup(0)))


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


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
    return {"produced": produced, "wall_s": wall, "kernel_ns_per_event": kernel_ns / produced}


def reader_costs(rows: Any) -> dict[str, float]:
    """Per-event cost of the old reader (decode and build every row) and of the new one
    (count the batch with numpy, hand it over), on the same rows."""
    from types import SimpleNamespace

    from membrane.agent.flows import AgentResolver, RawSegment
    from membrane.metrics.flows import FlowCounts
    from membrane.observe.encode import FlowEncoder
    from membrane.observe.record import event_response, flow_events

    snapshot = SimpleNamespace(
        endpoints={},
        endpoints_by_ip={},
        identity_labels={},
        rules={},
        rule_shapes={},
        host_addresses=(),
    )
    resolver = AgentResolver(snapshot)  # type: ignore[arg-type]
    counts = FlowCounts()
    started = time.perf_counter()
    for event in flow_events(rows):
        event_response(event, resolver, "bench")
    old = (time.perf_counter() - started) / len(rows)
    started = time.perf_counter()
    counts.observe(rows, snapshot)  # type: ignore[arg-type]
    RawSegment(rows, FlowEncoder(resolver, "bench"))
    new = (time.perf_counter() - started) / len(rows)
    return {
        "rows": len(rows),
        "old_reader_us_per_event": old * 1e6,
        "old_reader_max_events_per_s": 1 / old,
        "new_reader_us_per_event": new * 1e6,
        "new_reader_max_events_per_s": 1 / new,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1_200_000, help="target events/s")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--burst", type=int, default=20_000, help="test runs per burst")
    args = parser.parse_args()
    exit_on_sigterm()
    host = machine()
    tag = f"fp{os.getpid()}"
    options = {"extra_args": ["--kernel-drops", "false"]}
    ctx = multiprocessing.get_context("spawn")
    frame = packet(FLOOD_IP, PEER_IP)
    sample = sample_rows(frame)
    with running_agent(tag, log_level="warning", memory_limit=None, **options) as agent:
        socket_path = os.path.join(os.path.dirname(agent.socket), HUBBLE_SOCKET_NAME)
        events_lost = Map.from_pin(str(agent.bpf_dir / "events_lost"))
        ring_bytes = _ring_bytes(agent)
        with load_endpoint(str(agent.bpf_dir), FLOOD_EP_ID, FLOOD_IP) as obj:
            prog = obj.program(PROG_FROM_CONTAINER)

            def one_flood() -> dict[str, float]:
                seen0, lost0, cpu0 = _seen_flows(socket_path), _lost(events_lost), agent.cpu_s()
                made = flood(prog, frame, args.rate, args.seconds, args.burst)
                by_end = _seen_flows(socket_path) - seen0
                lost = _lost(events_lost) - lost0
                settle_started = time.monotonic()
                want = made["produced"] - lost
                _wait_until(lambda: _seen_flows(socket_path) - seen0 >= want, SETTLE_S)
                settle_s = time.monotonic() - settle_started
                ingested = _seen_flows(socket_path) - seen0
                return {
                    **made,
                    "produced_per_s": made["produced"] / made["wall_s"],
                    "ring_buffer_lost": lost,
                    "store_ingested": ingested,
                    "store_ingested_by_flood_end": by_end,
                    "store_ingest_per_s": ingested / (made["wall_s"] + settle_s),
                    "store_catch_up_s_after_flood": settle_s,
                    # the whole agent, a follower's flow building included
                    "agent_cpu_s": agent.cpu_s() - cpu0,
                }

            alone = one_flood()  # no follower: the reader and the store only
            ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
            follower = ctx.Process(target=_follower, args=(socket_path, ready, stop, out))
            follower.start()
            try:
                if not ready.wait(30):
                    raise RuntimeError("the follower did not connect")
                followed = one_flood()
                stop.set()
                got = out.get(timeout=600)
            finally:
                stop.set()
                follower.join(timeout=30)
                if follower.is_alive():
                    follower.kill()
        events_lost.close()
    told_lost = got["lost"].get("HUBBLE_RING_BUFFER", 0)  # flows it was too slow for
    record_bytes = sample.dtype.itemsize + HEADER_SIZE
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
        "without_follower": alone,
        "with_follower": followed,
        "follower": {
            "received": got["flows"],
            "told_lost": got["lost"],
            "received_plus_told_lost": got["flows"] + told_lost,
            "exact": got["flows"] + told_lost == followed["store_ingested"],
            "told_ring_buffer_lost_matches": got["lost"].get("PERF_EVENT_RING_BUFFER", 0)
            == followed["ring_buffer_lost"],
            "received_per_s": got["flows"] / got["active_s"] if got["active_s"] else 0.0,
        },
        "ring": {
            "bytes": ring_bytes,
            "record_bytes": record_bytes,
            "holds_ms_at_1M_per_s": ring_bytes / record_bytes / 1e3,
        },
        "reader_cost": reader_costs(sample),
    }
    f = result["follower"]
    lines = [
        f"{name}: produced {r['produced']:,} at {r['produced_per_s']:,.0f}/s; store ingested "
        f"{r['store_ingested']:,} ({r['store_ingest_per_s']:,.0f}/s), ring-buffer lost "
        f"{r['ring_buffer_lost']:,}"
        for name, r in (("without follower", alone), ("with follower", followed))
    ]
    emit(
        result,
        [
            *lines,
            f"follower received {f['received']:,} ({f['received_per_s']:,.0f}/s), told lost "
            f"{got['lost']}, exact: {f['exact']}",
            f"reader per event: old {result['reader_cost']['old_reader_us_per_event']:.2f} us, "
            f"new {result['reader_cost']['new_reader_us_per_event']:.3f} us",
        ],
    )


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
        raise RuntimeError("no rows to measure the readers' cost on")
    return rows


def _ring_bytes(agent: Any) -> int:
    with Map.from_pin(str(agent.bpf_dir / "events")) as events:
        return int(events.max_entries)


if __name__ == "__main__":
    sys.exit(main())
