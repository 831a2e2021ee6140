// SPDX-License-Identifier: GPL-2.0
/* `membrane trace open`: opensnoop on the syscalls tracepoints (openat, openat2, and
 * open where the kernel has it: user space loads enter_open/exit_open only then).
 *
 * Entry stashes the user's path pointer and flags per thread; exit reads the path (the
 * kernel has just copied it, so the page is resident) and emits one event with the result,
 * as long as the path is (struct open_event in abi/trace.h). An open that cannot be
 * stashed (the `starts` map is full) or emitted (the ring is full) is counted as lost.
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

/* open_event is too big for the 512-byte BPF stack: built here, then only its used bytes
 * are copied into the ring. */
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
	if (bpf_map_update_elem(&starts, &tid, &start, BPF_ANY))
		count_lost_event(&events_lost);  /* full: this open would go unseen */
	return 0;
}

static __always_inline int report(long ret)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct open_start *start = bpf_map_lookup_elem(&starts, &tid);
	struct open_event *ev;
	__u32 zero = 0, size;
	long len;

	if (!start)
		return 0;
	ev = bpf_map_lookup_elem(&scratch, &zero);
	if (ev) {
		fill_event_header(&ev->hdr, TRACE_EVENT_OPEN);
		fill_task(&ev->task);
		ev->ret = ret;
		ev->flags = start->flags;
		ev->syscall = start->syscall;
		len = bpf_probe_read_user_str(ev->path, sizeof(ev->path), start->path);
		if (len < 0)
			len = 0;
		ev->path_len = len;
		size = offsetof(struct open_event, path) + len;
		if (size > sizeof(*ev))  /* never: tells the verifier the bound */
			size = sizeof(*ev);
		emit_event(ev, size);
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

SEC("tracepoint/syscalls/sys_enter_open")
int enter_open(struct trace_event_raw_sys_enter *ctx)
{
	return stash((const char *)ctx->args[0], (__s64)ctx->args[1], 2);
}

SEC("tracepoint/syscalls/sys_exit_open")
int exit_open(struct trace_event_raw_sys_exit *ctx)
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
