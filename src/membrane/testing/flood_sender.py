"""Send paced traffic from the namespace this runs in, then print {"sent", "failed",
"seconds"} as JSON (failed: sends the kernel refused, e.g. ENOBUFS). Run as a program
(`python flood_sender.py SPEC`), so that it has a CPU and a GIL of its own beside the
receiver.

SPEC (JSON):
    kind      "udp": datagrams from an ordinary socket (legitimate traffic)
              "spoof-udp": raw IPv4/UDP with sources cycling through `sources`
              "syn": raw IPv4/TCP SYNs with sources cycling through `sources`
    dst, port, pps, seconds, size (payload bytes), sources (a prefix: "198.19.0.0/16")

Pacing: every millisecond the sender catches up with `pps * elapsed`, so the rate holds
on average when a tick is late, but never by more than 5 ms of traffic: a sender held up
for longer skips the rest (the printed counts are what it sent).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import sys
import time


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def raw_packets(kind: str, sources: str, dst: str, port: int, size: int, count: int) -> list[bytes]:
    """`count` IPv4 packets from successive addresses of `sources` (checksums valid: the
    kernel fills only the IP header's)."""
    net = ipaddress.ip_network(sources)
    dst_b = ipaddress.ip_address(dst).packed
    out = []
    for i in range(count):
        src_b = net[i % net.num_addresses].packed
        sport = 1024 + i % 60000
        if kind == "syn":
            proto = socket.IPPROTO_TCP
            l4 = struct.pack("!HHIIBBHHH", sport, port, i, 0, 5 << 4, 0x02, 64240, 0, 0)
        else:
            proto = socket.IPPROTO_UDP
            l4 = struct.pack("!HHHH", sport, port, 8 + size, 0) + b"f" * size
        pseudo = src_b + dst_b + struct.pack("!BBH", 0, proto, len(l4))
        check = _checksum(pseudo + l4)
        at = 16 if kind == "syn" else 6
        l4 = l4[:at] + struct.pack("!H", check) + l4[at + 2 :]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0, src_b, dst_b)
        out.append(ip + l4)
    return out


def main() -> None:
    spec = json.loads(sys.argv[1])
    dst, port, pps, seconds = spec["dst"], spec["port"], spec["pps"], spec["seconds"]
    if spec["kind"] == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        payload = b"l" * spec.get("size", 32)

        def send(i: int) -> None:
            sock.sendto(payload, (dst, port))

    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        packets = raw_packets(
            spec["kind"], spec["sources"], dst, port, spec.get("size", 32), spec.get("count", 4096)
        )

        def send(i: int) -> None:
            sock.sendto(packets[i % len(packets)], (dst, 0))

    at = sent = failed = 0  # at: the schedule's position; sent: what was sent
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(elapsed * pps)
        # held up (no CPU) for longer than 5 ms, skip the rest rather than burst it out:
        # a legitimate client's stream stays within a rate limit's burst
        at = max(at, due - max(1, pps // 200))
        while at < due:
            try:
                send(at)
                sent += 1
            except OSError:  # a full queue (ENOBUFS) or no neighbour yet
                failed += 1
            at += 1
        time.sleep(0.001)
    result = {"sent": sent, "failed": failed, "seconds": time.monotonic() - start}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
