// SPDX-License-Identifier: GPL-2.0
/* The enforcing half of a TracingPolicy's Override on connect/sendto: cgroup sock_addr
 * hooks that refuse (EPERM) the call a policy hook (security_policy.bpf.c) decided to
 * refuse moments before, in the same syscall on the same thread. The decision is taken
 * there, with every selector a policy has; here only its ticket is checked: it must name
 * this destination, so a ticket from a call that failed before reaching us refuses
 * nothing else. Attached to the agent's --cgroup-root, so it covers only the processes
 * below it.
 */
#include "include/trace.h"
#include "abi/security_policy.h"

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct sp_deny_ticket);
} sp_deny SEC(".maps");

/* Refusals per hook id, for `policy list` and the tests. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} sp_denied SEC(".maps");

static __always_inline int check(__u16 family, __u16 port, const __u8 addr[16])
{
	__u64 id = bpf_get_current_pid_tgid();
	struct sp_deny_ticket *t = bpf_map_lookup_elem(&sp_deny, &id);
	__u64 one = 1, *count;
	__u32 hook;

	if (!t)
		return 1;
	if (t->family != family || t->port != port)
		return 1;
	for (int i = 0; i < 16; i++) {
		if (t->addr[i] != addr[i])
			return 1;
	}
	hook = t->hook_id;
	bpf_map_delete_elem(&sp_deny, &id);
	count = bpf_map_lookup_elem(&sp_denied, &hook);
	if (count)
		__sync_fetch_and_add(count, 1);
	else
		bpf_map_update_elem(&sp_denied, &hook, &one, BPF_NOEXIST);
	return 0;  /* EPERM to the caller */
}

static __always_inline int check4(struct bpf_sock_addr *ctx)
{
	__u8 addr[16] = {};
	__u32 ip = ctx->user_ip4;

	addr[10] = 0xff;
	addr[11] = 0xff;
	__builtin_memcpy(addr + 12, &ip, 4);
	return check(2, bpf_ntohs(ctx->user_port), addr);
}

static __always_inline int check6(struct bpf_sock_addr *ctx)
{
	__u8 addr[16];
	__u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1];
	__u32 w2 = ctx->user_ip6[2], w3 = ctx->user_ip6[3];

	__builtin_memcpy(addr, &w0, 4);
	__builtin_memcpy(addr + 4, &w1, 4);
	__builtin_memcpy(addr + 8, &w2, 4);
	__builtin_memcpy(addr + 12, &w3, 4);
	return check(10, bpf_ntohs(ctx->user_port), addr);
}

SEC("cgroup/connect4")
int sp_connect4(struct bpf_sock_addr *ctx)
{
	return check4(ctx);
}

SEC("cgroup/connect6")
int sp_connect6(struct bpf_sock_addr *ctx)
{
	return check6(ctx);
}

SEC("cgroup/sendmsg4")
int sp_sendmsg4(struct bpf_sock_addr *ctx)
{
	return check4(ctx);
}

SEC("cgroup/sendmsg6")
int sp_sendmsg6(struct bpf_sock_addr *ctx)
{
	return check6(ctx);
}

char LICENSE[] SEC("license") = "GPL";
