/* The current task as the trace events describe it (struct trace_task in abi/trace.h). */
#ifndef MEMBRANE_LIB_TASK_H
#define MEMBRANE_LIB_TASK_H

static __always_inline void fill_task(struct trace_task *t)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	t->pid = pid_tgid >> 32;
	t->tid = (__u32)pid_tgid;
	t->uid = (__u32)bpf_get_current_uid_gid();
	bpf_get_current_comm(t->comm, sizeof(t->comm));
}

#endif
