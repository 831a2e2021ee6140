// SPDX-License-Identifier: GPL-2.0
/* `membrane lb`: a Katran-class L4 load balancer in XDP (see abi/lb.h for the maps).
 *
 * A packet for a VIP (address, port, protocol) gets a backend: the one its flow already
 * has in lb_conntrack while that backend still serves the VIP, else the Maglev table's
 * entry for the flow's hash. It leaves encapsulated (IPv4 in IPv4, IPv6 in IPv6) with the
 * LB's address as outer source, towards the next hop the kernel's FIB names (XDP_TX when
 * that is the device it came in on, a redirect otherwise): the backend decapsulates and
 * answers the client directly (DSR). Everything else passes untouched.
 */
#include "include/common.h"
#include <linux/if_ether.h>
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
 * differ in max_entries from this template). */
struct lb_table {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_DEFAULT_TABLE_SIZE);
	__uint(map_flags, BPF_F_INNER_MAP);
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
	struct lb_backend *be;
	__u32 slot, *id;
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
	slot = jhash2_10((const __u32 *)fk, LB_HASH_SEED) % vip->table_size;
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

static __always_inline __u16 ipv4_csum(const struct iphdr *ip)
{
	const __u16 *word = (const __u16 *)ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < (int)(sizeof(*ip) / 2); i++)
		sum += word[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
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
		outer->check = 0;
		__builtin_memcpy(&outer->saddr, cfg->src4, 4);
		__builtin_memcpy(&outer->daddr, be->addr, 4);
		outer->check = ipv4_csum(outer);
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
	__u32 backend;
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

	fib.ifindex = ctx->ingress_ifindex;
	res = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	if (res == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/* the kernel resolves the next hop's MAC and forwards the encapsulated packet */
		count(&lb_backend_stats, backend, len);
		return verdict(LB_STAT_NEIGH_PASS, len, XDP_PASS);
	}
	if (res != BPF_FIB_LKUP_RET_SUCCESS)
		return verdict(LB_STAT_NO_ROUTE, len, XDP_DROP);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	if (eth + sizeof(struct ethhdr) > data_end)
		return verdict(LB_STAT_UNPARSED, len, XDP_DROP);
	__builtin_memcpy(((struct ethhdr *)eth)->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(((struct ethhdr *)eth)->h_source, fib.smac, ETH_ALEN);
	count(&lb_backend_stats, backend, len);
	count(&lb_stats, LB_STAT_FORWARDED, len);
	if (fib.ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(fib.ifindex, 0);
}

char LICENSE[] SEC("license") = "GPL";
