// SPDX-License-Identifier: GPL-2.0
/* Runtime security: every exec, clone (a new process, not a thread) and exit on the node,
 * for the agent's process cache and its process_exec / process_exit events.
 *
 * The hooks are the ones every supported kernel allows: the sched tracepoints and the
 * raw tracepoint of sched_process_fork (whose arguments are the tasks). exec reports the
 * binary's full path and the working directory (walked in the kernel, lib/dpath.h:
 * bpf_d_path is not allowed here) and argv as the new program sees it; clone and exit are
 * fixed-size. `process_start` keeps each live process's start (its exec_id), so an exit
 * names exactly the process that ended.
 */
#include "include/trace.h"
#include "abi/security.h"
#include "lib/events.h"
#include "lib/exit_status.h"
#include "lib/dpath.h"

EVENTS_RINGBUF();
ABI_EXPORT(sec_proc_event);
ABI_EXPORT(sec_proc_start);

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);  /* tgid */
	__type(value, struct sec_proc_start);
} process_start SEC(".maps");

/* An exec event is ~12 KiB: built here, then only its used bytes go into the ring. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sec_proc_event);
} scratch SEC(".maps");

#define HEAD_SIZE offsetof(struct sec_proc_event, data)

static __always_inline struct sec_proc_event *new_event(__u16 type)
{
	__u32 zero = 0;
	struct sec_proc_event *ev = bpf_map_lookup_elem(&scratch, &zero);

	if (!ev)
		return NULL;
	fill_event_header(&ev->hdr, type);
	ev->flags = 0;
	ev->status = 0;
	ev->binary_len = ev->cwd_len = ev->args_len = 0;
	return ev;
}

static __always_inline void fill_task(struct sec_proc_event *ev, struct task_struct *task)
{
	ev->pid = BPF_CORE_READ(task, tgid);
	ev->tid = BPF_CORE_READ(task, pid);
	ev->ppid = BPF_CORE_READ(task, real_parent, tgid);
	ev->uid = BPF_CORE_READ(task, cred, euid.val);
	ev->auid = (__u32)-1;
	if (bpf_core_field_exists(task->loginuid))
		ev->auid = BPF_CORE_READ(task, loginuid.val);
	ev->netns = BPF_CORE_READ(task, nsproxy, net_ns, ns.inum);
	ev->cgroup_id = BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
}

static __always_inline void remember_start(__u32 tgid, __u64 ktime)
{
	struct sec_proc_start start = { .ktime = ktime };

	if (bpf_map_update_elem(&process_start, &tgid, &start, BPF_ANY))
		count_lost_event(&events_lost);
}

static __always_inline void emit(struct sec_proc_event *ev, __u32 data_len)
{
	if (data_len > sizeof(ev->data))  /* never: shows the verifier the bound */
		data_len = sizeof(ev->data);
	emit_event(ev, HEAD_SIZE + data_len);
}

SEC("tracepoint/sched/sched_process_exec")
int on_exec(struct trace_event_raw_sched_process_exec *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct sec_proc_event *ev = new_event(SEC_PROC_EXEC);
	struct fs_struct *fs;
	struct file *exe;
	unsigned long arg_start, arg_end, n;
	bool cut = false;
	__u32 len, off;

	if (!ev)
		return 0;
	fill_task(ev, task);
	ev->ktime = bpf_ktime_get_ns();
	remember_start(ev->pid, ev->ktime);

	fs = BPF_CORE_READ(task, fs);
	exe = BPF_CORE_READ(task, mm, exe_file);
	len = dpath_walk(&exe->f_path, &fs->root, ev->data, &cut);
	if (cut)
		ev->flags |= SEC_PROC_TRUNC_BINARY;
	ev->binary_len = len;

	cut = false;
	off = len & (SEC_PROC_PATH_MAX - 1);
	len = dpath_walk(&fs->pwd, &fs->root, &ev->data[off], &cut);
	if (cut)
		ev->flags |= SEC_PROC_TRUNC_CWD;
	ev->cwd_len = len;

	off = (off + len) & (2 * SEC_PROC_PATH_MAX - 1);
	arg_start = BPF_CORE_READ(task, mm, arg_start);
	arg_end = BPF_CORE_READ(task, mm, arg_end);
	n = arg_end > arg_start ? arg_end - arg_start : 0;
	if (n > SEC_PROC_ARGS_MAX) {
		n = SEC_PROC_ARGS_MAX;
		ev->flags |= SEC_PROC_TRUNC_ARGS;
	}
	n &= 2 * SEC_PROC_ARGS_MAX - 1;  /* <= SEC_PROC_ARGS_MAX already */
	if (n && bpf_probe_read_user(&ev->data[off], n, (void *)arg_start))
		n = 0;
	ev->args_len = n;
	emit(ev, off + n);
	return 0;
}

SEC("raw_tracepoint/sched_process_fork")
int on_fork(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *child = (struct task_struct *)ctx->args[1];
	struct sec_proc_event *ev;

	if (BPF_CORE_READ(child, pid) != BPF_CORE_READ(child, tgid))
		return 0;  /* a new thread, not a new process */
	ev = new_event(SEC_PROC_CLONE);
	if (!ev)
		return 0;
	fill_task(ev, child);
	ev->ktime = bpf_ktime_get_ns();
	remember_start(ev->pid, ev->ktime);
	emit(ev, 0);
	return 0;
}

SEC("tracepoint/sched/sched_process_exit")
int on_exit(struct trace_event_raw_sched_process_exit *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct task_struct *leader;
	struct sec_proc_start *start;
	struct sec_proc_event *ev;
	__u32 tgid;

	if (!ends_process(ctx, task))
		return 0;
	ev = new_event(SEC_PROC_EXIT);
	if (!ev)
		return 0;
	leader = BPF_CORE_READ(task, group_leader);
	fill_task(ev, task);
	tgid = ev->pid;
	ev->status = wait_status(task, leader);
	start = bpf_map_lookup_elem(&process_start, &tgid);
	if (start) {
		ev->ktime = start->ktime;
		bpf_map_delete_elem(&process_start, &tgid);
	} else {
		ev->ktime = 0;
		ev->flags |= SEC_PROC_NO_START;
	}
	emit(ev, 0);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
