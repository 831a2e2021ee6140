// SPDX-License-Identifier: GPL-2.0
/* `membrane trace open`: opensnoop on the syscalls tracepoints (openat, openat2, and
 * open where the kernel has it: user space loads enter_open/exit_open only then).
 *
 * Entry stashes the user's path pointer and flags per thread; exit reads the path (the
 * kernel has just copied it, so the page is resident) and emits one event with the result,
 * as long as the path is (struct open_event in abi/trace.h). An open that cannot be
 * stashed (no memory, or the `starts` map is full) or emitted (the ring is full) is
 * counted as lost.
 */
#include "include/trace.h"
#include "abi/trace.h"
#include "lib/events.h"
#include "lib/task.h"
#include "lib/trace_filter.h"

EVENTS_RINGBUF();
ABI_EXPORT(open_event);

/* Entry to exit, per thread: in task-local storage where the kernel allows it from a
 * tracepoint (the `enter_*`/`exit_*` programs), else in the `starts` hash keyed by thread
 * id (the `h_*` programs). User space loads one set (helper_task_storage in the feature
 * probe). Task storage is a pointer walk from the current task with no lock and no
 * element to allocate or free per open; the hash costs an update at entry and a lookup
 * and a delete at exit (bench/RESULTS.md, trace_open), and it can fill up. */
struct open_start {
	const char *path;
	__s64 flags;
	__u32 syscall;
	__u32 active;  /* task storage: an open of ours is between entry and exit */
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct open_start);
} task_starts SEC(".maps");

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

static __always_inline void emit_open(const struct open_start *start, long ret)
{
	struct open_event *ev;
	__u32 zero = 0, size;
	long len;

	ev = bpf_map_lookup_elem(&scratch, &zero);
	if (!ev)
		return;
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

static __always_inline int stash_task(const char *path, __s64 flags, __u32 syscall)
{
	struct open_start *start;

	if (trace_skip())
		return 0;
	start = bpf_task_storage_get(&task_starts, bpf_get_current_task_btf(), 0,
				     BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!start) {
		count_lost_event(&events_lost);  /* no memory: this open would go unseen */
		return 0;
	}
	start->path = path;
	start->flags = flags;
	start->syscall = syscall;
	start->active = 1;
	return 0;
}

static __always_inline int report_task(long ret)
{
	struct open_start *start = bpf_task_storage_get(&task_starts, bpf_get_current_task_btf(),
							0, 0);

	if (!start || !start->active)
		return 0;
	start->active = 0;
	emit_open(start, ret);
	return 0;
}

static __always_inline int stash_hash(const char *path, __s64 flags, __u32 syscall)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct open_start start = { .path = path, .flags = flags, .syscall = syscall };

	if (trace_skip())
		return 0;
	if (bpf_map_update_elem(&starts, &tid, &start, BPF_ANY))
		count_lost_event(&events_lost);  /* full: this open would go unseen */
	return 0;
}

static __always_inline int report_hash(long ret)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct open_start *start = bpf_map_lookup_elem(&starts, &tid);

	if (!start)
		return 0;
	emit_open(start, ret);
	bpf_map_delete_elem(&starts, &tid);
	return 0;
}

static __always_inline __s64 openat2_flags(struct trace_event_raw_sys_enter *ctx)
{
	struct open_how how = {};

	bpf_probe_read_user(&how, sizeof(how), (void *)ctx->args[2]);
	return (__s64)how.flags;
}

/* One set of programs per way of keeping the entry; `open` is loaded only where the
 * kernel has that tracepoint. */
#define OPEN_PROGRAMS(prefix, stash, report)                                             \
	SEC("tracepoint/syscalls/sys_enter_openat")                                      \
	int prefix##enter_openat(struct trace_event_raw_sys_enter *ctx)                  \
	{                                                                                \
		return stash((const char *)ctx->args[1], (__s64)ctx->args[2], 0);        \
	}                                                                                \
	SEC("tracepoint/syscalls/sys_exit_openat")                                       \
	int prefix##exit_openat(struct trace_event_raw_sys_exit *ctx)                    \
	{                                                                                \
		return report(ctx->ret);                                                 \
	}                                                                                \
	SEC("tracepoint/syscalls/sys_enter_open")                                        \
	int prefix##enter_open(struct trace_event_raw_sys_enter *ctx)                    \
	{                                                                                \
		return stash((const char *)ctx->args[0], (__s64)ctx->args[1], 2);        \
	}                                                                                \
	SEC("tracepoint/syscalls/sys_exit_open")                                         \
	int prefix##exit_open(struct trace_event_raw_sys_exit *ctx)                      \
	{                                                                                \
		return report(ctx->ret);                                                 \
	}                                                                                \
	SEC("tracepoint/syscalls/sys_enter_openat2")                                     \
	int prefix##enter_openat2(struct trace_event_raw_sys_enter *ctx)                 \
	{                                                                                \
		return stash((const char *)ctx->args[1], openat2_flags(ctx), 1);         \
	}                                                                                \
	SEC("tracepoint/syscalls/sys_exit_openat2")                                      \
	int prefix##exit_openat2(struct trace_event_raw_sys_exit *ctx)                   \
	{                                                                                \
		return report(ctx->ret);                                                 \
	}

OPEN_PROGRAMS(, stash_task, report_task)
OPEN_PROGRAMS(h_, stash_hash, report_hash)

char LICENSE[] SEC("license") = "GPL";
