// SPDX-License-Identifier: GPL-2.0
/* The feature probe's programs: one minimal program per program/attach type, and one per
 * helper worth asking about. The probe (src/membrane/bpf/probe.py) turns autoload on for
 * exactly one of them per load, and creates only the maps that one uses, so a type the
 * kernel refuses cannot hide the others. Attach targets named in the sections exist in
 * every kernel we support; what varies is whether the kernel lets us use them. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

SEC("xdp")
int probe_xdp(struct xdp_md *ctx)
{
	return XDP_PASS;
}

SEC("tc")
int probe_tc(struct __sk_buff *skb)
{
	return 0; /* TC_ACT_OK */
}

SEC("cgroup/connect4")
int probe_connect4(struct bpf_sock_addr *ctx)
{
	return 1; /* allow */
}

SEC("cgroup_skb/ingress")
int probe_cgroup_skb(struct __sk_buff *skb)
{
	return 1; /* allow */
}

SEC("tracepoint/syscalls/sys_enter_getpid")
int probe_tracepoint(void *ctx)
{
	return 0;
}

SEC("raw_tp/sys_enter")
int probe_raw_tp(void *ctx)
{
	return 0;
}

SEC("tp_btf/sched_switch")
int probe_tp_btf(u64 *ctx)
{
	return 0;
}

SEC("kprobe/do_nanosleep")
int probe_kprobe(void *ctx)
{
	return 0;
}

SEC("fentry/do_nanosleep")
int probe_fentry(u64 *ctx)
{
	return 0;
}

SEC("fexit/do_nanosleep")
int probe_fexit(u64 *ctx)
{
	return 0;
}

SEC("lsm/file_open")
int probe_lsm(u64 *ctx)
{
	return 0; /* allow */
}

SEC("uprobe")
int probe_uprobe(void *ctx)
{
	return 0;
}

SEC("perf_event")
int probe_perf_event(void *ctx)
{
	return 0;
}

/* Writes one byte per task, so reading the iterator proves it ran. */
SEC("iter/task")
int probe_iter_task(struct bpf_iter__task *ctx)
{
	char mark = 't';

	if (ctx->task)
		bpf_seq_write(ctx->meta->seq, &mark, sizeof(mark));
	return 0;
}

/* Helpers: these programs are only loaded, never attached; the verifier's verdict on the
 * call is the answer. Signal 0 only checks permissions, should one ever run. */
SEC("tracepoint/syscalls/sys_enter_getpid")
int probe_send_signal(void *ctx)
{
	bpf_send_signal(0);
	return 0;
}

SEC("perf_event")
int probe_get_stack(struct bpf_perf_event_data *ctx)
{
	__u64 ips[8];

	bpf_get_stack(ctx, ips, sizeof(ips), BPF_F_USER_STACK);
	return 0;
}

/* Task-local storage from a tracepoint program (trace open keeps its per-thread state
 * there; kernels that refuse it get a hash keyed by thread id). */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} probe_task_storage_map SEC(".maps");

SEC("tracepoint/syscalls/sys_enter_getpid")
int probe_task_storage(void *ctx)
{
	__u64 *v = bpf_task_storage_get(&probe_task_storage_map, bpf_get_current_task_btf(), 0,
					BPF_LOCAL_STORAGE_GET_F_CREATE);

	if (v)
		*v = 1;
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
