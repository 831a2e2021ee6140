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
 * Load-time config: np_mode (enum np_mode), np_node_ip4 (SNAT source, DSR outer source).
 * The endpoint programs still see the translated packets, so policy applies to the
 * backend pod with the client as the peer: a service does not bypass policy.
 */
#include "include/common.h"
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include "abi/nodeport.h"
#include "lib/jhash.h"
#include "lib/parse.h"
#include "lib/service.h"

#define AF_INET_ 2
#define IP_CSUM_OFF 10
#define IP_SRC_OFF 12
#define IP_DST_OFF 16
#define HEADERS_MAX (ETH_HLEN + 60 + 8) /* Ethernet, IPv4 with options, the ports */

const volatile __u32 np_mode = NP_MODE_SNAT;
const volatile __be32 np_node_ip4 = 0;

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

struct where {
	__u32 l3;
	__u32 l4;
	__u8 proto;
};

static __always_inline int count(__u32 stat, int verdict)
{
	__u64 *c = bpf_map_lookup_elem(&np_stats, &stat);

	if (c)
		*c += 1;
	return verdict;
}

/* The headers in the linear part, parsed: 0 and `w` filled for TCP/UDP over IPv4 that
 * is not a later fragment, -1 for anything else (passed untouched). */
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p, struct where *w)
{
	void *data, *data_end;

	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (data + HEADERS_MAX > data_end && data_end - data < skb->len) {
		/* headers beyond the linear part (rare): pull them in, at a cost */
		bpf_skb_pull_data(skb, skb->len < HEADERS_MAX ? skb->len : HEADERS_MAX);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	if (parse_packet(data, data_end, p) != PARSE_L4 || p->family != 4)
		return -1;
	if (p->protocol != IPPROTO_TCP && p->protocol != IPPROTO_UDP)
		return -1;
	w->l3 = p->l3_off;
	w->l4 = p->l3_off + p->l4_rel;
	w->proto = p->protocol;
	return 0;
}

/* Replace the source (`src`) or destination address and port, fixing both checksums
 * (a UDP checksum of 0, "none", stays 0). */
static __always_inline int rewrite(struct __sk_buff *skb, const struct where *w, int src,
				   __be32 old_addr, __be32 new_addr, __u16 old_port, __u16 new_port)
{
	__u32 csum = w->l4 + (w->proto == IPPROTO_TCP ? 16 : 6);
	__u64 mangled = w->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__be16 op = bpf_htons(old_port), np = bpf_htons(new_port);

	if (old_addr != new_addr) {
		if (bpf_l4_csum_replace(skb, csum, old_addr, new_addr,
					BPF_F_PSEUDO_HDR | mangled | sizeof(new_addr)) ||
		    bpf_l3_csum_replace(skb, w->l3 + IP_CSUM_OFF, old_addr, new_addr,
					sizeof(new_addr)) ||
		    bpf_skb_store_bytes(skb, w->l3 + (src ? IP_SRC_OFF : IP_DST_OFF), &new_addr,
					sizeof(new_addr), 0))
			return -1;
	}
	if (op != np) {
		if (bpf_l4_csum_replace(skb, csum, op, np, mangled | sizeof(np)) ||
		    bpf_skb_store_bytes(skb, w->l4 + (src ? 0 : 2), &np, sizeof(np), 0))
			return -1;
	}
	return 0;
}

/* Rewrite a packet matching `t` to the addresses and ports of `to`. */
static __always_inline int apply(struct __sk_buff *skb, const struct where *w,
				 const struct np_tuple *t, const struct np_rev_nat *to)
{
	if (rewrite(skb, w, 1, t->saddr, to->saddr, t->sport, to->sport))
		return -1;
	return rewrite(skb, w, 0, t->daddr, to->daddr, t->dport, to->dport);
}

/* The device towards `dst` (0: no route). */
static __always_inline __u32 route(struct __sk_buff *skb, __be32 dst)
{
	struct bpf_fib_lookup fib = {
		.family = AF_INET_,
		.ifindex = skb->ingress_ifindex ? skb->ingress_ifindex : skb->ifindex,
		.ipv4_dst = dst,
	};
	long res = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);

	if (res != BPF_FIB_LKUP_RET_SUCCESS && res != BPF_FIB_LKUP_RET_NO_NEIGH)
		return 0;
	return fib.ifindex;
}

/* The flow's 5-tuple hash as lib/jhash.h computes it for the LB (membrane.lb.flowhash):
 * ten words, the addresses in the first 4 bytes of 16 each, ports, protocol. */
static __always_inline __u32 flow_hash(const struct np_tuple *t)
{
	__u32 words[10] = {};

	words[0] = t->saddr;
	words[4] = t->daddr;
	words[8] = (__u32)t->sport | ((__u32)t->dport << 16);
	words[9] = t->protocol;
	return jhash2_10(words, SVC_HASH_SEED);
}

/* A backend for the new flow `t` to frontend `fe`, how it is reached and, for local
 * and SNAT flows, the reverse translation of its replies; recorded in np_flows.
 * Returns the np_stat of a drop, or -1 when the flow was set up. */
static __always_inline int new_flow(struct __sk_buff *skb, const struct svc_frontend *fe,
				    const struct np_tuple *t, struct np_flow *flow)
{
	struct svc_affinity_key akey = { .set = fe->set };
	struct np_rev_nat back = { .saddr = t->daddr, .daddr = t->saddr,
				   .sport = t->dport, .dport = t->sport };
	struct np_tuple rkey = { .sport = 0, .protocol = t->protocol };
	struct svc_set *set = svc_set_of(fe->set);
	struct svc_backend *be;
	__u32 id = 0, ifindex;

	if (!set)
		return NP_STAT_NO_BACKEND;
	if (set->flags & SVC_SET_AFFINITY) {
		__builtin_memcpy(akey.client, &t->saddr, 4);
		id = svc_affinity_get(&akey, set);
	}
	if (!id)
		id = svc_pick(set, fe->set,
			      (set->flags & SVC_SET_MAGLEV) ? flow_hash(t) : bpf_get_prandom_u32());
	if (!id)
		return NP_STAT_NO_BACKEND;
	be = svc_backend(id);
	if (!be || be->family != 4)
		return NP_STAT_NO_BACKEND;
	if (set->flags & SVC_SET_AFFINITY)
		svc_affinity_put(&akey, id);

	__builtin_memset(flow, 0, sizeof(*flow));
	__builtin_memcpy(&flow->backend_addr, be->addr, 4);
	flow->backend_port = be->port;
	flow->backend = id;
	flow->revnat = fe->revnat;
	ifindex = route(skb, flow->backend_addr);
	if (!ifindex)
		return NP_STAT_NO_ROUTE;
	rkey.saddr = flow->backend_addr;
	rkey.sport = flow->backend_port;
	if (!bpf_map_lookup_elem(&np_devices, &ifindex)) {
		flow->kind = NP_KIND_LOCAL;
		rkey.daddr = t->saddr;
		rkey.dport = t->sport;
		bpf_map_update_elem(&np_rev, &rkey, &back, BPF_ANY);
	} else if (np_mode == NP_MODE_DSR) {
		__u32 mtu = 1; /* a length that fits any device: the helper then tells its MTU */

		flow->kind = NP_KIND_DSR;
		flow->ifindex = ifindex;
		if (bpf_check_mtu(skb, ifindex, &mtu, 0, 0) == 0 && mtu > NP_DSR_OVERHEAD + 536)
			flow->mss = mtu - NP_DSR_OVERHEAD;
		else
			flow->mss = 536; /* RFC 879's default, what any path carries */
	} else {
		flow->kind = NP_KIND_SNAT;
		flow->ifindex = ifindex;
		rkey.daddr = np_node_ip4;
		for (int i = 0; i < NP_SNAT_PORT_TRIES; i++) {
			__u16 port = NP_SNAT_PORT_MIN + (bpf_get_prandom_u32() & 0x7fff);

			rkey.dport = port;
			if (!bpf_map_update_elem(&np_rev, &rkey, &back, BPF_NOEXIST)) {
				flow->nat_port = port;
				break;
			}
		}
		if (!flow->nat_port)
			return NP_STAT_NO_ROUTE;
	}
	bpf_map_update_elem(&np_flows, t, flow, BPF_ANY);
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
static __always_inline int encapsulate(struct __sk_buff *skb, const struct where *w, __be32 dst)
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
	outer.daddr = dst;
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&outer, sizeof(outer), 0);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	outer.check = (__u16)~sum;
	return bpf_skb_store_bytes(skb, w->l3, &outer, sizeof(outer), 0) ? -1 : 0;
}

static __always_inline struct svc_frontend *frontend_of(const struct np_tuple *t)
{
	struct svc_frontend_key key = { .port = t->dport, .protocol = t->protocol,
					.family = 4, .scope = SVC_SCOPE_EXTERNAL };
	struct svc_frontend *fe;

	__builtin_memcpy(key.addr, &t->daddr, 4);
	fe = svc_lookup(&key);
	if (fe || t->daddr != np_node_ip4)
		return fe;
	__builtin_memset(key.addr, 0, sizeof(key.addr)); /* a NodePort on every node address */
	return svc_lookup(&key);
}

SEC("tc")
int nodeport_ingress(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct where w;
	struct np_tuple t = {};
	struct np_flow fresh, *flow;
	struct np_rev_nat *back, to;
	struct svc_frontend *fe;
	__u32 ifindex;
	int stat;

	if (parse(skb, &p, &w))
		return TC_ACT_OK;
	__builtin_memcpy(&t.saddr, p.src, 4);
	__builtin_memcpy(&t.daddr, p.dst, 4);
	t.sport = p.sport;
	t.dport = p.dport;
	t.protocol = p.protocol;

	if (t.daddr == np_node_ip4 && (back = bpf_map_lookup_elem(&np_rev, &t))) {
		to = *back; /* a remote backend's reply to an SNAT flow */
		if (apply(skb, &w, &t, &to))
			return count(NP_STAT_ERROR, TC_ACT_SHOT);
		ifindex = route(skb, to.daddr);
		if (!ifindex)
			return count(NP_STAT_NO_ROUTE, TC_ACT_SHOT);
		count(NP_STAT_REPLY_SNAT, 0);
		return bpf_redirect_neigh(ifindex, NULL, 0, 0);
	}

	fe = frontend_of(&t);
	if (!fe)
		return TC_ACT_OK;
	flow = bpf_map_lookup_elem(&np_flows, &t);
	if (!flow || !svc_backend(flow->backend)) {
		stat = new_flow(skb, fe, &t, &fresh);
		if (stat >= 0)
			return count(stat, TC_ACT_SHOT);
		flow = &fresh;
	}
	to.saddr = t.saddr;
	to.sport = t.sport;
	to.daddr = flow->backend_addr;
	to.dport = flow->backend_port;
	if (flow->kind == NP_KIND_LOCAL) {
		if (apply(skb, &w, &t, &to))
			return count(NP_STAT_ERROR, TC_ACT_SHOT);
		return count(NP_STAT_TO_LOCAL, TC_ACT_OK);
	}
	if (flow->kind == NP_KIND_DSR) {
		clamp_mss(skb, &w, flow->mss);
		if (encapsulate(skb, &w, flow->backend_addr))
			return count(NP_STAT_ERROR, TC_ACT_SHOT);
		count(NP_STAT_TO_DSR, 0);
		return bpf_redirect_neigh(flow->ifindex, NULL, 0, 0);
	}
	to.saddr = np_node_ip4;
	to.sport = flow->nat_port;
	if (apply(skb, &w, &t, &to))
		return count(NP_STAT_ERROR, TC_ACT_SHOT);
	count(NP_STAT_TO_SNAT, 0);
	return bpf_redirect_neigh(flow->ifindex, NULL, 0, 0);
}

SEC("tc")
int nodeport_egress(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct where w;
	struct np_tuple t = {};
	struct np_rev_nat *back, to;

	if (parse(skb, &p, &w))
		return TC_ACT_OK;
	__builtin_memcpy(&t.saddr, p.src, 4);
	__builtin_memcpy(&t.daddr, p.dst, 4);
	t.sport = p.sport;
	t.dport = p.dport;
	t.protocol = p.protocol;
	back = bpf_map_lookup_elem(&np_rev, &t);
	if (!back)
		return TC_ACT_OK;
	to = *back;
	if (apply(skb, &w, &t, &to))
		return count(NP_STAT_ERROR, TC_ACT_SHOT);
	return count(NP_STAT_REPLY_LOCAL, TC_ACT_OK);
}

char LICENSE[] SEC("license") = "GPL";
