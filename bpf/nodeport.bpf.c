// SPDX-License-Identifier: GPL-2.0
/* The per-packet service path (Cilium's NodePort/externalIP handling without kube-proxy):
 * tc programs on the node's external devices translate traffic from outside the node to
 * a service frontend of scope EXTERNAL (abi/service.h: NodePort on a node address,
 * externalIPs) into traffic to one of its backends, and translate the replies back.
 *
 *   nodeport_ingress  a reply of an SNAT flow (to the node's address and a NAT port):
 *                     back to the client, from the frontend; else a packet to a frontend:
 *                     its flow's backend (np_flows), chosen on the first packet as the
 *                     socket LB chooses (lib/service.h: random or Maglev, ClientIP
 *                     affinity), then
 *                       local backend (a pod): DNAT, the stack delivers it;
 *                       remote, SNAT mode: DNAT + SNAT to the node's address, redirected
 *                         to the device towards the backend; replies come back here;
 *                       remote, DSR mode: IPv4-in-IPv4 to the backend's address (the
 *                         inner packet unchanged), which answers the client directly.
 *                     A frontend without a backend drops (externalTrafficPolicy=Local
 *                     with no local backend leaves the set empty: dropped, as Cilium).
 *   nodeport_egress   a local backend's reply leaving for the client: its source becomes
 *                     the frontend.
 * Both families, as Cilium's dual-stack NodePort: IPv6 takes the same steps with maps of
 * its own (np6_*), IPv6-in-IPv6 for DSR (lb_decap or an ip6tnl device on the backend).
 * IPv6 extension headers: hop-by-hop and destination options are walked and kept; a
 * packet to a frontend with a routing, fragment or AH header is dropped (NP_STAT_EXTHDR:
 * rewriting its addresses would break the header), later fragments pass as IPv4's do.
 * ICMP errors about translated flows are translated too, outer header and the quoted
 * one (addresses, ports, both checksums), so the client's or the backend's stack finds
 * the socket (path MTU discovery and port unreachable work through a NodePort):
 *   ingress: quoting an SNAT'd request (node:NAT port -> backend): to the client;
 *            quoting a reply (frontend -> client) of a local or SNAT flow: to the backend;
 *   egress:  a local backend's (or the node's, on the way to it) error quoting a DNAT'd
 *            request (client -> backend): as if the frontend had sent it.
 * An error whose outer source is the backend itself gets the frontend as source.
 * Load-time config: np_mode (enum np_mode), np_node_ip4 and np_node_ip6 (SNAT source,
 * DSR outer source; an all-zero np_node_ip6 leaves IPv6 untouched).
 * The endpoint programs still see the translated packets, so policy applies to the
 * backend pod with the client as the peer: a service does not bypass policy.
 */
#include "include/common.h"
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include "abi/nodeport.h"
#include "lib/jhash.h"
#include "lib/parse.h"
#include "lib/service.h"
#include "lib/l4_nat.h"
#include "lib/icmp_nat.h"

#define AF_INET_ 2
#define AF_INET6_ 10
/* Ethernet, IPv6 with 64 bytes of options (or IPv4 with 60), the ports or ICMP header */
#define HEADERS_MAX (ETH_HLEN + 40 + 64 + 8)

const volatile __u32 np_mode = NP_MODE_SNAT;
const volatile __be32 np_node_ip4 = 0;
const volatile __u32 np_node_ip6[4] = {};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NP_FLOWS_SIZE);
	__type(key, struct np_tuple);
	__type(value, struct np_flow);
} np_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NP_FLOWS_SIZE);
	__type(key, struct np_tuple);
	__type(value, struct np_rev_nat);
} np_rev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NP_FLOWS_SIZE);
	__type(key, struct np6_tuple);
	__type(value, struct np6_flow);
} np6_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NP_FLOWS_SIZE);
	__type(key, struct np6_tuple);
	__type(value, struct np6_rev_nat);
} np6_rev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} np_devices SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NP_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} np_stats SEC(".maps");

/* Where a packet's headers are. Tuples of either family are np6_tuples, IPv4 addresses in
 * their first 4 bytes (zeros after), as abi/service.h keeps addresses. */
struct where {
	__u32 l3;
	__u32 l4;
	__u8 proto;
	__u8 family;
	__u8 plain;     /* IPv6: no extension header before the upper layer */
	__u8 fragment;  /* enum pkt_fragment */
};

enum parsed {
	PARSED_OTHER = -1,  /* passed untouched */
	PARSED_PORTS = 0,   /* TCP or UDP */
	PARSED_ICMP = 1,    /* an ICMP or ICMPv6 error */
};

static __always_inline int count(__u32 stat, int verdict)
{
	__u64 *c = bpf_map_lookup_elem(&np_stats, &stat);

	if (c)
		*c += 1;
	return verdict;
}

/* The node's address of `family` (SNAT source, DSR outer source) into `addr`. */
static __always_inline void node_addr(__u8 family, __u8 *addr)
{
	__u32 *a = (__u32 *)addr;

	__builtin_memset(addr, 0, 16);
	if (family == 4) {
		a[0] = np_node_ip4;
	} else {
		a[0] = np_node_ip6[0];
		a[1] = np_node_ip6[1];
		a[2] = np_node_ip6[2];
		a[3] = np_node_ip6[3];
	}
}

static __always_inline int is_node(const __u8 *addr, __u8 family)
{
	__u8 node[16];

	node_addr(family, node);
	return addr_equal(addr, node, family);
}

static __always_inline int icmp_is_error(__u8 family, __u8 type)
{
	if (family == 4) /* destination unreachable, time exceeded, parameter problem */
		return type == 3 || type == 11 || type == 12;
	return type >= 1 && type <= 4; /* unreachable, packet too big, time, parameter */
}

/* The headers in the linear part, parsed: PARSED_PORTS and `t`, `w` filled for TCP/UDP
 * that is not a later fragment, PARSED_ICMP for an ICMP error (`w` only), else
 * PARSED_OTHER. IPv6 only when the node has an IPv6 address. */
static __noinline int parse(struct __sk_buff *skb, struct where *w, struct np6_tuple *t)
{
	void *data, *data_end;
	struct pkt p = {};
	__u8 type;
	int res;

	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (data + HEADERS_MAX > data_end && data_end - data < skb->len) {
		/* headers beyond the linear part (rare): pull them in, at a cost */
		bpf_skb_pull_data(skb, skb->len < HEADERS_MAX ? skb->len : HEADERS_MAX);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	res = parse_packet(data, data_end, &p);
	if (res != PARSE_L4 && res != PARSE_L3)
		return PARSED_OTHER;
	if (p.family == 6 && !np_node_ip6[0] && !np_node_ip6[1] && !np_node_ip6[2] &&
	    !np_node_ip6[3])
		return PARSED_OTHER;
	w->l3 = p.l3_off;
	w->l4 = p.l3_off + p.l4_rel;
	w->proto = p.protocol;
	w->family = p.family;
	w->plain = p.family == 4 || p.l4_rel == sizeof(struct ipv6hdr);
	w->fragment = p.fragment;
	if (res == PARSE_L3) {
		if (p.fragment != PKT_NOT_FRAGMENT ||
		    p.protocol != (p.family == 4 ? IPPROTO_ICMP : IPPROTO_ICMPV6))
			return PARSED_OTHER;
		if (bpf_skb_load_bytes(skb, w->l4, &type, 1) || w->l4 + ICMP_HLEN > skb->len ||
		    !icmp_is_error(p.family, type))
			return PARSED_OTHER;
		return PARSED_ICMP;
	}
	if (p.protocol != IPPROTO_TCP && p.protocol != IPPROTO_UDP)
		return PARSED_OTHER;
	__builtin_memcpy(t->saddr, p.src, 16);
	__builtin_memcpy(t->daddr, p.dst, 16);
	t->sport = p.sport;
	t->dport = p.dport;
	t->protocol = p.protocol;
	return PARSED_PORTS;
}

/* Whether an IPv6 header chain before the upper layer holds only hop-by-hop and
 * destination options (translated as they are; anything else is not). */
static __always_inline int only_options(struct __sk_buff *skb, const struct where *w)
{
	__u32 off = w->l3 + sizeof(struct ipv6hdr);
	__u8 next, opt[2];

	if (w->plain)
		return 1;
	if (w->fragment != PKT_NOT_FRAGMENT || bpf_skb_load_bytes(skb, w->l3 + 6, &next, 1))
		return 0;
#pragma unroll
	for (int i = 0; i < PARSE_MAX_EXTHDRS; i++) {
		if (next != IPPROTO_HOPOPTS && next != IPPROTO_DSTOPTS)
			return off == w->l4;
		if (bpf_skb_load_bytes(skb, off, opt, sizeof(opt)))
			return 0;
		next = opt[0];
		off += (opt[1] + 1) * 8;
	}
	return 0;
}

/* ---- the flow maps, either family ------------------------------------------------------ */
static __always_inline void tuple4(const struct np6_tuple *t, struct np_tuple *k)
{
	__builtin_memset(k, 0, sizeof(*k));
	__builtin_memcpy(&k->saddr, t->saddr, 4);
	__builtin_memcpy(&k->daddr, t->daddr, 4);
	k->sport = t->sport;
	k->dport = t->dport;
	k->protocol = t->protocol;
}

static __always_inline int flow_get(__u8 family, const struct np6_tuple *t, struct np6_flow *f)
{
	struct np_tuple k;
	struct np_flow *v4;
	struct np6_flow *v6;

	if (family == 6) {
		v6 = bpf_map_lookup_elem(&np6_flows, t);
		if (!v6)
			return -1;
		*f = *v6;
		return 0;
	}
	tuple4(t, &k);
	v4 = bpf_map_lookup_elem(&np_flows, &k);
	if (!v4)
		return -1;
	__builtin_memset(f, 0, sizeof(*f));
	__builtin_memcpy(f->backend_addr, &v4->backend_addr, 4);
	f->backend_port = v4->backend_port;
	f->kind = v4->kind;
	f->backend = v4->backend;
	f->revnat = v4->revnat;
	f->nat_port = v4->nat_port;
	f->mss = v4->mss;
	f->ifindex = v4->ifindex;
	return 0;
}

static __always_inline void flow_put(__u8 family, const struct np6_tuple *t,
				     const struct np6_flow *f)
{
	struct np_flow v4 = {};
	struct np_tuple k;

	if (family == 6) {
		bpf_map_update_elem(&np6_flows, t, f, BPF_ANY);
		return;
	}
	tuple4(t, &k);
	__builtin_memcpy(&v4.backend_addr, f->backend_addr, 4);
	v4.backend_port = f->backend_port;
	v4.kind = f->kind;
	v4.backend = f->backend;
	v4.revnat = f->revnat;
	v4.nat_port = f->nat_port;
	v4.mss = f->mss;
	v4.ifindex = f->ifindex;
	bpf_map_update_elem(&np_flows, &k, &v4, BPF_ANY);
}

static __always_inline int rev_get(__u8 family, const struct np6_tuple *t,
				   struct np6_rev_nat *r)
{
	struct np_rev_nat *v4;
	struct np6_rev_nat *v6;
	struct np_tuple k;

	if (family == 6) {
		v6 = bpf_map_lookup_elem(&np6_rev, t);
		if (!v6)
			return -1;
		*r = *v6;
		return 0;
	}
	tuple4(t, &k);
	v4 = bpf_map_lookup_elem(&np_rev, &k);
	if (!v4)
		return -1;
	__builtin_memset(r, 0, sizeof(*r));
	__builtin_memcpy(r->saddr, &v4->saddr, 4);
	__builtin_memcpy(r->daddr, &v4->daddr, 4);
	r->sport = v4->sport;
	r->dport = v4->dport;
	return 0;
}

static __always_inline long rev_put(__u8 family, const struct np6_tuple *t,
				    const struct np6_rev_nat *r, __u64 flags)
{
	struct np_rev_nat v4 = {};
	struct np_tuple k;

	if (family == 6)
		return bpf_map_update_elem(&np6_rev, t, r, flags);
	tuple4(t, &k);
	__builtin_memcpy(&v4.saddr, r->saddr, 4);
	__builtin_memcpy(&v4.daddr, r->daddr, 4);
	v4.sport = r->sport;
	v4.dport = r->dport;
	return bpf_map_update_elem(&np_rev, &k, &v4, flags);
}

/* ---- rewriting (lib/l4_nat.h) ---------------------------------------------------------- */
/* Rewrite a packet matching `t` to the addresses and ports of `to`. */
static __always_inline int apply(struct __sk_buff *skb, const struct where *w,
				 const struct np6_tuple *t, const struct np6_rev_nat *to)
{
	if (l4_nat_rewrite(skb, w->l3, w->l4, w->family, w->proto, 1, t->saddr, to->saddr,
			   t->sport, to->sport))
		return -1;
	return l4_nat_rewrite(skb, w->l3, w->l4, w->family, w->proto, 0, t->daddr, to->daddr,
			      t->dport, to->dport);
}

/* The device towards `dst` (0: no route). */
static __always_inline __u32 route(struct __sk_buff *skb, __u8 family, const __u8 *dst)
{
	struct bpf_fib_lookup fib = {
		.family = family == 6 ? AF_INET6_ : AF_INET_,
		.ifindex = skb->ingress_ifindex ? skb->ingress_ifindex : skb->ifindex,
	};
	long res;

	if (family == 6)
		__builtin_memcpy(fib.ipv6_dst, dst, 16);
	else
		__builtin_memcpy(&fib.ipv4_dst, dst, 4);
	res = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (res != BPF_FIB_LKUP_RET_SUCCESS && res != BPF_FIB_LKUP_RET_NO_NEIGH)
		return 0;
	return fib.ifindex;
}

/* The flow's 5-tuple hash as lib/jhash.h computes it for the LB (membrane.lb.flowhash):
 * ten words, the addresses 16 bytes each (IPv4 in the first 4), ports, protocol. */
static __always_inline __u32 flow_hash(const struct np6_tuple *t)
{
	__u32 words[10] = {};

	__builtin_memcpy(words, t->saddr, 16);
	__builtin_memcpy(&words[4], t->daddr, 16);
	words[8] = (__u32)t->sport | ((__u32)t->dport << 16);
	words[9] = t->protocol;
	return jhash2_10(words, SVC_HASH_SEED);
}

/* A backend for the new flow `t` to frontend `fe`, how it is reached and, for local
 * and SNAT flows, the reverse translation of its replies; recorded in the flow map.
 * Returns the np_stat of a drop, or -1 when the flow was set up. */
static __always_inline int new_flow(struct __sk_buff *skb, const struct where *w,
				    const struct svc_frontend *fe, const struct np6_tuple *t,
				    struct np6_flow *flow)
{
	struct svc_affinity_key akey = { .set = fe->set };
	struct np6_rev_nat back = { .sport = t->dport, .dport = t->sport };
	struct np6_tuple rkey = { .protocol = t->protocol };
	struct svc_set *set = svc_set_of(fe->set);
	struct svc_backend *be;
	__u32 id = 0, ifindex;

	if (!set)
		return NP_STAT_NO_BACKEND;
	if (set->flags & SVC_SET_AFFINITY) {
		__builtin_memcpy(akey.client, t->saddr, 16);
		id = svc_affinity_get(&akey, set);
	}
	if (!id)
		id = svc_pick(set, fe->set,
			      (set->flags & SVC_SET_MAGLEV) ? flow_hash(t) : bpf_get_prandom_u32());
	if (!id)
		return NP_STAT_NO_BACKEND;
	be = svc_backend(id);
	if (!be || be->family != w->family)
		return NP_STAT_NO_BACKEND;
	if (set->flags & SVC_SET_AFFINITY)
		svc_affinity_put(&akey, id);

	__builtin_memset(flow, 0, sizeof(*flow));
	__builtin_memcpy(flow->backend_addr, be->addr, 16);
	if (w->family == 4)
		__builtin_memset(flow->backend_addr + 4, 0, 12);
	flow->backend_port = be->port;
	flow->backend = id;
	flow->revnat = fe->revnat;
	ifindex = route(skb, w->family, flow->backend_addr);
	if (!ifindex)
		return NP_STAT_NO_ROUTE;
	__builtin_memcpy(back.saddr, t->daddr, 16);
	__builtin_memcpy(back.daddr, t->saddr, 16);
	__builtin_memcpy(rkey.saddr, flow->backend_addr, 16);
	rkey.sport = flow->backend_port;
	if (!bpf_map_lookup_elem(&np_devices, &ifindex)) {
		flow->kind = NP_KIND_LOCAL;
		__builtin_memcpy(rkey.daddr, t->saddr, 16);
		rkey.dport = t->sport;
		rev_put(w->family, &rkey, &back, BPF_ANY);
	} else if (np_mode == NP_MODE_DSR) {
		__u32 mtu = 1; /* a length that fits any device: the helper then tells its MTU */
		__u32 overhead = w->family == 6 ? NP_DSR_OVERHEAD6 : NP_DSR_OVERHEAD;

		flow->kind = NP_KIND_DSR;
		flow->ifindex = ifindex;
		if (bpf_check_mtu(skb, ifindex, &mtu, 0, 0) == 0 && mtu > overhead + 536)
			flow->mss = mtu - overhead;
		else
			flow->mss = 536; /* RFC 879's default, what any path carries */
	} else {
		flow->kind = NP_KIND_SNAT;
		flow->ifindex = ifindex;
		node_addr(w->family, rkey.daddr);
		for (int i = 0; i < NP_SNAT_PORT_TRIES; i++) {
			__u16 port = NP_SNAT_PORT_MIN + (bpf_get_prandom_u32() & 0x7fff);

			rkey.dport = port;
			if (!rev_put(w->family, &rkey, &back, BPF_NOEXIST)) {
				flow->nat_port = port;
				break;
			}
		}
		if (!flow->nat_port)
			return NP_STAT_NO_ROUTE;
	}
	flow_put(w->family, t, flow);
	count(NP_STAT_NEW_FLOW, 0);
	return -1;
}

/* Lower the MSS option of a TCP SYN to `mss`: the client then never sends a segment that
 * the outer header makes too big for the path (no ICMP "fragmentation needed" needed). */
static __always_inline void clamp_mss(struct __sk_buff *skb, const struct where *w, __u16 mss)
{
	__u8 hdr[2], opt[4];
	__u32 off = 20, doff;

	if (w->proto != IPPROTO_TCP || bpf_skb_load_bytes(skb, w->l4 + 12, hdr, sizeof(hdr)))
		return;
	if (!(hdr[1] & 0x02)) /* SYN */
		return;
	doff = (hdr[0] >> 4) * 4;
	for (int i = 0; i < 20; i++) { /* 40 bytes of options: at most 20 of two bytes or more */
		if (off + 4 > doff || bpf_skb_load_bytes(skb, w->l4 + off, opt, sizeof(opt)))
			return;
		if (opt[0] == 0) /* end of options */
			return;
		if (opt[0] == 1) { /* no-op */
			off += 1;
			continue;
		}
		if (opt[0] == 2 && opt[1] == 4) {
			__be16 old = (__be16)(opt[2] | (opt[3] << 8)), new = bpf_htons(mss);

			if (((__u16)opt[2] << 8 | opt[3]) <= mss)
				return;
			if (!bpf_l4_csum_replace(skb, w->l4 + 16, old, new, sizeof(new)) &&
			    !bpf_skb_store_bytes(skb, w->l4 + off + 2, &new, sizeof(new), 0))
				count(NP_STAT_MSS_CLAMPED, 0);
			return;
		}
		if (opt[1] < 2)
			return;
		off += opt[1];
	}
}

/* Prepend an outer IPv4 header, node -> `dst`, protocol IPIP. */
static __always_inline int encapsulate4(struct __sk_buff *skb, const struct where *w,
					const __u8 *dst)
{
	struct iphdr inner, outer = {};
	__u32 sum;

	if (bpf_skb_load_bytes(skb, w->l3, &inner, sizeof(inner)))
		return -1;
	if (bpf_skb_adjust_room(skb, sizeof(outer), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV4))
		return -1;
	outer.version = 4;
	outer.ihl = 5;
	outer.tos = inner.tos;
	outer.tot_len = bpf_htons(bpf_ntohs(inner.tot_len) + sizeof(outer));
	outer.ttl = NP_OUTER_TTL;
	outer.protocol = IPPROTO_IPIP;
	outer.saddr = np_node_ip4;
	__builtin_memcpy(&outer.daddr, dst, 4);
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&outer, sizeof(outer), 0);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	outer.check = (__u16)~sum;
	return bpf_skb_store_bytes(skb, w->l3, &outer, sizeof(outer), 0) ? -1 : 0;
}

/* Prepend an outer IPv6 header, node -> `dst`, next header IPv6; traffic class and flow
 * label as the inner packet's, so the flow keeps its path. */
static __always_inline int encapsulate6(struct __sk_buff *skb, const struct where *w,
					const __u8 *dst)
{
	struct ipv6hdr inner, outer;

	if (bpf_skb_load_bytes(skb, w->l3, &inner, sizeof(inner)))
		return -1;
	if (bpf_skb_adjust_room(skb, sizeof(outer), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV6))
		return -1;
	outer = inner; /* version, traffic class, flow label */
	outer.payload_len = bpf_htons(bpf_ntohs(inner.payload_len) + sizeof(inner));
	outer.nexthdr = IPPROTO_IPV6;
	outer.hop_limit = NP_OUTER_TTL;
	node_addr(6, (__u8 *)&outer.saddr);
	__builtin_memcpy(&outer.daddr, dst, 16);
	return bpf_skb_store_bytes(skb, w->l3, &outer, sizeof(outer), 0) ? -1 : 0;
}

static __always_inline struct svc_frontend *frontend_of(const struct where *w,
							const struct np6_tuple *t)
{
	struct svc_frontend_key key = { .port = t->dport, .protocol = t->protocol,
					.family = w->family, .scope = SVC_SCOPE_EXTERNAL };
	struct svc_frontend *fe;

	__builtin_memcpy(key.addr, t->daddr, 16);
	fe = svc_lookup(&key);
	if (fe || !is_node(t->daddr, w->family))
		return fe;
	__builtin_memset(key.addr, 0, sizeof(key.addr)); /* a NodePort on every node address */
	return svc_lookup(&key);
}

/* ---- ICMP errors (the rewrites: lib/icmp_nat.h) ---------------------------------------- */
static __always_inline void reversed(const struct np6_tuple *t, struct np6_tuple *r)
{
	__builtin_memset(r, 0, sizeof(*r));
	__builtin_memcpy(r->saddr, t->daddr, 16);
	__builtin_memcpy(r->daddr, t->saddr, 16);
	r->sport = t->dport;
	r->dport = t->sport;
	r->protocol = t->protocol;
}

/* An ICMP error on the device's ingress (`ingress`) or egress about a translated flow:
 * rewritten (see the header comment) and sent on; anything else passes untouched. Not
 * inlined: its stack is its own. */
static __noinline int icmp_error(struct __sk_buff *skb, const struct where *w, int ingress)
{
	struct np6_tuple q, key, to;
	struct np6_rev_nat back;
	struct np6_flow flow;
	__u8 osrc[16] = {}, odst[16] = {};
	const __u8 *nsrc = osrc, *ndst = odst;
	__u32 len, ifindex = 0;
	int pass = 1;

	if (icmp_quoted(skb, w->l4, w->family, &q, &len) ||
	    icmp_outer_addrs(skb, w->l3, w->family, osrc, odst))
		return TC_ACT_OK;
	reversed(&q, &key); /* the quoted packet went the other way */
	if (!ingress) {
		/* a local backend's error about a DNAT'd request: from the frontend */
		if (rev_get(w->family, &key, &back) || !addr_equal(back.daddr, q.saddr, w->family))
			return TC_ACT_OK;
		to = q;
		__builtin_memcpy(to.daddr, back.saddr, 16);
		to.dport = back.sport;
		if (addr_equal(osrc, q.daddr, w->family))
			nsrc = back.saddr;
	} else if (is_node(q.saddr, w->family) && !rev_get(w->family, &key, &back)) {
		/* about an SNAT'd request (node:NAT port -> backend): to the client */
		to = q;
		__builtin_memcpy(to.saddr, back.daddr, 16);
		__builtin_memcpy(to.daddr, back.saddr, 16);
		to.sport = back.dport;
		to.dport = back.sport;
		ndst = back.daddr;
		if (addr_equal(osrc, q.daddr, w->family))
			nsrc = back.saddr;
		ifindex = route(skb, w->family, ndst);
		if (!ifindex)
			return count(NP_STAT_NO_ROUTE, TC_ACT_SHOT);
		pass = 0;
	} else if (!flow_get(w->family, &key, &flow) && flow.kind != NP_KIND_DSR) {
		/* about a reply (frontend -> client): to the backend that sent it */
		to = q;
		__builtin_memcpy(to.saddr, flow.backend_addr, 16);
		to.sport = flow.backend_port;
		ndst = flow.backend_addr;
		if (flow.kind == NP_KIND_SNAT) {
			node_addr(w->family, to.daddr);
			to.dport = flow.nat_port;
			ifindex = flow.ifindex;
			pass = 0;
		}
	} else {
		return TC_ACT_OK;
	}
	if (icmp_quote_rewrite(skb, w->l4, w->family, &to, len) ||
	    icmp_outer_rewrite(skb, w->l3, w->l4, w->family, 1, osrc, nsrc) ||
	    icmp_outer_rewrite(skb, w->l3, w->l4, w->family, 0, odst, ndst))
		return count(NP_STAT_ERROR, TC_ACT_SHOT);
	count(NP_STAT_ICMP_ERROR, 0);
	return pass ? TC_ACT_OK : bpf_redirect_neigh(ifindex, NULL, 0, 0);
}

/* A TCP or UDP packet `t` arriving on the device: see the header comment. Not inlined,
 * like icmp_error: each has a stack of its own. */
static __noinline int ingress(struct __sk_buff *skb, const struct where *w,
			      const struct np6_tuple *t)
{
	struct np6_flow fresh, *flow = &fresh;
	struct np6_rev_nat to;
	struct svc_frontend *fe;
	__u32 ifindex;
	int stat;

	if (is_node(t->daddr, w->family) && !rev_get(w->family, t, &to)) {
		/* a remote backend's reply to an SNAT flow */
		if (apply(skb, w, t, &to))
			return count(NP_STAT_ERROR, TC_ACT_SHOT);
		ifindex = route(skb, w->family, to.daddr);
		if (!ifindex)
			return count(NP_STAT_NO_ROUTE, TC_ACT_SHOT);
		count(NP_STAT_REPLY_SNAT, 0);
		return bpf_redirect_neigh(ifindex, NULL, 0, 0);
	}

	fe = frontend_of(w, t);
	if (!fe)
		return TC_ACT_OK;
	if (w->family == 6 && !only_options(skb, w))
		return count(NP_STAT_EXTHDR, TC_ACT_SHOT);
	if (flow_get(w->family, t, &fresh) || !svc_backend(fresh.backend)) {
		stat = new_flow(skb, w, fe, t, &fresh);
		if (stat >= 0)
			return count(stat, TC_ACT_SHOT);
	}
	__builtin_memcpy(to.saddr, t->saddr, 16);
	to.sport = t->sport;
	__builtin_memcpy(to.daddr, flow->backend_addr, 16);
	to.dport = flow->backend_port;
	if (flow->kind == NP_KIND_LOCAL) {
		if (apply(skb, w, t, &to))
			return count(NP_STAT_ERROR, TC_ACT_SHOT);
		return count(NP_STAT_TO_LOCAL, TC_ACT_OK);
	}
	if (flow->kind == NP_KIND_DSR) {
		clamp_mss(skb, w, flow->mss);
		if (w->family == 6 ? encapsulate6(skb, w, flow->backend_addr)
				  : encapsulate4(skb, w, flow->backend_addr))
			return count(NP_STAT_ERROR, TC_ACT_SHOT);
		count(NP_STAT_TO_DSR, 0);
		return bpf_redirect_neigh(flow->ifindex, NULL, 0, 0);
	}
	node_addr(w->family, to.saddr);
	to.sport = flow->nat_port;
	if (apply(skb, w, t, &to))
		return count(NP_STAT_ERROR, TC_ACT_SHOT);
	count(NP_STAT_TO_SNAT, 0);
	return bpf_redirect_neigh(flow->ifindex, NULL, 0, 0);
}

SEC("tc")
int nodeport_ingress(struct __sk_buff *skb)
{
	struct where w = {};
	struct np6_tuple t = {};
	int parsed = parse(skb, &w, &t);

	if (parsed == PARSED_ICMP)
		return icmp_error(skb, &w, 1);
	if (parsed != PARSED_PORTS)
		return TC_ACT_OK;
	return ingress(skb, &w, &t);
}

/* A local backend's TCP or UDP reply `t` leaving by the device: from the frontend. */
static __noinline int egress(struct __sk_buff *skb, const struct where *w,
			     const struct np6_tuple *t)
{
	struct np6_rev_nat to;

	if (rev_get(w->family, t, &to))
		return TC_ACT_OK;
	if (apply(skb, w, t, &to))
		return count(NP_STAT_ERROR, TC_ACT_SHOT);
	return count(NP_STAT_REPLY_LOCAL, TC_ACT_OK);
}

SEC("tc")
int nodeport_egress(struct __sk_buff *skb)
{
	struct where w = {};
	struct np6_tuple t = {};
	int parsed = parse(skb, &w, &t);

	if (parsed == PARSED_ICMP)
		return icmp_error(skb, &w, 0);
	if (parsed != PARSED_PORTS)
		return TC_ACT_OK;
	return egress(skb, &w, &t);
}

char LICENSE[] SEC("license") = "GPL";
