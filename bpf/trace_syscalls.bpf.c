// SPDX-License-Identifier: GPL-2.0
/* `membrane trace syscalls`: syscount. Calls, errors and time per syscall (optionally per
 * process), counted in a per-CPU hash in the kernel: no event crosses to user space per
 * call, user space reads the totals once per interval.
 *
 * Raw tracepoints (not the classic raw_syscalls tracepoints): the kernel hands the program
 * its arguments directly instead of first formatting a trace record for every syscall.
 */
#include "include/trace.h"
#include <asm/unistd_64.h>
#include "abi/trace_sys.h"
#include "lib/syscall_time.h"
#include "lib/trace_filter.h"

#define MAX_ERRNO 4095

const volatile bool per_process = false;

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 10240);  /* user space sizes it: syscalls, or processes x syscalls */
	__type(key, struct sys_key);
	__type(value, struct sys_stats);
} syscalls SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);  /* user space sizes it like `syscalls` */
	__type(key, __u32);
	__type(value, struct sys_comm);
} comms SEC(".maps");

SEC("raw_tp/sys_enter")
int sys_enter(struct bpf_raw_tracepoint_args *ctx)
{
	if (trace_skip())
		return 0;
	syscall_entered(ctx->args[1]);
	return 0;
}

/* The process's name as ps shows it: its leader's, whichever thread made the call. */
static __always_inline void remember_comm(__u32 pid, __u64 flags)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct sys_comm comm;

	BPF_CORE_READ_STR_INTO(&comm.comm, task, group_leader, comm);
	bpf_map_update_elem(&comms, &pid, &comm, flags);
}

static __always_inline struct sys_stats *stats_of(struct sys_key *key)
{
	struct sys_stats *stats = bpf_map_lookup_elem(&syscalls, key);
	struct sys_stats fresh = {};

	if (stats)
		return stats;
	/* NOEXIST: another CPU may have inserted the key meanwhile; its entry is as good. */
	bpf_map_update_elem(&syscalls, key, &fresh, BPF_NOEXIST);
	stats = bpf_map_lookup_elem(&syscalls, key);
	if (!stats)
		syscall_uncounted();  /* the map is full */
	else if (per_process)
		remember_comm(key->pid, BPF_NOEXIST);
	return stats;
}

SEC("raw_tp/sys_exit")
int sys_exit(struct bpf_raw_tracepoint_args *ctx)
{
	long ret = ctx->args[1];
	struct sys_stats *stats;
	struct sys_key key = {};
	__u64 delta;
	__s64 nr;

	if (!syscall_exited(&nr, &delta))
		return 0;
	key.nr = nr;
	if (per_process)
		key.pid = bpf_get_current_pid_tgid() >> 32;
	stats = stats_of(&key);
	if (!stats)
		return 0;
	stats->count += 1;
	stats->total_ns += delta;
	if (ret < 0 && ret >= -MAX_ERRNO)
		stats->errors += 1;
	/* After an exec the process goes by its new name. */
	if (per_process && ret == 0 && (nr == __NR_execve || nr == __NR_execveat))
		remember_comm(key.pid, BPF_ANY);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
