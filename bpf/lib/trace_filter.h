/* The common filters of `membrane trace` tools, applied in the kernel.
 *
 *   if (trace_skip()) return 0;    at the top of every probe that starts an event
 *   trace_skip_comm(comm)          the same for an event that names its process otherwise
 *                                  than the current thread's comm (e.g. by its leader's)
 *
 * Each filter is a load-time constant, so the verifier removes the checks a run does not
 * use: an unfiltered trace pays nothing for them.
 */
#ifndef MEMBRANE_LIB_TRACE_FILTER_H
#define MEMBRANE_LIB_TRACE_FILTER_H

#define TRACE_COMM_LEN 16

const volatile __u32 filter_pid = 0;      /* process (tgid); 0 = any */
const volatile __u32 filter_uid = -1;     /* -1 = any */
const volatile bool filter_comm_set = false;
const volatile char filter_comm[TRACE_COMM_LEN] = {};
const volatile __u32 self_pid = 0;        /* the tracer itself, never traced */

static __always_inline bool comm_equals(const char *comm)
{
	for (int i = 0; i < TRACE_COMM_LEN; i++) {
		if (comm[i] != filter_comm[i])
			return false;
		if (!comm[i])
			break;
	}
	return true;
}

static __always_inline bool comm_matches(void)
{
	char comm[TRACE_COMM_LEN];

	bpf_get_current_comm(comm, sizeof(comm));
	return comm_equals(comm);
}

static __always_inline bool trace_skip_ids(void)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tgid = pid_tgid >> 32;

	if (self_pid && tgid == self_pid)
		return true;
	if (filter_pid && tgid != filter_pid)
		return true;
	if (filter_uid != (__u32)-1 && (__u32)bpf_get_current_uid_gid() != filter_uid)
		return true;
	return false;
}

static __always_inline bool trace_skip(void)
{
	return trace_skip_ids() || (filter_comm_set && !comm_matches());
}

static __always_inline bool trace_skip_comm(const char *comm)
{
	return trace_skip_ids() || (filter_comm_set && !comm_equals(comm));
}

#endif
