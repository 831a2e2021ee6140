// SPDX-License-Identifier: GPL-2.0
/* `membrane trace profile`: on-CPU sampling, like bcc's profile.
 *
 * One software cpu-clock perf event per CPU runs `profile_sample` at the chosen frequency.
 * It takes the kernel and user stacks (bpf_get_stack), stores each in `stacks` under a
 * hash of its frames (abi/trace_profile.h: collisions are told apart, never merged), and
 * counts the sample under (pid, comm, kernel stack, user stack) in `counts`: nothing per
 * sample goes to user space, which reads both maps after the run. The first sample of each
 * process is announced on the ring, so that user space reads the process's mappings while
 * it lives.
 */
#include "include/trace.h"
#include "abi/trace_profile.h"
#include "lib/events.h"
#include "lib/trace_filter.h"

#define PROFILE_PROBES (1 << PROFILE_PROBE_BITS)
#ifndef EEXIST
#define EEXIST 17
#endif
#ifndef EFAULT
#define EFAULT 14
#endif
#define PROT_EXEC 4

const volatile bool include_idle = false;   /* count the idle task (pid 0)? */
const volatile bool kernel_stacks = true;
const volatile bool user_stacks = true;
/* Bits of the hash kept in an id. All of them, except when a test narrows the hash to
 * make distinct stacks collide (--stack-hash-bits). */
const volatile __u64 stack_hash_mask = ~0ULL >> (PROFILE_PROBE_BITS + 1);

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);   /* --stack-storage-size */
	__type(key, __u64);
	__type(value, struct profile_stack);
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

/* Where a sample's stack is taken before it is compared and stored (too big for the
 * 512-byte BPF stack). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct profile_stack);
} scratch SEC(".maps");

/* Images announced, and not changed since: an image leaves when it maps a file executable
 * (profile_mmap), so that its next sample announces it again. An evicted one is announced
 * again too: harmless. */
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

/* FNV-1a over whole frames (each step is a bijection of the state, so stacks that differ
 * in one frame never collide), then murmur3's finalizer so that the low bits, which pick
 * the hash bucket, depend on every frame. */
static __always_inline __u64 stack_hash(const struct profile_stack *s)
{
	__u64 h = 0xcbf29ce484222325ULL ^ s->depth;

	for (__u32 i = 0; i < PROFILE_MAX_DEPTH; i++) {
		if (i >= s->depth)
			break;
		h = (h ^ s->ips[i]) * 0x100000001b3ULL;
	}
	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdULL;
	h ^= h >> 33;
	h *= 0xc4ceb9fe1a85ec53ULL;
	h ^= h >> 33;
	return h;
}

static __always_inline bool same_stack(const struct profile_stack *a,
				       const struct profile_stack *b)
{
	if (a->depth != b->depth)
		return false;
	for (__u32 i = 0; i < PROFILE_MAX_DEPTH; i++) {
		if (i >= a->depth)
			break;
		if (a->ips[i] != b->ips[i])
			return false;
	}
	return true;
}

/* The id of the stack in `buf`: the first probe of its hash that holds the same frames,
 * or the first free one, where it is stored. -EEXIST when every probe holds another. */
static __always_inline __s64 store_stack(const struct profile_stack *buf,
					 struct profile_stats *st)
{
	__u64 base = (stack_hash(buf) & stack_hash_mask) << PROFILE_PROBE_BITS;
	struct profile_stack *stored;
	long err;

	for (__u32 probe = 0; probe < PROFILE_PROBES; probe++) {
		__u64 id = base | probe;

		stored = bpf_map_lookup_elem(&stacks, &id);
		if (!stored) {
			err = bpf_map_update_elem(&stacks, &id, buf, BPF_NOEXIST);
			if (!err)
				goto found;
			if (err != -EEXIST)
				return err;   /* -E2BIG: the map is full */
			/* Another CPU stored a stack under this id just now: compare with it. */
			stored = bpf_map_lookup_elem(&stacks, &id);
			if (!stored)
				return -EEXIST;
		}
		if (same_stack(stored, buf))
			goto found;
		continue;
found:
		if (probe)
			st->stack_collisions += 1;
		return id;
	}
	return -EEXIST;
}

/* Take one stack (BPF_F_USER_STACK in flags for the user one) and store it. */
static __always_inline __s64 take_stack(struct bpf_perf_event_data *ctx, __u64 flags,
					struct profile_stats *st, __u64 *eexist,
					__u64 *efault, __u64 *other)
{
	__u32 zero = 0;
	struct profile_stack *buf = bpf_map_lookup_elem(&scratch, &zero);
	__s64 id;
	long len;

	if (!buf)
		return -EFAULT;
	len = bpf_get_stack(ctx, buf->ips, sizeof(buf->ips), flags);
	if (len > 0) {
		buf->depth = len / sizeof(buf->ips[0]);
		id = store_stack(buf, st);
	} else {
		id = len ? len : -EFAULT;   /* no frame at all: nothing could be walked */
	}
	if (id == -EEXIST)
		*eexist += 1;
	else if (id == -EFAULT)
		*efault += 1;
	else if (id < 0)
		*other += 1;
	return id;
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
	key.kernel_stack = PROFILE_NO_STACK;
	key.user_stack = PROFILE_NO_STACK;
	/* x86-64 user_mode(regs): the interrupted code ran in ring 3, so no kernel stack. */
	if (kernel_stacks && (ctx->regs.csx & 3) != 3)
		key.kernel_stack = take_stack(ctx, 0, st, &st->kernel_stack_eexist,
					      &st->kernel_stack_efault, &st->kernel_stack_other);
	/* Kernel threads have no user address space and so no user stack. */
	if (user_stacks && BPF_CORE_READ(task, mm)) {
		announce_image(&key.image);
		key.user_stack = take_stack(ctx, BPF_F_USER_STACK, st, &st->user_stack_eexist,
					    &st->user_stack_efault, &st->user_stack_other);
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

/* mmap(addr, length, prot, flags, fd, offset) of a file, executable: the dynamic loader
 * bringing in a library (often after the process's first sample, which announced its
 * mappings without it) or dlopen. The image's next sample announces it again, so user
 * space reads the mappings once more while the process lives. */
SEC("tracepoint/syscalls/sys_enter_mmap")
int profile_mmap(struct trace_event_raw_sys_enter *ctx)
{
	struct task_struct *task;
	struct profile_image image;

	if (!user_stacks || !(ctx->args[2] & PROT_EXEC) || (int)ctx->args[4] < 0)
		return 0;
	if (trace_skip())
		return 0;
	task = (struct task_struct *)bpf_get_current_task();
	image.pid = bpf_get_current_pid_tgid() >> 32;
	image.exec_id = (__u32)BPF_CORE_READ(task, self_exec_id);
	bpf_map_delete_elem(&seen, &image);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
