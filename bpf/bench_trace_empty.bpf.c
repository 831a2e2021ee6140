// SPDX-License-Identifier: GPL-2.0
/* The floor of bench/trace_open.py: programs that only return, on the tracepoints
 * `membrane trace open` uses. What the workload pays with these attached is what the
 * kernel's syscall tracepoint path costs before any tracer does anything. */
#include "include/trace.h"

SEC("tracepoint/syscalls/sys_enter_openat")
int enter_openat(void *ctx)
{
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_openat")
int exit_openat(void *ctx)
{
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
