/* How long each syscall takes, per thread, on the raw syscall tracepoints.
 *
 *   syscall_entered(nr);                      at raw_tp/sys_enter, after the filters
 *   if (!syscall_exited(&nr, &delta_ns))      at raw_tp/sys_exit: nothing of ours in flight
 *           return 0;
 *   syscall_uncounted();                      a call the tool could not count (map full)
 *
 * The start time lives in task-local storage (map `syscall_starts`), not in a hash keyed
 * by thread id: threads that never return from a syscall (exit, exit_group, a fatal
 * signal) leave nothing behind, so no map fills up and silently stops the timing, and the
 * lookup is a pointer walk from the current task instead of a hash (measured with
 * `syscalls` on a getppid loop: 333 ns added per call against 539 ns with a hash; empty
 * programs on both tracepoints already add 113 ns, two bpf_ktime_get_ns() 92 ns). A thread
 * that was already inside a syscall when tracing began has no start: its exit is ignored
 * rather than timed from an unrelated moment.
 */
#ifndef MEMBRANE_LIB_SYSCALL_TIME_H
#define MEMBRANE_LIB_SYSCALL_TIME_H

struct syscall_start {
	__u64 ts;        /* bpf_ktime_get_ns() at entry; 0: nothing in flight */
	__s64 nr;
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct syscall_start);
} syscall_starts SEC(".maps");

/* Calls that were traced but not counted: no memory for a start time, or a full map. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} uncounted SEC(".maps");

static __always_inline void syscall_uncounted(void)
{
	__u32 zero = 0;
	__u64 *lost = bpf_map_lookup_elem(&uncounted, &zero);

	if (lost)
		*lost += 1;
}

static __always_inline void syscall_entered(long nr)
{
	struct syscall_start *s = bpf_task_storage_get(&syscall_starts, bpf_get_current_task_btf(),
						       0, BPF_LOCAL_STORAGE_GET_F_CREATE);

	if (!s) {
		syscall_uncounted();
		return;
	}
	s->nr = nr;
	s->ts = bpf_ktime_get_ns();
}

/* The thread's syscall in flight has returned: its number and duration. */
static __always_inline bool syscall_exited(__s64 *nr, __u64 *delta_ns)
{
	struct syscall_start *s = bpf_task_storage_get(&syscall_starts, bpf_get_current_task_btf(),
						       0, 0);

	if (!s || !s->ts)
		return false;
	*delta_ns = bpf_ktime_get_ns() - s->ts;
	*nr = s->nr;
	s->ts = 0;
	return true;
}

#endif
