/* How a process ended, read in sched:sched_process_exit (which runs in the exiting thread
 * after do_exit() has set its exit code).
 *
 *   ends_process(ctx, task)    this thread is the last of its process
 *   wait_status(task, leader)  the process's status as wait(2) reports it
 *
 * A process ends when its LAST thread exits, and that need not be the leader (after
 * exit_group any thread may be the last one out). Its status is the group's exit code
 * when it was ended as a whole (exit_group, fatal signal), else the leader's.
 */
#ifndef MEMBRANE_LIB_EXIT_STATUS_H
#define MEMBRANE_LIB_EXIT_STATUS_H

#define SIGNAL_GROUP_EXIT 0x00000004  /* include/linux/sched/signal.h */

static __always_inline bool ends_process(struct trace_event_raw_sched_process_exit *ctx,
					 struct task_struct *task)
{
	if (bpf_core_field_exists(ctx->group_dead))  /* recent kernels report it */
		return ctx->group_dead;
	/* Older kernels: a signal's live count read here may already be 0 for several
	 * threads, so fall back to what exitsnoop does: the leader's exit. */
	return BPF_CORE_READ(task, pid) == BPF_CORE_READ(task, tgid);
}

static __always_inline int wait_status(struct task_struct *task, struct task_struct *leader)
{
	if (BPF_CORE_READ(task, signal, flags) & SIGNAL_GROUP_EXIT)
		return BPF_CORE_READ(task, signal, group_exit_code);
	return BPF_CORE_READ(leader, exit_code);
}

#endif
