// SPDX-License-Identifier: GPL-2.0
/* `membrane trace profile`: on-CPU sampling, like bcc's profile.
 *
 * One software cpu-clock perf event per CPU runs `profile_sample` at the chosen frequency.
 * It takes the kernel and user stack ids (bpf_get_stackid into `stacks`) and counts the
 * sample under (pid, comm, kernel stack, user stack) in `counts`: nothing per sample goes
 * to user space, which reads both maps after the run. The first sample of each process is
 * announced on the ring, so that user space reads the process's mappings while it lives.
 */
#include "include/trace.h"
#include "abi/trace_profile.h"
#include "lib/events.h"
#include "lib/trace_filter.h"

#define PROFILE_MAX_DEPTH 127   /* the default kernel.perf_event_max_stack */
#ifndef EEXIST
#define EEXIST 17
#endif
#ifndef EFAULT
#define EFAULT 14
#endif

const volatile bool include_idle = false;   /* count the idle task (pid 0)? */
const volatile bool kernel_stacks = true;
const volatile bool user_stacks = true;

struct {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(max_entries, 16384);   /* --stack-storage-size */
	__uint(key_size, sizeof(__u32));
	__uint(value_size, PROFILE_MAX_DEPTH * sizeof(__u64));
} stacks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct profile_key);
	__type(value, __u64);
} counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct profile_stats);
} stats SEC(".maps");

/* Images already announced. An evicted one is announced again: harmless. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct profile_image);
	__type(value, __u8);
} seen SEC(".maps");

EVENTS_RINGBUF();
ABI_EXPORT(profile_process_event);

static __always_inline void announce_image(const struct profile_image *image)
{
	struct profile_process_event ev = {};
	__u8 yes = 1;

	if (bpf_map_lookup_elem(&seen, image) ||
	    bpf_map_update_elem(&seen, image, &yes, BPF_NOEXIST))
		return;
	fill_event_header(&ev.hdr, PROFILE_EVENT_PROCESS);
	ev.image = *image;
	emit_event(&ev, sizeof(ev));
}

static __always_inline void count_stack_error(long id, __u64 *eexist, __u64 *efault,
					      __u64 *other)
{
	if (id == -EEXIST)
		*eexist += 1;
	else if (id == -EFAULT)
		*efault += 1;
	else
		*other += 1;
}

SEC("perf_event")
int profile_sample(struct bpf_perf_event_data *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct profile_key key = {};
	struct profile_stats *st;
	__u64 one = 1, *count;
	__u32 zero = 0;
	long id;

	if (!include_idle && (__u32)pid_tgid == 0)
		return 0;
	if (trace_skip())
		return 0;
	st = bpf_map_lookup_elem(&stats, &zero);
	if (!st)
		return 0;
	st->samples += 1;

	key.image.pid = pid_tgid >> 32;
	key.image.exec_id = (__u32)BPF_CORE_READ(task, self_exec_id);
	bpf_get_current_comm(key.comm, sizeof(key.comm));
	key.kernel_stack_id = PROFILE_NO_STACK;
	key.user_stack_id = PROFILE_NO_STACK;
	/* x86-64 user_mode(regs): the interrupted code ran in ring 3, so no kernel stack. */
	if (kernel_stacks && (ctx->regs.csx & 3) != 3) {
		id = bpf_get_stackid(ctx, &stacks, 0);
		key.kernel_stack_id = id;
		if (id < 0)
			count_stack_error(id, &st->kernel_stack_eexist, &st->kernel_stack_efault,
					  &st->kernel_stack_other);
	}
	/* Kernel threads have no user address space and so no user stack. */
	if (user_stacks && BPF_CORE_READ(task, mm)) {
		announce_image(&key.image);
		id = bpf_get_stackid(ctx, &stacks, BPF_F_USER_STACK);
		key.user_stack_id = id;
		if (id < 0)
			count_stack_error(id, &st->user_stack_eexist, &st->user_stack_efault,
					  &st->user_stack_other);
	}

	count = bpf_map_lookup_elem(&counts, &key);
	if (count) {
		__sync_fetch_and_add(count, 1);
		return 0;
	}
	/* First sample of this stack; another CPU may insert it at the same time. */
	if (bpf_map_update_elem(&counts, &key, &one, BPF_NOEXIST) == 0)
		return 0;
	count = bpf_map_lookup_elem(&counts, &key);
	if (count)
		__sync_fetch_and_add(count, 1);
	else
		st->lost += 1;
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
