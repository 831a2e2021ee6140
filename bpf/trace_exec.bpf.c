// SPDX-License-Identifier: GPL-2.0
/* `membrane trace exec`: execsnoop on the syscalls tracepoints (execve, execveat).
 *
 * Entry copies the filename and argv into a per-thread stash: after a successful exec the
 * caller's memory is gone, so exit could not read them any more. Exit adds the result,
 * the new command name and the parent, and emits one event of the bytes used (arguments
 * as long as they are, struct exec_event in abi/trace_proc.h).
 *
 * A non-leader thread that execs takes over the leader's pid (de_thread), so its exit
 * runs under another thread id than its entry: sched_process_exec, which reports the old
 * id, moves the stash to the new one.
 */
#include "include/trace.h"
#include "abi/trace_proc.h"
#include "lib/events.h"
#include "lib/task.h"
#include "lib/trace_filter.h"

EVENTS_RINGBUF();
ABI_EXPORT(exec_event);

const volatile bool failed_only = false;  /* --failed: emit only execs that failed */

/* Threads between exec entry and exit; one that finds the map full is counted as lost.
 * Records are ~16 KiB (struct exec_event): allocated per exec, not preallocated. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct exec_event);
} starts SEC(".maps");

static const struct exec_event empty_event = {};

/* argv after the path, each argument with its NUL, as long as the room left allows. */
static __always_inline void copy_argv(struct exec_event *ev, const char *const *argv)
{
	__u32 off = ev->path_len;
	const char *arg;
	long len;
	char last;
	int i;

	for (i = 0; i < EXEC_MAX_ARGS; i++) {
		__u32 at, room;

		if (bpf_probe_read_user(&arg, sizeof(arg), &argv[i]) || !arg) {
			ev->data_len = off;
			return;
		}
		if (off >= EXEC_DATA_MAX) {
			ev->flags |= EXEC_ARGS_MORE;  /* no room for this one */
			break;
		}
		/* at = off, masked where the verifier sees it (the barrier keeps the compiler
		 * from dropping a mask it knows changes nothing): room is then 1..EXEC_DATA_MAX */
		at = off;
		barrier_var(at);
		at &= EXEC_DATA_MAX - 1;
		room = EXEC_DATA_MAX - at;
		len = bpf_probe_read_user_str(&ev->data[at], room, arg);
		if (len <= 0) {
			ev->flags |= EXEC_ARG_FAULT;
			break;
		}
		/* A copy that filled the room is either exactly that long or cut. */
		if (len == room && (bpf_probe_read_user(&last, 1, arg + room - 1) || last)) {
			ev->flags |= EXEC_ARG_CUT;
			off += len;
			ev->argc = i + 1;
			if (!bpf_probe_read_user(&arg, sizeof(arg), &argv[i + 1]) && arg)
				ev->flags |= EXEC_ARGS_MORE;
			break;
		}
		off += len;
		ev->argc = i + 1;
	}
	if (i == EXEC_MAX_ARGS && !bpf_probe_read_user(&arg, sizeof(arg), &argv[i]) && arg)
		ev->flags |= EXEC_ARGS_MORE;
	ev->data_len = off;
}

static __always_inline int stash(const char *path, const char *const *argv, __u32 syscall)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct exec_event *ev;
	long len;

	if (trace_skip())
		return 0;
	if (bpf_map_update_elem(&starts, &tid, &empty_event, BPF_ANY)) {
		count_lost_event(&events_lost);
		return 0;
	}
	ev = bpf_map_lookup_elem(&starts, &tid);
	if (!ev)
		return 0;
	ev->syscall = syscall;
	len = bpf_probe_read_user_str(ev->data, EXEC_PATH_MAX, path);
	if (len <= 0) {
		ev->data[0] = 0;
		len = 1;
	}
	ev->path_len = len;
	copy_argv(ev, argv);
	return 0;
}

static __always_inline int report(long ret)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct task_struct *task;
	struct exec_event *ev;
	__u32 len;

	ev = bpf_map_lookup_elem(&starts, &tid);
	if (!ev)
		return 0;
	if (!failed_only || ret < 0) {
		task = (struct task_struct *)bpf_get_current_task();
		fill_event_header(&ev->hdr, TRACE_EVENT_EXEC);
		fill_task(&ev->task);
		ev->ret = ret;
		ev->ppid = BPF_CORE_READ(task, real_parent, tgid);
		len = ev->data_len;  /* <= EXEC_DATA_MAX: the mask only shows the verifier */
		barrier_var(len);
		len &= 2 * EXEC_DATA_MAX - 1;
		emit_event(ev, offsetof(struct exec_event, data) + len);
	}
	bpf_map_delete_elem(&starts, &tid);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_execve")
int enter_execve(struct trace_event_raw_sys_enter *ctx)
{
	return stash((const char *)ctx->args[0], (const char *const *)ctx->args[1], 0);
}

SEC("tracepoint/syscalls/sys_exit_execve")
int exit_execve(struct trace_event_raw_sys_exit *ctx)
{
	return report(ctx->ret);
}

SEC("tracepoint/syscalls/sys_enter_execveat")
int enter_execveat(struct trace_event_raw_sys_enter *ctx)
{
	return stash((const char *)ctx->args[1], (const char *const *)ctx->args[2], 1);
}

SEC("tracepoint/syscalls/sys_exit_execveat")
int exit_execveat(struct trace_event_raw_sys_exit *ctx)
{
	return report(ctx->ret);
}

SEC("tracepoint/sched/sched_process_exec")
int on_exec(struct trace_event_raw_sched_process_exec *ctx)
{
	__u32 old_tid = ctx->old_pid, tid = ctx->pid;
	struct exec_event *ev;

	if (old_tid == tid)
		return 0;
	ev = bpf_map_lookup_elem(&starts, &old_tid);
	if (!ev)
		return 0;
	if (bpf_map_update_elem(&starts, &tid, ev, BPF_ANY))
		count_lost_event(&events_lost);
	bpf_map_delete_elem(&starts, &old_tid);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
