/* Shared by C and Python: structs of selftest_trace.bpf.o, the loader's tracing test object. */
#ifndef MEMBRANE_ABI_SELFTEST_TRACE_H
#define MEMBRANE_ABI_SELFTEST_TRACE_H

/* The single value of the `counts` array: how often each program ran for the test. */
struct selftest_trace_counts {
	__u64 getpid;     /* tracepoint syscalls:sys_enter_getpid, calls by target_tid */
	__u64 uprobe;     /* uprobe on a libc function, calls by target_tid */
	__u64 samples;    /* perf_event samples of target_tid */
	__u64 stacks;     /* samples whose user stack got a stack id */
	__u64 connect_a;  /* cgroup connect4, program that allows */
	__u64 connect_b;  /* cgroup connect4, program that denies */
};

#endif
