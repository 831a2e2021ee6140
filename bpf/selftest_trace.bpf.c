// SPDX-License-Identifier: GPL-2.0
/* The loader's tracing test object: one program per tracing hook the tests attach
 * (tracepoint, uprobe, perf_event sampling with stack ids, cgroup connect4), counting only
 * what the test thread does; plus a producer of mixed ring-buffer records for the
 * consumer's slow path. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "abi/selftest.h"
#include "abi/selftest_trace.h"
#include "lib/events.h"

const volatile __u32 target_tid = 0;
const volatile __u32 mixed_count = 0;

EVENTS_RINGBUF();
ABI_EXPORT(selftest_event);

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct selftest_trace_counts);
} counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(max_entries, 1024);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, 127 * sizeof(__u64));
} stacks SEC(".maps");

static __always_inline struct selftest_trace_counts *test_counts(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&counts, &zero);
}

static __always_inline bool is_target(void)
{
	return (__u32)bpf_get_current_pid_tgid() == target_tid;
}

SEC("tracepoint/syscalls/sys_enter_getpid")
int count_getpid(void *ctx)
{
	struct selftest_trace_counts *c = test_counts();

	if (c && is_target())
		__sync_fetch_and_add(&c->getpid, 1);
	return 0;
}

SEC("uprobe")
int count_uprobe(struct pt_regs *ctx)
{
	struct selftest_trace_counts *c = test_counts();

	if (c && is_target())
		__sync_fetch_and_add(&c->uprobe, 1);
	return 0;
}

SEC("perf_event")
int count_sample(struct bpf_perf_event_data *ctx)
{
	struct selftest_trace_counts *c = test_counts();

	if (!c || !is_target())
		return 0;
	__sync_fetch_and_add(&c->samples, 1);
	if (bpf_get_stackid(ctx, &stacks, BPF_F_USER_STACK) >= 0)
		__sync_fetch_and_add(&c->stacks, 1);
	return 0;
}

SEC("cgroup/connect4")
int connect_allow(struct bpf_sock_addr *ctx)
{
	struct selftest_trace_counts *c = test_counts();

	if (c)
		__sync_fetch_and_add(&c->connect_a, 1);
	return 1;
}

SEC("cgroup/connect4")
int connect_deny(struct bpf_sock_addr *ctx)
{
	struct selftest_trace_counts *c = test_counts();

	if (c)
		__sync_fetch_and_add(&c->connect_b, 1);
	return 0; /* connect() fails with EPERM */
}

/* Records of record i, for the ring-buffer consumer's mixed-size path:
 *   i % 3 == 2: reserved, then discarded
 *   i % 5 == 4: 8 bytes (just the seq): shorter than a selftest_event
 *   i % 4 == 1: a selftest_event followed by 8 extra bytes
 *   otherwise:  a selftest_event                                       */
struct selftest_event_long {
	struct selftest_event ev;
	__u64 extra;
};

SEC("xdp")
int emit_mixed(struct xdp_md *ctx)
{
	for (__u32 i = 0; i < mixed_count && i < 256; i++) {
		struct selftest_event_long rec = {};

		rec.ev.seq = i;
		rec.ev.magic = 0x5e1f;
		if (i % 3 == 2) {
			struct selftest_event *ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);

			if (ev)
				bpf_ringbuf_discard(ev, 0);
		} else if (i % 5 == 4) {
			bpf_ringbuf_output(&events, &rec.ev.seq, sizeof(rec.ev.seq), 0);
		} else if (i % 4 == 1) {
			bpf_ringbuf_output(&events, &rec, sizeof(rec), 0);
		} else {
			bpf_ringbuf_output(&events, &rec.ev, sizeof(rec.ev), 0);
		}
	}
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
