"""BPF_PROG_TEST_RUN: run a loaded program on a packet in the kernel, without a device."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from membrane.bpf import _libbpf as L
from membrane.bpf.errors import BpfError
from membrane.bpf.object import Program


@dataclass(frozen=True)
class TestRunResult:
    retval: int
    data: bytes  # the packet after the program (rewrites included)
    duration_ns: int  # kernel-measured mean per repetition
    ctx: bytes = b""


def test_run(
    prog: Program,
    data: bytes,
    *,
    repeat: int = 1,
    ctx: bytes | None = None,
    ctx_out_size: int = 0,
    data_out_size: int | None = None,
) -> TestRunResult:
    """Run `prog` on `data` `repeat` times. For tc programs pass `ctx` as a __sk_buff."""
    size_out = data_out_size or len(data) + 256
    data_in = ctypes.create_string_buffer(data, len(data))
    data_out = ctypes.create_string_buffer(size_out)
    opts = L.TestRunOpts(
        sz=ctypes.sizeof(L.TestRunOpts),
        data_in=ctypes.addressof(data_in),
        data_out=ctypes.addressof(data_out),
        data_size_in=len(data),
        data_size_out=size_out,
        repeat=repeat,
    )
    ctx_in = ctx_out = None
    if ctx is not None:
        ctx_in = ctypes.create_string_buffer(ctx, len(ctx))
        opts.ctx_in, opts.ctx_size_in = ctypes.addressof(ctx_in), len(ctx)
    if ctx_out_size:
        ctx_out = ctypes.create_string_buffer(ctx_out_size)
        opts.ctx_out, opts.ctx_size_out = ctypes.addressof(ctx_out), ctx_out_size
    ret = L.lib.bpf_prog_test_run_opts(prog.fd, ctypes.byref(opts))
    if ret:
        raise BpfError(f"test run of {prog.name}", L.errno_of(ret))
    return TestRunResult(
        retval=opts.retval,
        data=data_out.raw[: opts.data_size_out],
        duration_ns=opts.duration,
        ctx=ctx_out.raw[: opts.ctx_size_out] if ctx_out is not None else b"",
    )


test_run.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
TestRunResult.__test__ = False  # type: ignore[attr-defined]
