// SPDX-License-Identifier: GPL-2.0
/* One TracingPolicy hook (a tracepoint or a uprobe) with its selectors evaluated here, in
 * the kernel, and its actions taken here: no round trip to user space before a Sigkill.
 *
 * The hook's configuration is a load-time constant (`sp_config`, struct sp_hook_config in
 * abi/security_policy.h): the verifier prunes every selector, filter and slot the policy
 * does not use, so a one-filter policy costs one filter. Selectors are tried in order and
 * the first that matches decides (its filters AND, a filter's values OR). Cheap filters
 * run first (pids, namespaces, capabilities, binary), arguments last, and an argument is
 * read from user memory only when a filter (or an event) needs it.
 *
 * Actions: Post (an event in the ring), NoPost, Sigkill/Signal (bpf_send_signal: the
 * signal is delivered before the task returns to user space, so the syscall's result is
 * never seen by the program), Override on connect/sendto (a ticket the cgroup sock_addr
 * hook in security_policy_sock.bpf.c turns into EPERM within the same syscall).
 */
#include "include/trace.h"
#include "abi/security_policy.h"
#include "lib/events.h"
#include "lib/dpath.h"

EVENTS_RINGBUF();
ABI_EXPORT(sp_event);
ABI_EXPORT(sp_hook_config);
ABI_EXPORT(sp_lpm_key);
ABI_EXPORT(sp_binary_key);
ABI_EXPORT(sp_deny_ticket);

const volatile struct sp_hook_config sp_config = {};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1024);
	__type(key, struct sp_lpm_key);
	__type(value, __u8);
} sp_strings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct sp_binary_key);
	__type(value, __u8);
} sp_binaries SEC(".maps");

/* Net namespace inodes of the pods a namespaced policy applies to (sp_config.scoped). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u8);
} sp_scope SEC(".maps");

/* Shared with the cgroup hooks (pinned once per node). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct sp_deny_ticket);
} sp_deny SEC(".maps");

/* The event being built and the LPM key being looked up: too big for the stack. */
struct sp_scratch {
	struct sp_event ev;
	struct sp_lpm_key key;
	char exe[SEC_PROC_PATH_MAX];  /* the executable's path (matchBinaries Prefix) */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sp_scratch);
} scratch SEC(".maps");

#define STR_MASK (SP_STR_MAX - 1)

/* ---- arguments ------------------------------------------------------------------------- */
static __always_inline __u64 raw_arg(void *ctx, int i)
{
	__u64 v = 0;

	if (sp_config.kind == SP_HOOK_UPROBE || sp_config.kind == SP_HOOK_KPROBE) {
		struct pt_regs *regs = ctx;

		/* x86-64 syscall wrappers take the user's registers as their one argument */
		if (sp_config.kind == SP_HOOK_KPROBE && sp_config.syscall)
			regs = (struct pt_regs *)PT_REGS_PARM1_CORE(regs);

		switch (sp_config.args[i].offset) {
		case 0: return PT_REGS_PARM1_CORE(regs);
		case 1: return PT_REGS_PARM2_CORE(regs);
		case 2: return PT_REGS_PARM3_CORE(regs);
		case 3: return PT_REGS_PARM4_CORE(regs);
		case 4: return PT_REGS_PARM5_CORE(regs);
		default: return 0;
		}
	}
	bpf_probe_read_kernel(&v, sizeof(v), ctx + sp_config.args[i].offset);
	return v;
}

static __always_inline __u64 int_arg(void *ctx, int i)
{
	__u64 v = raw_arg(ctx, i);
	bool is_signed = sp_config.args[i].type == SP_ARG_INT;

	if (sp_config.kind != SP_HOOK_TRACEPOINT)
		return v;  /* a register: already the whole value */
	switch (sp_config.args[i].size) {
	case 1: return is_signed ? (__u64)(__s64)(__s8)v : (__u8)v;
	case 2: return is_signed ? (__u64)(__s64)(__s16)v : (__u16)v;
	case 4: return is_signed ? (__u64)(__s64)(__s32)v : (__u32)v;
	default: return v;
	}
}

static __always_inline bool is_string(__u8 type)
{
	return type == SP_ARG_STRING || type == SP_ARG_DATA_LOC_STRING ||
	       type == SP_ARG_KERNEL_STRING;
}

static __always_inline bool in_kernel(__u8 type)
{
	return type == SP_ARG_DATA_LOC_STRING || type == SP_ARG_KERNEL_STRING;
}

/* Where string argument i is: a user pointer, or (__data_loc) in the record itself, at
 * the offset in the low 16 bits of the field. */
static __always_inline const void *string_at(void *ctx, int i)
{
	__u64 v = raw_arg(ctx, i);

	if (sp_config.args[i].type == SP_ARG_DATA_LOC_STRING)
		return ctx + (v & 0xffff);
	return (const void *)v;
}

static __always_inline long read_string(void *ctx, int i, void *dst, __u32 size)
{
	if (in_kernel(sp_config.args[i].type))
		return bpf_probe_read_kernel_str(dst, size, string_at(ctx, i));
	return bpf_probe_read_user_str(dst, size, string_at(ctx, i));
}

/* Read argument i into the event (once): ints into args[i], strings into their slot
 * (args[i] = length with the NUL, 0 when unreadable), a sockaddr into ev->sockaddr. */
static __always_inline void load_arg(void *ctx, struct sp_event *ev, int i, __u32 *loaded)
{
	__u8 type = sp_config.args[i].type;
	long len;

	if (*loaded & (1u << i))
		return;
	*loaded |= 1u << i;
	if (is_string(type)) {
		__u8 slot = sp_config.args[i].size & 1;

		len = read_string(ctx, i, ev->strings[slot], SP_STR_MAX);
		ev->args[i] = len > 0 ? len : 0;
		if (len <= 0)
			ev->strings[slot][0] = 0;
	} else if (type == SP_ARG_SOCKADDR) {
		const void *ptr = (const void *)raw_arg(ctx, i);

		ev->args[i] = (__u64)ptr;
		if (bpf_probe_read_user(ev->sockaddr, SP_SOCKADDR_MAX, ptr))
			__builtin_memset(ev->sockaddr, 0, SP_SOCKADDR_MAX);
	} else if (type != SP_ARG_NONE) {
		ev->args[i] = int_arg(ctx, i);
	}
}

/* ---- value sets ------------------------------------------------------------------------ */
static __always_inline bool lpm_has(struct sp_lpm_key *key, __u32 map_id)
{
	key->prefixlen = 32 + SP_LPM_STR * 8;
	key->map_id = map_id;
	return bpf_map_lookup_elem(&sp_strings, key) != NULL;
}

static __always_inline bool string_in(struct sp_scratch *s, int slot, __u32 map_id, bool reversed)
{
	const char *src = s->ev.strings[slot & 1];
	__u32 n, j;

	if (!reversed) {
		__builtin_memcpy(s->key.data, src, SP_LPM_STR);
		return lpm_has(&s->key, map_id);
	}
	/* Postfix: the string reversed (without its NUL), matched as a prefix. */
	n = 0;
	for (j = 0; j < SP_STR_MAX - 1; j++) {
		if (!src[j])
			break;
		n++;
	}
	for (j = 0; j < SP_LPM_STR; j++) {
		if (j >= n)
			break;
		s->key.data[j] = src[(n - 1 - j) & STR_MASK];
	}
	return lpm_has(&s->key, map_id);
}

/* The sockaddr's family, port (host order) and address (IPv4 mapped into IPv6). */
static __always_inline __u16 sockaddr_parts(const __u8 *sa, __u16 *port, __u8 addr[16])
{
	__u16 family = *(const __u16 *)sa;

	*port = bpf_ntohs(*(const __u16 *)(sa + 2));
	__builtin_memset(addr, 0, 16);
	if (family == 2 /* AF_INET */) {
		addr[10] = 0xff;
		addr[11] = 0xff;
		__builtin_memcpy(addr + 12, sa + 4, 4);
	} else if (family == 10 /* AF_INET6 */) {
		__builtin_memcpy(addr, sa + 8, 16);
	}
	return family;
}

static __always_inline bool int_in(const volatile struct sp_arg_filter *f, __u64 v)
{
	for (int k = 0; k < SP_MAX_VALUES; k++) {
		if (k >= f->nvalues)
			break;
		if (f->values[k] == v)
			return true;
	}
	return false;
}

/* Whether a string argument's first bytes differ from the first bytes (`lead`) every
 * value of filter f starts with: then no value can match, decided on one 8-byte read
 * instead of reading the string whole and looking it up. */
static __always_inline bool lead_differs(void *ctx, const volatile struct sp_arg_filter *f)
{
	__u64 head = 0, mask = f->lead_len >= 8 ? ~0ULL : (1ULL << (f->lead_len * 8)) - 1;

	long err = in_kernel(sp_config.args[f->arg].type)
		? bpf_probe_read_kernel(&head, sizeof(head), string_at(ctx, f->arg))
		: bpf_probe_read_user(&head, sizeof(head), string_at(ctx, f->arg));

	if (err)
		return false;  /* near the end of a page: decide on the whole string */
	return ((head ^ f->lead) & mask) != 0;
}

static __always_inline bool arg_matches(void *ctx, struct sp_scratch *s,
					const volatile struct sp_arg_filter *f, __u32 *loaded)
{
	int i = f->arg;
	__u8 type = sp_config.args[i].type;
	__u64 v;
	__u16 port, family;
	__u8 *addr;

	if (is_string(type) && f->lead_len && !(*loaded & (1u << i)) &&
	    lead_differs(ctx, f))
		return f->op == SP_OP_NOT_EQUAL || f->op == SP_OP_NOT_PREFIX;
	load_arg(ctx, &s->ev, i, loaded);
	v = s->ev.args[i];
	if (is_string(type)) {
		int slot = sp_config.args[i].size;

		switch (f->op) {
		case SP_OP_EQUAL:
		case SP_OP_PREFIX:
			return v && string_in(s, slot, f->map_id, false);
		case SP_OP_NOT_EQUAL:
		case SP_OP_NOT_PREFIX:
			return !v || !string_in(s, slot, f->map_id, false);
		case SP_OP_POSTFIX:
			return v && string_in(s, slot, f->map_id, true);
		case SP_OP_NOT_POSTFIX:
			return !v || !string_in(s, slot, f->map_id, true);
		default:
			return false;
		}
	}
	if (type == SP_ARG_SOCKADDR) {
		addr = s->key.data;
		family = sockaddr_parts(s->ev.sockaddr, &port, addr);
		switch (f->op) {
		case SP_OP_DPORT:
			return (family == 2 || family == 10) && int_in(f, port);
		case SP_OP_NOT_DPORT:
			return (family == 2 || family == 10) && !int_in(f, port);
		case SP_OP_DADDR:
			return (family == 2 || family == 10) && lpm_has(&s->key, f->map_id);
		case SP_OP_NOT_DADDR:
			return (family == 2 || family == 10) && !lpm_has(&s->key, f->map_id);
		case SP_OP_FAMILY:
			return int_in(f, family);
		case SP_OP_NOT_FAMILY:
			return !int_in(f, family);
		default:
			return false;
		}
	}
	switch (f->op) {
	case SP_OP_EQUAL:
		return int_in(f, v);
	case SP_OP_NOT_EQUAL:
		return !int_in(f, v);
	case SP_OP_GT:
		return type == SP_ARG_INT ? (__s64)v > (__s64)f->values[0] : v > f->values[0];
	case SP_OP_LT:
		return type == SP_ARG_INT ? (__s64)v < (__s64)f->values[0] : v < f->values[0];
	case SP_OP_MASK:
		for (int k = 0; k < SP_MAX_VALUES; k++) {
			if (k >= f->nvalues)
				break;
			if (v & f->values[k])
				return true;
		}
		return false;
	default:
		return false;
	}
}

/* ---- the task ---------------------------------------------------------------------------- */
static __always_inline __u32 ns_inum(struct task_struct *task, __u8 ns)
{
	switch (ns) {
	case 0: return BPF_CORE_READ(task, nsproxy, uts_ns, ns.inum);
	case 1: return BPF_CORE_READ(task, nsproxy, ipc_ns, ns.inum);
	case 2: return BPF_CORE_READ(task, nsproxy, mnt_ns, ns.inum);
	case 3: return BPF_CORE_READ(task, nsproxy, net_ns, ns.inum);
	case 4: return BPF_CORE_READ(task, nsproxy, cgroup_ns, ns.inum);
	case 5: return BPF_CORE_READ(task, cred, user_ns, ns.inum);
	case 6: return BPF_CORE_READ(task, nsproxy, pid_ns_for_children, ns.inum);
	default: return 0;
	}
}

static __always_inline bool ns_matches(struct task_struct *task, const volatile struct sp_ns_filter *f)
{
	__u32 inum = ns_inum(task, f->ns);
	bool found = false;

	for (int k = 0; k < SP_MAX_VALUES; k++) {
		if (k >= f->nvalues)
			break;
		if (f->values[k] == inum)
			found = true;
	}
	return f->op == SP_SET_IN ? found : !found;
}

static __always_inline bool caps_match(struct task_struct *task, const volatile struct sp_cap_filter *f)
{
	const struct cred *cred = BPF_CORE_READ(task, cred);
	__u64 held = 0;

	/* kernel_cap_t is 8 bytes on every kernel we support (u64, or u32[2] before 6.3). */
	if (f->set == 0)
		bpf_core_read(&held, sizeof(held), &cred->cap_effective);
	else if (f->set == 1)
		bpf_core_read(&held, sizeof(held), &cred->cap_inheritable);
	else
		bpf_core_read(&held, sizeof(held), &cred->cap_permitted);
	return f->op == SP_SET_IN ? (held & f->mask) != 0 : (held & f->mask) == 0;
}

static __always_inline bool pid_listed(const volatile struct sp_selector *sel, __u32 tgid)
{
	for (int k = 0; k < SP_MAX_VALUES; k++) {
		if (k >= sel->npids)
			break;
		if (sel->pids[k] == tgid)
			return true;
	}
	return false;
}

static __always_inline bool pids_match(struct task_struct *task, const volatile struct sp_selector *sel)
{
	__u32 tgid = BPF_CORE_READ(task, tgid);
	bool found = pid_listed(sel, tgid);

	if (!found && sel->pids_follow_forks) {
		struct task_struct *t = task;

		/* followForks: a descendant of a listed process (up to 8 generations). */
		for (int depth = 0; depth < 8 && !found; depth++) {
			t = BPF_CORE_READ(t, real_parent);
			if (!t)
				break;
			tgid = BPF_CORE_READ(t, tgid);
			if (tgid <= 1)
				break;
			found = pid_listed(sel, tgid);
		}
	}
	return sel->pids_op == SP_SET_IN ? found : !found;
}

/* matchBinaries Prefix: the executable's path as the task sees it (lib/dpath.h), its
 * first SP_LPM_STR bytes looked up among the prefixes. Walked only for such selectors. */
static __always_inline bool binary_path_matches(struct sp_scratch *s,
						const volatile struct sp_selector *sel)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct file *exe = BPF_CORE_READ(task, mm, exe_file);
	struct fs_struct *fs = BPF_CORE_READ(task, fs);
	bool cut = false, found = false;
	__u32 len;

	if (exe && fs) {
		len = dpath_walk(&exe->f_path, &fs->root, s->exe, &cut);
		len &= SEC_PROC_PATH_MAX - 1;
		if (len < SEC_PROC_PATH_MAX - 1)
			s->exe[len] = 0;
		__builtin_memcpy(s->key.data, s->exe, SP_LPM_STR);
		found = lpm_has(&s->key, sel->binaries_id);
	}
	return sel->binaries_op == SP_SET_PREFIX ? found : !found;
}

static __always_inline bool binary_matches(const volatile struct sp_selector *sel)
{
	/* BTF pointers from the current task: each hop is a plain load (the verifier makes
	 * it fault-safe), not a bpf_probe_read_kernel call. */
	struct task_struct *task = bpf_get_current_task_btf();
	struct sp_binary_key key = { .binaries_id = sel->binaries_id };
	struct mm_struct *mm = task->mm;
	struct inode *inode = NULL;
	bool found = false;

	if (mm && mm->exe_file)
		inode = mm->exe_file->f_inode;
	if (inode) {
		key.ino = inode->i_ino;
		key.dev = inode->i_sb->s_dev;
		found = bpf_map_lookup_elem(&sp_binaries, &key) != NULL;
	}
	return sel->binaries_op == SP_SET_IN ? found : !found;
}

/* ---- one call of the hook ---------------------------------------------------------------- */
static __always_inline bool selector_matches(void *ctx, struct sp_scratch *s,
					     struct task_struct *task,
					     const volatile struct sp_selector *sel, __u32 *loaded)
{
	if (sel->pids_op && !pids_match(task, sel))
		return false;
	for (int n = 0; n < SP_MAX_NS_FILTERS; n++) {
		if (n >= sel->nns)
			break;
		if (!ns_matches(task, &sel->ns[n]))
			return false;
	}
	for (int c = 0; c < SP_MAX_CAP_FILTERS; c++) {
		if (c >= sel->ncaps)
			break;
		if (!caps_match(task, &sel->caps[c]))
			return false;
	}
	/* Strings first decided on their first bytes (cheapest), then the binary, then
	 * arguments in full. */
	for (int a = 0; a < SP_MAX_ARG_FILTERS; a++) {
		const volatile struct sp_arg_filter *f = &sel->args[a];

		if (a >= sel->nargs)
			break;
		if (f->lead_len && is_string(sp_config.args[f->arg].type) &&
		    (f->op == SP_OP_EQUAL || f->op == SP_OP_PREFIX) && lead_differs(ctx, f))
			return false;
	}
	if ((sel->binaries_op == SP_SET_IN || sel->binaries_op == SP_SET_NOT_IN) &&
	    !binary_matches(sel))
		return false;
	if ((sel->binaries_op == SP_SET_PREFIX || sel->binaries_op == SP_SET_NOT_PREFIX) &&
	    !binary_path_matches(s, sel))
		return false;
	for (int a = 0; a < SP_MAX_ARG_FILTERS; a++) {
		if (a >= sel->nargs)
			break;
		if (!arg_matches(ctx, s, &sel->args[a], loaded))
			return false;
	}
	return true;
}

static __always_inline void post(void *ctx, struct sp_scratch *s, struct task_struct *task,
				 int selector, __u8 action, __u32 *loaded)
{
	struct sp_event *ev = &s->ev;
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	for (int i = 0; i < SP_MAX_ARGS; i++) {
		if (i >= sp_config.nargs)
			break;
		load_arg(ctx, ev, i, loaded);
	}
	fill_event_header(&ev->hdr, SP_EVENT_POLICY);
	ev->hook_id = sp_config.hook_id;
	ev->pid = pid_tgid >> 32;
	ev->tid = (__u32)pid_tgid;
	ev->uid = (__u32)bpf_get_current_uid_gid();
	ev->ppid = BPF_CORE_READ(task, real_parent, tgid);
	ev->netns = BPF_CORE_READ(task, nsproxy, net_ns, ns.inum);
	ev->ktime_start = BPF_CORE_READ(task, group_leader, start_time);
	ev->selector = selector;
	ev->action = action;
	ev->nargs = sp_config.nargs;
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	emit_event(ev, sizeof(*ev));
}

static __always_inline void deny(struct sp_scratch *s, __u32 *loaded, void *ctx)
{
	struct sp_deny_ticket t = { .hook_id = sp_config.hook_id };
	__u64 id = bpf_get_current_pid_tgid();

	for (int i = 0; i < SP_MAX_ARGS; i++) {
		if (i >= sp_config.nargs)
			break;
		if (sp_config.args[i].type != SP_ARG_SOCKADDR)
			continue;
		load_arg(ctx, &s->ev, i, loaded);
		t.family = sockaddr_parts(s->ev.sockaddr, &t.port, t.addr);
		bpf_map_update_elem(&sp_deny, &id, &t, BPF_ANY);
		return;
	}
}

static __always_inline int run_hook(void *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct sp_scratch *s;
	__u32 zero = 0, loaded = 0;

	if (sp_config.scoped) {
		__u32 netns = BPF_CORE_READ(task, nsproxy, net_ns, ns.inum);

		if (!bpf_map_lookup_elem(&sp_scope, &netns))
			return 0;
	}
	if (sp_config.has_override) {
		__u64 id = bpf_get_current_pid_tgid();

		bpf_map_delete_elem(&sp_deny, &id);  /* a ticket is for one call only */
	}
	s = bpf_map_lookup_elem(&scratch, &zero);
	if (!s)
		return 0;
	if (sp_config.nselectors == 0) {
		post(ctx, s, task, 0, SP_ACTION_POST, &loaded);
		return 0;
	}
	for (int i = 0; i < SP_MAX_SELECTORS; i++) {
		const volatile struct sp_selector *sel = &sp_config.selectors[i];

		if (i >= sp_config.nselectors)
			break;
		if (!selector_matches(ctx, s, task, sel, &loaded))
			continue;
		if (sel->signal)
			bpf_send_signal(sel->signal);
		if (sel->override)
			deny(s, &loaded, ctx);
		if (sel->post)
			post(ctx, s, task, i + 1, sel->action, &loaded);
		return 0;  /* the first matching selector decides */
	}
	return 0;
}

SEC("tracepoint")
int sp_tracepoint(void *ctx)
{
	return run_hook(ctx);
}

SEC("uprobe")
int sp_uprobe(struct pt_regs *ctx)
{
	return run_hook(ctx);
}

SEC("kprobe")
int sp_kprobe(struct pt_regs *ctx)
{
	return run_hook(ctx);
}

char LICENSE[] SEC("license") = "GPL";
