// SPDX-License-Identifier: GPL-2.0
/* Socket LB (east-west services, Cilium's kube-proxy replacement at the socket): cgroup
 * sock_addr programs that translate a service frontend to one of its backends when a
 * socket connects (TCP, connected UDP) or sends a datagram (unconnected UDP), so the
 * packets carry the backend's address from the start: no per-packet NAT, and the
 * endpoint programs enforce policy on the backend's identity.
 *
 *   connect4/6      frontend -> backend, once per connection
 *   sendmsg4/6      the same per datagram; a socket keeps its backend (svc_sock FWD)
 *   recvmsg4/6      a reply from the backend shows the frontend as its source
 *   getpeername4/6  the peer shows as the frontend
 *
 * Return 1 lets the call go on; 0 fails it with EPERM (a frontend without backends, as
 * a connect that no backend could take should fail at once, not time out).
 */
#include "include/common.h"
#include <linux/in.h>
#include "lib/service.h"

#define SYS_PROCEED 1
#define SYS_REJECT 0

static __always_inline void addr_of(struct bpf_sock_addr *ctx, __u8 family, __u8 *addr)
{
	if (family == 4) {
		__u32 a = ctx->user_ip4;

		__builtin_memcpy(addr, &a, 4);
	} else {
		__u32 a[4];

		a[0] = ctx->user_ip6[0];
		a[1] = ctx->user_ip6[1];
		a[2] = ctx->user_ip6[2];
		a[3] = ctx->user_ip6[3];
		__builtin_memcpy(addr, a, 16);
	}
}

static __always_inline void set_addr(struct bpf_sock_addr *ctx, __u8 family, const __u8 *addr,
				     __u16 port)
{
	if (family == 4) {
		__u32 a;

		__builtin_memcpy(&a, addr, 4);
		ctx->user_ip4 = a;
	} else {
		__u32 a[4];

		__builtin_memcpy(a, addr, 16);
		ctx->user_ip6[0] = a[0];
		ctx->user_ip6[1] = a[1];
		ctx->user_ip6[2] = a[2];
		ctx->user_ip6[3] = a[3];
	}
	ctx->user_port = bpf_htons(port);
}

/* The backend for a new connection (or a socket's first datagram) to the frontend. */
static __always_inline __u32 choose(struct bpf_sock_addr *ctx, const struct svc_frontend *fe)
{
	struct svc_affinity_key akey = { .set = fe->set, .netns = 1 };
	struct svc_set *set = svc_set_of(fe->set);
	__u64 netns;
	__u32 id;

	if (!set)
		return 0;
	if (set->flags & SVC_SET_AFFINITY) {
		netns = bpf_get_netns_cookie(ctx);
		__builtin_memcpy(akey.client, &netns, sizeof(netns));
		id = svc_affinity_get(&akey, set);
		if (id)
			goto chosen;
	}
	/* No 5-tuple yet (the source port is chosen later): a Maglev set picks its table's
	 * slot from the socket's cookie, which is as good as random and never names a
	 * backend the table left out. */
	id = svc_pick(set, fe->set, (set->flags & SVC_SET_MAGLEV) ?
				 (__u32)bpf_get_socket_cookie(ctx) * 2654435761U :
				 bpf_get_prandom_u32());
	if (!id)
		return 0;
chosen:
	if (set->flags & SVC_SET_AFFINITY)
		svc_affinity_put(&akey, id);
	return id;
}

static __always_inline void remember(__u64 cookie, __u8 dir, const __u8 *key_addr,
				     __u16 key_port, __u8 family, const __u8 *addr, __u16 port,
				     __u32 id)
{
	struct svc_sock_key k = { .cookie = cookie, .port = key_port, .family = family,
				  .dir = dir };
	struct svc_sock_value v = { .port = port, .family = family, .id = id };

	__builtin_memcpy(k.addr, key_addr, 16);
	__builtin_memcpy(v.addr, addr, 16);
	bpf_map_update_elem(&svc_sock, &k, &v, BPF_ANY);
}

/* Which frontend this netns reached the backend through (flows name the service). Only
 * written when it changes: connects to the same backend cost a lookup. */
static __always_inline void note_xlate(struct bpf_sock_addr *ctx, const struct svc_backend *be,
				       __u32 revnat)
{
	struct svc_xlate_key k = { .netns = bpf_get_netns_cookie(ctx), .port = be->port,
				   .protocol = be->protocol, .family = be->family };
	__u32 *known;

	__builtin_memcpy(k.addr, be->addr, 16);
	known = bpf_map_lookup_elem(&svc_xlate, &k);
	if (!known || *known != revnat)
		bpf_map_update_elem(&svc_xlate, &k, &revnat, BPF_ANY);
}

/* Translate the destination if it is a frontend. `keep`: reuse the backend this socket
 * was given before (unconnected UDP), while it exists and is not in maintenance. */
static __always_inline int translate(struct bpf_sock_addr *ctx, __u8 family, bool keep)
{
	struct svc_frontend_key key = { .family = family, .scope = SVC_SCOPE_INTERNAL };
	struct svc_frontend *fe;
	struct svc_backend *be = NULL;
	__u64 cookie;
	__u32 id = 0;

	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return SYS_PROCEED;
	addr_of(ctx, family, key.addr);
	key.port = bpf_ntohs(ctx->user_port);
	key.protocol = ctx->protocol;
	fe = svc_lookup(&key);
	if (!fe)
		return SYS_PROCEED;
	cookie = bpf_get_socket_cookie(ctx);
	if (keep) {
		struct svc_sock_key fk = { .cookie = cookie, .port = key.port, .family = family,
					   .dir = SVC_SOCK_FWD };
		struct svc_sock_value *known;

		__builtin_memcpy(fk.addr, key.addr, 16);
		known = bpf_map_lookup_elem(&svc_sock, &fk);
		if (known) {
			be = svc_backend(known->id);
			if (be && be->state != SVC_BACKEND_MAINTENANCE && svc_addr_equal(be->addr, known->addr) &&
			    be->port == known->port)
				id = known->id;
			else
				be = NULL;
		}
	}
	if (!id) {
		id = choose(ctx, fe);
		be = id ? svc_backend(id) : NULL;
	}
	if (!be || be->family != family)
		return SYS_REJECT;
	if (keep)
		remember(cookie, SVC_SOCK_FWD, key.addr, key.port, family, be->addr, be->port, id);
	remember(cookie, SVC_SOCK_REV, be->addr, be->port, family, key.addr, key.port, fe->revnat);
	note_xlate(ctx, be, fe->revnat);
	set_addr(ctx, family, be->addr, be->port);
	return SYS_PROCEED;
}

/* A peer address that is a backend this socket was translated to shows as the frontend. */
static __always_inline int reverse(struct bpf_sock_addr *ctx, __u8 family)
{
	struct svc_sock_key k = { .family = family, .dir = SVC_SOCK_REV };
	struct svc_sock_value *v;

	addr_of(ctx, family, k.addr);
	k.port = bpf_ntohs(ctx->user_port);
	k.cookie = bpf_get_socket_cookie(ctx);
	v = bpf_map_lookup_elem(&svc_sock, &k);
	if (v)
		set_addr(ctx, family, v->addr, v->port);
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int sock_connect4(struct bpf_sock_addr *ctx)
{
	return translate(ctx, 4, false);
}

SEC("cgroup/sendmsg4")
int sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return translate(ctx, 4, true);
}

SEC("cgroup/recvmsg4")
int sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return reverse(ctx, 4);
}

SEC("cgroup/getpeername4")
int sock_getpeername4(struct bpf_sock_addr *ctx)
{
	return reverse(ctx, 4);
}

SEC("cgroup/connect6")
int sock_connect6(struct bpf_sock_addr *ctx)
{
	return translate(ctx, 6, false);
}

SEC("cgroup/sendmsg6")
int sock_sendmsg6(struct bpf_sock_addr *ctx)
{
	return translate(ctx, 6, true);
}

SEC("cgroup/recvmsg6")
int sock_recvmsg6(struct bpf_sock_addr *ctx)
{
	return reverse(ctx, 6);
}

SEC("cgroup/getpeername6")
int sock_getpeername6(struct bpf_sock_addr *ctx)
{
	return reverse(ctx, 6);
}

char LICENSE[] SEC("license") = "GPL";
