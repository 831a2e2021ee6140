"""The kernel drop monitor's user side without a kernel: drop-reason names read from BTF
(BTF made here with libbpf, numbered as two kernel generations number them, and the running
kernel's where it has BTF), the tracepoint's argument count, the load-time constants, and
the packet headers of a drop event."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator

import numpy as np
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6

from membrane.agent import kernel_drops as kd
from membrane.bpf.btf import ENUM, Btf, kernel_btf

KERNEL_BTF = "/sys/kernel/btf/vmlinux"
_P = ctypes.c_void_p
# libbpf's BTF writer, on a handle of our own (the binding declares only what it reads).
_writer = ctypes.CDLL("libbpf.so.1", use_errno=True)
for _name, _args in {
    "btf__new_empty": [],
    "btf__add_int": [_P, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int],
    "btf__add_enum": [_P, ctypes.c_char_p, ctypes.c_uint32],
    "btf__add_enum_value": [_P, ctypes.c_char_p, ctypes.c_int64],
    "btf__add_ptr": [_P, ctypes.c_int],
    "btf__add_func_proto": [_P, ctypes.c_int],
    "btf__add_func_param": [_P, ctypes.c_char_p, ctypes.c_int],
    "btf__add_typedef": [_P, ctypes.c_char_p, ctypes.c_int],
}.items():
    getattr(_writer, _name).restype = _P if _name == "btf__new_empty" else ctypes.c_int
    getattr(_writer, _name).argtypes = _args

# The start of enum skb_drop_reason in Linux 5.17 and in 6.3 and later (SKB_NOT_DROPPED_YET
# came in 5.19, SKB_CONSUMED in 6.3: every reason's number moved).
LINUX_5_17 = ["SKB_DROP_REASON_NOT_SPECIFIED", "SKB_DROP_REASON_NO_SOCKET",
              "SKB_DROP_REASON_PKT_TOO_SMALL", "SKB_DROP_REASON_MAX"]  # fmt: skip
LINUX_6_3 = ["SKB_NOT_DROPPED_YET", "SKB_CONSUMED", *LINUX_5_17[:-1],
             "SKB_DROP_REASON_TC_EGRESS", "SKB_DROP_REASON_MAX"]  # fmt: skip


def made_btf(enumerators: list[str], kfree_skb_args: int) -> Btf:
    """BTF with `enum skb_drop_reason` numbered 0, 1, ... and a `btf_trace_kfree_skb`
    prototype of the context pointer and `kfree_skb_args` arguments."""
    h = _writer.btf__new_empty()
    assert h
    u32 = _writer.btf__add_int(h, b"unsigned int", 4, 0)
    _writer.btf__add_enum(h, b"skb_drop_reason", 4)
    for value, name in enumerate(enumerators):
        assert _writer.btf__add_enum_value(h, name.encode(), value) == 0
    void_ptr = _writer.btf__add_ptr(h, 0)
    proto = _writer.btf__add_func_proto(h, 0)
    for i in range(kfree_skb_args + 1):  # the context pointer, then the tracepoint's
        assert _writer.btf__add_func_param(h, f"a{i}".encode(), void_ptr if i == 0 else u32) == 0
    _writer.btf__add_typedef(h, b"btf_trace_kfree_skb", _writer.btf__add_ptr(h, proto))
    return Btf(h, owned=True)


@pytest.fixture(params=[LINUX_5_17, LINUX_6_3], ids=["5.17", "6.3"])
def numbering(request: pytest.FixtureRequest) -> Iterator[tuple[list[str], Btf]]:
    btf = made_btf(request.param, 3)
    yield request.param, btf
    btf.close()


def raw_enum(btf: Btf) -> dict[str, int]:
    return btf._enumerators(btf.find("skb_drop_reason", ENUM))


def test_reason_names_follow_the_kernels_numbering(numbering: tuple[list[str], Btf]) -> None:
    enumerators, btf = numbering
    names = kd.drop_reason_names(btf)
    # each reason by the number this kernel gives it, without the prefix; MAX is no reason
    assert names == {
        i: c.removeprefix("SKB_DROP_REASON_").removeprefix("SKB_")
        for i, c in enumerate(enumerators)
        if not c.endswith("_MAX")
    }
    no_socket = enumerators.index("SKB_DROP_REASON_NO_SOCKET")
    assert kd.reason_name(names, no_socket) == "NO_SOCKET"
    config = kd.load_config(names)
    assert config["first_drop_reason"] == no_socket  # NOT_SPECIFIED + 1, wherever it is


def test_tracepoint_arguments_from_btf() -> None:
    with_reason, without = made_btf(LINUX_6_3, 4), made_btf(LINUX_5_17, 2)
    assert kd.tracepoint_args(with_reason, "kfree_skb") == 4
    assert kd.tracepoint_args(without, "kfree_skb") == 2  # skb, location: before 5.17
    assert kd.tracepoint_args(with_reason, "no_such_tracepoint") == 0


@pytest.mark.skipif(not os.path.exists(KERNEL_BTF), reason="the kernel has no BTF")
def test_running_kernels_reasons_are_read_not_assumed() -> None:
    btf = kernel_btf()
    try:
        names = kd.drop_reason_names(btf)
    except KeyError:
        pytest.skip("this kernel has no enum skb_drop_reason (Linux < 5.17)")
    raw = raw_enum(btf)
    assert names[raw["SKB_DROP_REASON_NO_SOCKET"]] == "NO_SOCKET"
    config = kd.load_config(names)
    # reasons up to NOT_SPECIFIED are not drops we report, wherever the kernel puts it
    assert config["first_drop_reason"] == raw["SKB_DROP_REASON_NOT_SPECIFIED"] + 1


def test_load_config_ignores_our_own_programs_reasons() -> None:
    names = {0: "NOT_DROPPED_YET", 1: "CONSUMED", 2: "NOT_SPECIFIED", 3: "NO_SOCKET",
             62: "TC_EGRESS", 73: "TC_INGRESS"}  # fmt: skip
    config = kd.load_config(names)
    assert config["first_drop_reason"] == 3
    ignored = [
        int.from_bytes(config["ignored_reasons"][i : i + 4], "little") for i in (0, 4, 8, 12)
    ]
    assert sorted(ignored) == [0, 0, 62, 73]  # XDP: not in this kernel's enum
    # an older numbering (5.17: NOT_SPECIFIED first)
    assert kd.load_config({0: "NOT_SPECIFIED", 1: "NO_SOCKET"})["first_drop_reason"] == 1


def test_subsystem_reasons_are_named_by_their_numbers() -> None:
    names = {3: "NO_SOCKET"}
    assert kd.reason_name(names, 3) == "NO_SOCKET"
    assert kd.reason_name(names, (2 << 16) | 5) == "SUBSYS_2_REASON_5"
    assert kd.reason_name(names, 999) == "999"


def test_headers_of_ipv4_udp_tcp_icmp() -> None:
    udp = kd.parse_headers(bytes(IP(src="198.18.0.1", dst="198.18.0.2") / UDP(sport=5, dport=9)))
    assert udp == kd.PacketHeaders(4, "198.18.0.1", "198.18.0.2", 17, 5, 9, 0)
    tcp = kd.parse_headers(
        bytes(
            IP(src="198.18.0.1", dst="198.18.0.2", options=b"\x01" * 8) / TCP(dport=80, flags="S")
        )
    )
    assert tcp is not None and (tcp.proto, tcp.dport, tcp.tcp_flags) == (6, 80, 0x02)
    icmp = kd.parse_headers(bytes(IP(src="198.18.0.1", dst="198.18.0.2") / ICMP(type=3, code=3)))
    assert icmp is not None and (icmp.sport, icmp.dport) == (3, 3)


def test_headers_of_a_later_fragment_have_no_ports() -> None:
    frag = bytes(IP(src="198.18.0.1", dst="198.18.0.2", frag=100, proto=17) / (b"\x00" * 8))
    assert kd.parse_headers(frag) == kd.PacketHeaders(4, "198.18.0.1", "198.18.0.2", 17)


def test_headers_of_ipv6() -> None:
    pkt = IPv6(src="2001:db8:1::1", dst="2001:db8:1::2") / ICMPv6EchoRequest()
    got = kd.parse_headers(bytes(pkt))
    assert got == kd.PacketHeaders(6, "2001:db8:1::1", "2001:db8:1::2", 58, 128, 0, 0)
    cut = kd.parse_headers(bytes(IPv6(src="2001:db8:1::1", dst="2001:db8:1::2") / UDP())[:42])
    assert cut is not None and (cut.proto, cut.sport) == (17, 0)  # ports not all there


def test_not_ip_is_none() -> None:
    assert kd.parse_headers(b"") is None
    assert kd.parse_headers(b"\x00" * 40) is None
    assert kd.parse_headers(bytes(IP())[:19]) is None


def test_kernel_drops_option() -> None:
    from membrane.agent.config import make_config
    from membrane.errors import UserError

    def config(value: str) -> bool:
        return make_config(
            "/tmp/s", "/tmp/s.sock", None, "198.18.0.0/16", kernel_drops=value
        ).kernel_drops

    assert config("true") and not config("false")
    with pytest.raises(UserError) as err:
        config("maybe")
    assert err.value.field == "kernel-drops"


def test_ring_rows_decode_column_by_column() -> None:
    from membrane.bpf.btf import Btf
    from membrane.bpf.object import object_path

    dtype = Btf.from_file(object_path("drop_monitor")).dtype("kernel_drop_event")
    batch = np.zeros(2, dtype=dtype)
    packet = bytes(IP(src="198.18.0.1", dst="198.18.0.2") / UDP(sport=5, dport=9))
    for i, row in enumerate(batch):
        row["hdr"]["ts_ns"], row["hdr"]["version"], row["hdr"]["type"] = 10 + i, 1, 1
        row["reason"], row["ep_id"], row["ifindex"], row["len"] = 3, 7, 2, 36
        row["ifname"], row["location"] = b"eth0", 0xFFFFFFFF81000000 + i
        row["headers"][: len(packet)] = np.frombuffer(packet, dtype=np.uint8)
        row["headers"][len(packet) :] = 0xAA  # past the bytes read: not theirs
        row["headers_len"] = len(packet) - i  # the second is cut short by one byte
    first, second = kd.decode_batch(batch)
    assert (first.ts_ns, first.reason, first.ep_id, first.ifindex, first.len) == (10, 3, 7, 2, 36)
    assert first.ifname == "eth0" and first.location == 0xFFFFFFFF81000000
    assert first.headers == packet and second.headers == packet[:-1]
    assert kd.parse_headers(first.headers) == kd.PacketHeaders(
        4, "198.18.0.1", "198.18.0.2", 17, 5, 9, 0
    )
