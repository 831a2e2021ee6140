/* Shared by C and Python: `membrane trace profile` (on-CPU stack sampling).
 *
 * Samples are aggregated in the kernel: one counter per (process, command, kernel stack,
 * user stack). User space reads the counts and the stacks once, at the end, so there is
 * no per-sample ring traffic however high the frequency: the ring only announces each
 * newly sampled process.
 *
 * Stacks are stored by us, not in a BPF_MAP_TYPE_STACK_TRACE map: that map keeps one stack
 * per bucket and refuses (-EEXIST) every other stack whose hash lands there, which lost a
 * quarter of the stacks at 999 Hz. Here a stack is stored whole under an id made of a
 * 64-bit hash of its frames and a probe number; a sample compares the frames it took
 * with the stored ones, so two stacks with one hash are told apart (the second one takes
 * the next probe) and counted as a collision, never merged.
 */
#ifndef MEMBRANE_ABI_TRACE_PROFILE_H
#define MEMBRANE_ABI_TRACE_PROFILE_H

#include "abi/events.h"

#define PROFILE_COMM_LEN 16
#define PROFILE_MAX_DEPTH 127   /* the default kernel.perf_event_max_stack */

enum profile_abi {
	/* event_header.type of profile_process_event; the object has no other events. */
	PROFILE_EVENT_PROCESS = 1,
	/* A stack that was not taken because no such stack exists for the sample: no kernel
	 * stack for a sample in user mode, no user stack for a kernel thread, or a stack kind
	 * left out by -U/-K. Real failures are -errno: -EFAULT (the stack could not be
	 * walked), -EEXIST (every probe of its hash held another stack), -E2BIG (the stack
	 * map was full). */
	PROFILE_NO_STACK = -1,
	/* Ids of one hash: (hash << PROFILE_PROBE_BITS) | probe. */
	PROFILE_PROBE_BITS = 2,
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
	char comm[PROFILE_COMM_LEN];
	__s64 kernel_stack;      /* id in `stacks` (>= 0), PROFILE_NO_STACK or -errno */
	__s64 user_stack;
};

/* A stack as bpf_get_stack took it: return addresses, innermost first. */
struct profile_stack {
	__u32 depth;             /* frames in ips */
	__u32 pad;
	__u64 ips[PROFILE_MAX_DEPTH];
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
	__u64 kernel_stack_eexist;  /* every probe of the stack's hash held other stacks */
	__u64 kernel_stack_efault;  /* the kernel stack could not be walked */
	__u64 kernel_stack_other;   /* any other error (-E2BIG: the stack map was full) */
	__u64 user_stack_eexist;
	__u64 user_stack_efault;    /* no user stack could be taken */
	__u64 user_stack_other;
	__u64 stack_collisions;     /* stacks taken whose hash another stack held first: told
				     * apart by their frames, stored under a later probe */
};

#endif
