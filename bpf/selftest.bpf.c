// SPDX-License-Identifier: GPL-2.0
/* The loader's test object: load-time constants, every map kind the loader handles,
 * and a ring buffer. Tests drive it through BPF_PROG_TEST_RUN. */
#include "include/common.h"
#include "abi/selftest.h"
#include "lib/events.h"

const volatile __u32 verdict = XDP_PASS;
const volatile __u32 event_magic = 0;
const volatile __u32 events_per_run = 1;

EVENTS_RINGBUF();
ABI_EXPORT(selftest_event);

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct selftest_key);
	__type(value, __u64);
} hash_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} percpu_counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 64);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct { __u32 prefixlen; __u8 addr[4]; });
	__type(value, __u32);
} lpm_map SEC(".maps");

__u64 seq = 0;

SEC("xdp")
int selftest_xdp(struct xdp_md *ctx)
{
	__u32 zero = 0;
	__u64 *count = bpf_map_lookup_elem(&percpu_counts, &zero);

	if (count)
		*count += 1;
	for (__u32 i = 0; i < events_per_run && i < 64; i++) {
		struct selftest_event ev = {};

		fill_event_header(&ev.hdr, 1);
		ev.seq = __sync_fetch_and_add(&seq, 1);
		ev.magic = event_magic;
		__builtin_memcpy(ev.tag, "selftest", 9);
		emit_event(&ev, sizeof(ev));
	}
	return verdict;
}

char LICENSE[] SEC("license") = "GPL";
