// SPDX-License-Identifier: GPL-2.0
/* `membrane trace open`: opensnoop on the syscalls tracepoints (openat, openat2).
 *
 * Entry stashes the user's path pointer and flags per thread; exit reads the path (the
 * kernel has just copied it, so the page is resident) and emits one event with the result.
 */
#include "include/trace.h"
#include "abi/trace.h"
#include "lib/events.h"
#include "lib/task.h"
#include "lib/trace_filter.h"

EVENTS_RINGBUF();
ABI_EXPORT(open_event);

struct open_start {
	const char *path;
	__s64 flags;
	__u32 syscall;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct open_start);
} starts SEC(".maps");

/* open_event is too big for the 512-byte BPF stack together with everything else. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct open_event);
} scratch SEC(".maps");

static __always_inline int stash(const char *path, __s64 flags, __u32 syscall)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct open_start start = { .path = path, .flags = flags, .syscall = syscall };

	if (trace_skip())
		return 0;
	bpf_map_update_elem(&starts, &tid, &start, BPF_ANY);
	return 0;
}

static __always_inline int report(long ret)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct open_start *start = bpf_map_lookup_elem(&starts, &tid);
	struct open_event *ev;
	__u32 zero = 0;

	if (!start)
		return 0;
	ev = bpf_map_lookup_elem(&scratch, &zero);
	if (ev) {
		fill_event_header(&ev->hdr, TRACE_EVENT_OPEN);
		fill_task(&ev->task);
		ev->ret = ret;
		ev->flags = start->flags;
		ev->syscall = start->syscall;
		if (bpf_probe_read_user_str(ev->path, sizeof(ev->path), start->path) < 0)
			ev->path[0] = 0;
		emit_event(ev, sizeof(*ev));
	}
	bpf_map_delete_elem(&starts, &tid);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_openat")
int enter_openat(struct trace_event_raw_sys_enter *ctx)
{
	return stash((const char *)ctx->args[1], (__s64)ctx->args[2], 0);
}

SEC("tracepoint/syscalls/sys_exit_openat")
int exit_openat(struct trace_event_raw_sys_exit *ctx)
{
	return report(ctx->ret);
}

SEC("tracepoint/syscalls/sys_enter_openat2")
int enter_openat2(struct trace_event_raw_sys_enter *ctx)
{
	struct open_how how = {};

	bpf_probe_read_user(&how, sizeof(how), (void *)ctx->args[2]);
	return stash((const char *)ctx->args[1], (__s64)how.flags, 1);
}

SEC("tracepoint/syscalls/sys_exit_openat2")
int exit_openat2(struct trace_event_raw_sys_exit *ctx)
{
	return report(ctx->ret);
}

char LICENSE[] SEC("license") = "GPL";
