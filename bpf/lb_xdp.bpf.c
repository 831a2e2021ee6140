// SPDX-License-Identifier: GPL-2.0
/* `membrane lb`: a Katran-class L4 load balancer in XDP (see abi/lb.h for the maps).
 *
 * A packet for a VIP (address, port, protocol) gets a backend: the one its flow already
 * has in lb_conntrack while that backend still serves the VIP, else the Maglev table's
 * entry for the flow's hash. It leaves encapsulated (IPv4 in IPv4, IPv6 in IPv6) with the
 * LB's address as outer source, towards the next hop the kernel's FIB names (XDP_TX when
 * that is the device it came in on, a redirect otherwise; the answer is cached per backend
 * and CPU for a second, see lb_nexthop): the backend decapsulates and
 * answers the client directly (DSR). A packet that encapsulation makes too big for the
 * route is answered with ICMP "fragmentation needed" / ICMPv6 "packet too big" (as Katran
 * does), so the client's path MTU discovery adapts. Everything else passes untouched.
 */
#include "include/common.h"
#include <linux/if_ether.h>
#include <linux/icmpv6.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include "abi/lb.h"
#include "lib/jhash.h"
#include "lib/parse.h"

#define AF_INET_ 2
#define AF_INET6_ 10

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_MAX_VIPS);
	__type(key, struct lb_vip_key);
	__type(value, struct lb_vip);
} lb_vips SEC(".maps");

/* A service's table: its size is the VIP's table_size (BPF_F_INNER_MAP lets inner maps
 * differ in max_entries from this template); BPF_F_MMAPABLE lets the control plane fill a
 * new one with one copy before it is published. */
struct lb_table {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_DEFAULT_TABLE_SIZE);
	__uint(map_flags, BPF_F_INNER_MAP | BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u32);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, LB_MAX_VIPS);
	__type(key, __u32);
	__array(values, struct lb_table);
} lb_tables SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_MAX_BACKENDS);
	__uint(map_flags, BPF_F_MMAPABLE); /* the control plane scans it without a syscall */
	__type(key, __u32);
	__type(value, struct lb_backend);
} lb_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct lb_nexthop);
} lb_nexthop SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, LB_CONNTRACK_SIZE);
	__type(key, struct lb_flow_key);
	__type(value, struct lb_flow);
} lb_conntrack SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct lb_counter);
} lb_backend_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_STAT_MAX);
	__type(key, __u32);
	__type(value, struct lb_counter);
} lb_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_config);
} lb_config SEC(".maps");

static __always_inline void count(void *map, __u32 index, __u64 len)
{
	struct lb_counter *c = bpf_map_lookup_elem(map, &index);

	if (c) {
		c->packets += 1;
		c->bytes += len;
	}
}

static __always_inline int verdict(__u32 stat, __u64 len, int action)
{
	count(&lb_stats, stat, len);
	return action;
}

/* The backend of a flow: its conntrack entry's while that backend still serves the
 * service, else the Maglev table's (recorded for the next packets). 0: none. */
static __always_inline __u32 pick_backend(const struct lb_flow_key *fk, const struct lb_vip *vip,
					  __u32 len)
{
	struct lb_flow *flow = bpf_map_lookup_elem(&lb_conntrack, fk);
	__u32 slot, *id, words[LB_HASH_WORDS];
	struct lb_backend *be;
	void *table;

	if (flow && flow->service == vip->service) {
		__u32 known = flow->backend;

		be = bpf_map_lookup_elem(&lb_backends, &known);
		if (be && be->service == vip->service)
			return known;
	}
	table = bpf_map_lookup_elem(&lb_tables, &vip->service);
	if (!table || !vip->table_size)
		return 0;
	__builtin_memcpy(words, fk, sizeof(words)); /* not a cast: the key was written bytewise */
	slot = jhash2_10(words, LB_HASH_SEED) % vip->table_size;
	id = bpf_map_lookup_elem(table, &slot);
	if (!id || !*id)
		return 0;
	slot = *id; /* now the backend id */
	be = bpf_map_lookup_elem(&lb_backends, &slot);
	if (!be || be->service != vip->service)
		return 0;
	struct lb_flow fresh = { .backend = slot, .service = vip->service };
	bpf_map_update_elem(&lb_conntrack, fk, &fresh, BPF_ANY);
	count(&lb_stats, LB_STAT_CT_NEW, len);
	return slot;
}

/* The Internet checksum (RFC 1071) of `len` bytes, continuing from `sum` (an earlier
 * part's folded, uncomplemented sum), in network byte order. Bytes are read one at a
 * time: a 16-bit load of memory just written through other types may be reordered by
 * the compiler (strict aliasing), a byte load may not. */
static __always_inline __u16 csum_partial_(const __u8 *byte, int len, __u32 sum)
{
#pragma clang loop unroll(disable)
	for (int i = 0; i + 1 < len; i += 2)
		sum += (__u32)byte[i] << 8 | byte[i + 1];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return sum;
}

static __always_inline __be16 csum_finish_(__u32 sum)
{
	return bpf_htons((__u16)~sum);
}

static __always_inline __be16 ipv4_csum(const struct iphdr *ip)
{
	return csum_finish_(csum_partial_((const __u8 *)ip, sizeof(*ip), 0));
}

/* The checksum of the outer IPv4 header encapsulate() writes (no options, id 0, no
 * fragment bits, TTL 64, protocol IPIP), from its variable fields: the per-packet path
 * reads no memory for it. */
static __always_inline __be16 outer4_csum(__u8 tos, __u16 tot_len, const __u8 *src,
					  const __u8 *dst)
{
	__u32 sum = (0x45 << 8 | tos) + tot_len + (64 << 8 | IPPROTO_IPIP);

	sum += (__u32)src[0] << 8 | src[1];
	sum += (__u32)src[2] << 8 | src[3];
	sum += (__u32)dst[0] << 8 | dst[1];
	sum += (__u32)dst[2] << 8 | dst[3];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return csum_finish_(sum);
}

/* What an ICMP error quotes of the packet it is about: its IP header and 8 bytes. */
#define QUOTE4 (sizeof(struct iphdr) + 8)
#define QUOTE6 (sizeof(struct ipv6hdr) + 8)

struct icmp_too_big {
	__u8 type;
	__u8 code;
	__be16 check;
	__u32 rest;  /* IPv4: unused (16) and next-hop MTU (16); IPv6: the MTU (32) */
};

/* Turn the (already encapsulated, so outer_len bytes longer) frame into an ICMP
 * "fragmentation needed" / ICMPv6 "packet too big" to the client, as Katran does: the
 * client lowers its path MTU to the VIP so that its packets fit once encapsulated.
 * Returns the XDP action. */
static __always_inline int send_too_big(struct xdp_md *ctx, const struct lb_config *cfg,
					__u8 family, __u32 outer_len, __u32 mtu)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct {
		struct icmp_too_big icmp;
		__u8 quote[QUOTE6];
	} msg = {};
	struct ethhdr eth;
	__u32 quote_len = family == 4 ? QUOTE4 : QUOTE6;
	__u32 ip_len = family == 4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);
	__u32 total = sizeof(eth) + ip_len + sizeof(msg.icmp) + quote_len;
	__u8 tmp[ETH_ALEN];

	if (data + sizeof(eth) + sizeof(struct ipv6hdr) + QUOTE6 > data_end)
		return XDP_DROP; /* shorter than any packet that can be too big */
	__builtin_memcpy(&eth, data, sizeof(eth));
	if (family == 4)
		__builtin_memcpy(msg.quote, data + sizeof(eth) + sizeof(struct iphdr), QUOTE4);
	else
		__builtin_memcpy(msg.quote, data + sizeof(eth) + sizeof(struct ipv6hdr), QUOTE6);
	if (bpf_xdp_adjust_tail(ctx, (int)total - (int)(data_end - data)))
		return XDP_DROP;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + sizeof(eth) + sizeof(struct ipv6hdr) + sizeof(msg.icmp) + QUOTE6 > data_end &&
	    family == 6)
		return XDP_DROP;
	if (data + sizeof(eth) + sizeof(struct iphdr) + sizeof(msg.icmp) + QUOTE4 > data_end)
		return XDP_DROP;
	__builtin_memcpy(tmp, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, tmp, ETH_ALEN);
	if (family == 4) {
		struct iphdr *ip = data + sizeof(eth);
		const struct iphdr *quoted = (const void *)msg.quote;

		eth.h_proto = bpf_htons(ETH_P_IP);
		__builtin_memcpy(data, &eth, sizeof(eth));
		msg.icmp.type = 3; /* destination unreachable */
		msg.icmp.code = 4; /* fragmentation needed */
		msg.icmp.rest = bpf_htonl(mtu - outer_len);
		msg.icmp.check = csum_finish_(
			csum_partial_((const __u8 *)&msg, sizeof(msg.icmp) + QUOTE4, 0));
		__builtin_memset(ip, 0, sizeof(*ip));
		ip->version = 4;
		ip->ihl = 5;
		ip->tot_len = bpf_htons(sizeof(*ip) + sizeof(msg.icmp) + QUOTE4);
		ip->ttl = 64;
		ip->protocol = IPPROTO_ICMP;
		__builtin_memcpy(&ip->saddr, cfg->src4, 4);
		ip->daddr = quoted->saddr;
		ip->check = ipv4_csum(ip);
		__builtin_memcpy(ip + 1, &msg, sizeof(msg.icmp) + QUOTE4);
	} else {
		struct ipv6hdr *ip6 = data + sizeof(eth);
		const struct ipv6hdr *quoted = (const void *)msg.quote;
		struct {
			__u8 src[16];
			__u8 dst[16];
			__u32 len;
			__u32 next;
		} pseudo = {};

		if ((void *)ip6 + sizeof(*ip6) + sizeof(msg.icmp) + QUOTE6 > data_end)
			return XDP_DROP;
		eth.h_proto = bpf_htons(ETH_P_IPV6);
		__builtin_memcpy(data, &eth, sizeof(eth));
		msg.icmp.type = 2; /* packet too big */
		msg.icmp.rest = bpf_htonl(mtu - outer_len);
		__builtin_memcpy(pseudo.src, cfg->src6, 16);
		__builtin_memcpy(pseudo.dst, &quoted->saddr, 16);
		pseudo.len = bpf_htonl(sizeof(msg.icmp) + QUOTE6);
		pseudo.next = bpf_htonl(IPPROTO_ICMPV6);
		msg.icmp.check = csum_finish_(csum_partial_(
			(const __u8 *)&msg, sizeof(msg),
			csum_partial_((const __u8 *)&pseudo, sizeof(pseudo), 0)));
		__builtin_memset(ip6, 0, sizeof(*ip6));
		ip6->version = 6;
		ip6->payload_len = bpf_htons(sizeof(msg.icmp) + QUOTE6);
		ip6->nexthdr = IPPROTO_ICMPV6;
		ip6->hop_limit = 64;
		__builtin_memcpy(&ip6->saddr, cfg->src6, 16);
		__builtin_memcpy(&ip6->daddr, &quoted->saddr, 16);
		__builtin_memcpy(ip6 + 1, &msg, sizeof(msg));
	}
	return XDP_TX;
}

/* Prepend the outer IP header (the Ethernet header moves to the front); fills `fib`
 * for the route lookup. 0 on success. */
static __always_inline int encapsulate(struct xdp_md *ctx, const struct lb_backend *be,
				       const struct lb_config *cfg, struct bpf_fib_lookup *fib)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr eth;
	__u16 inner_len;
	__u8 tos;

	if (data + sizeof(eth) > data_end)
		return -1;
	__builtin_memcpy(&eth, data, sizeof(eth));
	if (be->family == 4) {
		struct iphdr *inner = data + sizeof(eth), *outer;

		if ((void *)(inner + 1) > data_end)
			return -1;
		inner_len = bpf_ntohs(inner->tot_len);
		tos = inner->tos;
		if (bpf_xdp_adjust_head(ctx, -(int)sizeof(struct iphdr)))
			return -1;
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		outer = data + sizeof(eth);
		if ((void *)(outer + 1) > data_end)
			return -1;
		eth.h_proto = bpf_htons(ETH_P_IP);
		__builtin_memcpy(data, &eth, sizeof(eth));
		outer->version = 4;
		outer->ihl = 5;
		outer->tos = tos;
		outer->tot_len = bpf_htons(inner_len + sizeof(*outer));
		outer->id = 0;
		outer->frag_off = 0;
		outer->ttl = 64;
		outer->protocol = IPPROTO_IPIP;
		__builtin_memcpy(&outer->saddr, cfg->src4, 4);
		__builtin_memcpy(&outer->daddr, be->addr, 4);
		outer->check = outer4_csum(tos, inner_len + sizeof(*outer), cfg->src4, be->addr);
		fib->family = AF_INET_;
		fib->tos = tos;
		fib->l4_protocol = IPPROTO_IPIP;
		fib->tot_len = inner_len + sizeof(*outer);
		fib->ipv4_src = outer->saddr;
		fib->ipv4_dst = outer->daddr;
	} else {
		struct ipv6hdr *inner = data + sizeof(eth), *outer;
		__u8 flow_lbl[3];
		__u8 priority;

		if ((void *)(inner + 1) > data_end)
			return -1;
		inner_len = bpf_ntohs(inner->payload_len) + sizeof(*inner);
		priority = inner->priority;
		__builtin_memcpy(flow_lbl, inner->flow_lbl, 3);
		if (bpf_xdp_adjust_head(ctx, -(int)sizeof(struct ipv6hdr)))
			return -1;
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		outer = data + sizeof(eth);
		if ((void *)(outer + 1) > data_end)
			return -1;
		eth.h_proto = bpf_htons(ETH_P_IPV6);
		__builtin_memcpy(data, &eth, sizeof(eth));
		outer->version = 6;
		outer->priority = priority;
		__builtin_memcpy(outer->flow_lbl, flow_lbl, 3);
		outer->payload_len = bpf_htons(inner_len);
		outer->nexthdr = IPPROTO_IPV6;
		outer->hop_limit = 64;
		__builtin_memcpy(&outer->saddr, cfg->src6, 16);
		__builtin_memcpy(&outer->daddr, be->addr, 16);
		fib->family = AF_INET6_;
		fib->l4_protocol = IPPROTO_IPV6;
		fib->tot_len = inner_len + sizeof(*outer);
		__builtin_memcpy(fib->ipv6_src, cfg->src6, 16);
		__builtin_memcpy(fib->ipv6_dst, be->addr, 16);
	}
	return 0;
}

/* Ask the FIB for the next hop towards the backend `fib` names (filled by
 * encapsulate()) and keep its answer in this CPU's cache: first the route's MTU (a lookup
 * with an impossible length stops at the MTU check and reports it), then the MACs and the
 * device. Returns the second lookup's result; only a full answer is cached. */
static __always_inline int ask_fib(struct xdp_md *ctx, struct bpf_fib_lookup *fib,
				   struct lb_nexthop *hop, __u64 now)
{
	__u16 mtu = 0xffff;
	int res;

	fib->ifindex = ctx->ingress_ifindex;
	fib->tot_len = 0xffff;
	res = bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
	if (res == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		mtu = fib->mtu_result;
	else if (res != BPF_FIB_LKUP_RET_SUCCESS && res != BPF_FIB_LKUP_RET_NO_NEIGH)
		return res;
	fib->ifindex = ctx->ingress_ifindex;
	fib->tot_len = 0; /* no MTU check: the next hop alone */
	res = bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
	if (res != BPF_FIB_LKUP_RET_SUCCESS)
		return res;
	hop->ifindex = fib->ifindex;
	hop->mtu = mtu;
	__builtin_memcpy(hop->dmac, fib->dmac, ETH_ALEN);
	__builtin_memcpy(hop->smac, fib->smac, ETH_ALEN);
	hop->expires_ns = now + LB_NEXTHOP_TTL_NS;
	return res;
}

SEC("xdp")
int lb_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 len = data_end - data;
	struct bpf_fib_lookup fib = {};
	struct lb_flow_key fk = {};
	struct lb_vip_key vk = {};
	struct lb_backend *be;
	struct lb_config *cfg;
	struct lb_vip *vip;
	struct pkt p = {};
	__u32 backend, encapsulated;
	struct lb_nexthop *hop;
	__u64 now;
	void *eth;
	int res;

	res = parse_packet(data, data_end, &p);
	if (res == PARSE_NOT_IP)
		return verdict(LB_STAT_PASSED, len, XDP_PASS);
	if (res == PARSE_TRUNCATED)
		return verdict(LB_STAT_UNPARSED, len, XDP_PASS);
	__builtin_memcpy(vk.addr, p.dst, 16);
	vk.port = p.dport;
	vk.protocol = p.protocol;
	vk.family = p.family;
	if (res != PARSE_L4 || p.fragment != PKT_NOT_FRAGMENT) {
		/* no ports to hash: a VIP's fragments and short headers pass, unbalanced */
		return verdict(LB_STAT_PASSED, len, XDP_PASS);
	}
	vip = bpf_map_lookup_elem(&lb_vips, &vk);
	if (!vip)
		return verdict(LB_STAT_PASSED, len, XDP_PASS);
	if (p.l3_off != sizeof(struct ethhdr))
		return verdict(LB_STAT_UNPARSED, len, XDP_PASS); /* VLAN-tagged: not ours */

	__builtin_memcpy(fk.src, p.src, 16);
	__builtin_memcpy(fk.dst, p.dst, 16);
	fk.sport = p.sport;
	fk.dport = p.dport;
	fk.protocol = p.protocol;
	backend = pick_backend(&fk, vip, len);
	if (!backend)
		return verdict(LB_STAT_NO_BACKEND, len, XDP_DROP);
	be = bpf_map_lookup_elem(&lb_backends, &backend);
	cfg = bpf_map_lookup_elem(&lb_config, &(__u32){ 0 });
	if (!be || !cfg || be->family != p.family)
		return verdict(LB_STAT_NO_BACKEND, len, XDP_DROP);
	if (encapsulate(ctx, be, cfg, &fib))
		return verdict(LB_STAT_UNPARSED, len, XDP_DROP);

	encapsulated = fib.tot_len;
	hop = bpf_map_lookup_elem(&lb_nexthop, &backend);
	if (!hop)
		return verdict(LB_STAT_NO_ROUTE, len, XDP_DROP);
	now = bpf_ktime_get_coarse_ns();
	if (now >= hop->expires_ns) {
		res = ask_fib(ctx, &fib, hop, now);
		if (res == BPF_FIB_LKUP_RET_NO_NEIGH) {
			/* the kernel resolves the next hop's MAC and forwards the packet */
			count(&lb_backend_stats, backend, len);
			return verdict(LB_STAT_NEIGH_PASS, len, XDP_PASS);
		}
		if (res != BPF_FIB_LKUP_RET_SUCCESS)
			return verdict(LB_STAT_NO_ROUTE, len, XDP_DROP);
	}
	if (encapsulated > hop->mtu) {
		/* A frame that was longer than the MTU before we grew it is a GSO super-frame
		 * (generic XDP on a device with TSO/GRO: the device segments it later); one
		 * that fitted and no longer does is really too big. */
		__u32 outer = p.family == 4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);

		if (encapsulated - outer <= hop->mtu) {
			count(&lb_stats, LB_STAT_TOO_BIG, len);
			return send_too_big(ctx, cfg, p.family, outer, hop->mtu);
		}
	}
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	if (eth + sizeof(struct ethhdr) > data_end)
		return verdict(LB_STAT_UNPARSED, len, XDP_DROP);
	__builtin_memcpy(((struct ethhdr *)eth)->h_dest, hop->dmac, ETH_ALEN);
	__builtin_memcpy(((struct ethhdr *)eth)->h_source, hop->smac, ETH_ALEN);
	count(&lb_backend_stats, backend, len);
	count(&lb_stats, LB_STAT_FORWARDED, len);
	if (hop->ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(hop->ifindex, 0);
}

char LICENSE[] SEC("license") = "GPL";
