// SPDX-License-Identifier: GPL-2.0
/* `membrane trace latency`: a log2 histogram of the latency of chosen syscalls, kept in a
 * per-CPU hash in the kernel (one histogram per syscall); user space reads it per interval.
 *
 * Unchosen syscalls cost one array read at entry and nothing at exit: no start time is
 * stored for them, so the exit finds nothing in flight.
 */
#include "include/trace.h"
#include "abi/trace_sys.h"
#include "lib/log2_hist.h"
#include "lib/syscall_time.h"
#include "lib/trace_filter.h"

const volatile __u64 unit_ns = 1000;          /* histogram unit: 1000 usecs, 1000000 msecs */
const volatile __u8 wanted[SYS_NR_MAX] = {};  /* 1: histogram this syscall number */

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, SYS_NR_MAX);  /* user space sizes it to the chosen syscalls */
	__type(key, __u32);
	__type(value, struct sys_hist);
} hists SEC(".maps");

SEC("raw_tp/sys_enter")
int sys_enter(struct bpf_raw_tracepoint_args *ctx)
{
	__u64 nr = ctx->args[1];

	if (nr >= SYS_NR_MAX || !wanted[nr])
		return 0;
	if (trace_skip())
		return 0;
	syscall_entered(nr);
	return 0;
}

SEC("raw_tp/sys_exit")
int sys_exit(struct bpf_raw_tracepoint_args *ctx)
{
	static const struct sys_hist empty;
	struct sys_hist *hist;
	__u64 delta;
	__s64 nr;
	__u32 key;

	if (!syscall_exited(&nr, &delta))
		return 0;
	key = nr;
	hist = bpf_map_lookup_elem(&hists, &key);
	if (!hist) {
		bpf_map_update_elem(&hists, &key, &empty, BPF_NOEXIST);
		hist = bpf_map_lookup_elem(&hists, &key);
		if (!hist) {
			syscall_uncounted();
			return 0;
		}
	}
	hist->slots[log2_slot(delta / unit_ns, SYS_HIST_SLOTS)] += 1;
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
