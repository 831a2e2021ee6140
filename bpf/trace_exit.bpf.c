// SPDX-License-Identifier: GPL-2.0
/* `membrane trace exit`: exitsnoop on sched:sched_process_exit, which runs in the exiting
 * thread after do_exit() has set its exit code.
 *
 * By default the event is emitted by the thread that ends the process (lib/exit_status.h)
 * and describes the process as wait(2) sees it, with the leader's name and start time.
 */
#include "include/trace.h"
#include "abi/trace_proc.h"
#include "lib/events.h"
#include "lib/exit_status.h"
#include "lib/task.h"
#include "lib/trace_filter.h"

EVENTS_RINGBUF();
ABI_EXPORT(exit_event);

const volatile bool failed_only = false;  /* --failed: only non-zero wait statuses */
const volatile bool per_thread = false;   /* --per-thread: every thread's exit */

SEC("tracepoint/sched/sched_process_exit")
int on_exit(struct trace_event_raw_sched_process_exit *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct task_struct *leader, *subject;
	struct exit_event ev = {};
	bool last = ends_process(ctx, task);
	char comm[TRACE_TASK_COMM_LEN];
	int status;

	if (!per_thread && !last)
		return 0;
	leader = BPF_CORE_READ(task, group_leader);
	subject = per_thread ? task : leader;
	BPF_CORE_READ_STR_INTO(&comm, subject, comm);
	if (trace_skip_comm(comm))
		return 0;
	status = last ? wait_status(task, leader) : BPF_CORE_READ(task, exit_code);
	if (failed_only && !status)
		return 0;

	fill_event_header(&ev.hdr, TRACE_EVENT_EXIT);
	fill_task(&ev.task);
	__builtin_memcpy(ev.task.comm, comm, sizeof(comm));  /* not the current thread's */
	ev.lifetime_ns = ev.hdr.ts_ns - BPF_CORE_READ(subject, start_time);
	ev.ppid = BPF_CORE_READ(task, real_parent, tgid);
	ev.status = status;
	ev.ends_process = last;
	emit_event(&ev, sizeof(ev));
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
