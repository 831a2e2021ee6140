/* Shared by C and Python: `membrane trace profile` (on-CPU stack sampling).
 *
 * Samples are aggregated in the kernel: one counter per (process, command, kernel stack,
 * user stack). User space reads the counts and the stack map once, at the end, so there is
 * no per-sample ring traffic however high the frequency: the ring only announces each
 * newly sampled process.
 */
#ifndef MEMBRANE_ABI_TRACE_PROFILE_H
#define MEMBRANE_ABI_TRACE_PROFILE_H

#include "abi/events.h"

#define PROFILE_COMM_LEN 16

enum profile_abi {
	/* event_header.type of profile_process_event; the object has no other events. */
	PROFILE_EVENT_PROCESS = 1,
	/* A stack id that was not taken because no such stack exists for the sample: no
	 * kernel stack for a sample in user mode, no user stack for a kernel thread, or a
	 * stack kind left out by -U/-K. Real failures keep bpf_get_stackid's -errno
	 * (-EEXIST, -EFAULT, ...). */
	PROFILE_NO_STACK = -1,
};
ABI_EXPORT_ENUM(profile_abi);

/* A program image: a process between two execs. Its user addresses mean the same thing
 * throughout; exec_id is the task's self_exec_id, which every exec increments. */
struct profile_image {
	__u32 pid;               /* tgid */
	__u32 exec_id;
};

struct profile_key {
	struct profile_image image;
	__s32 kernel_stack_id;   /* id in `stacks`, PROFILE_NO_STACK or -errno */
	__s32 user_stack_id;
	char comm[PROFILE_COMM_LEN];
};

/* The first sample of an image: user space reads its mappings at once, while it runs, so
 * stacks of processes that are gone (or have exec'd) by the end still get their symbols. */
struct profile_process_event {
	struct event_header hdr;
	struct profile_image image;
};

/* Per CPU; user space adds the CPUs up. */
struct profile_stats {
	__u64 samples;              /* samples that passed the filters */
	__u64 lost;                 /* samples not counted: the counts map was full */
	__u64 kernel_stack_eexist;  /* stack map bucket taken by another stack (map too small) */
	__u64 kernel_stack_efault;  /* the kernel stack could not be walked */
	__u64 kernel_stack_other;   /* any other stack id error */
	__u64 user_stack_eexist;
	__u64 user_stack_efault;    /* no user stack could be taken */
	__u64 user_stack_other;
};

#endif
