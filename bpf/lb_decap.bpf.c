// SPDX-License-Identifier: GPL-2.0
/* The backend side of `membrane lb`: strip the outer header of IPv4-in-IPv4 and
 * IPv6-in-IPv6 packets in XDP (as Katran's decap program does), so the inner packet,
 * addressed to a VIP the backend holds on a local device, is delivered as if it had
 * arrived unencapsulated. For kernels or hosts without ipip/ip6tnl devices; anything
 * else passes untouched. Counters: lb_decap_stats[0] decapsulated, [1] passed.
 */
#include "include/common.h"
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include "abi/lb.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct lb_counter);
} lb_decap_stats SEC(".maps");

static __always_inline int done(__u32 index, __u64 len, int action)
{
	struct lb_counter *c = bpf_map_lookup_elem(&lb_decap_stats, &index);

	if (c) {
		c->packets += 1;
		c->bytes += len;
	}
	return action;
}

SEC("xdp")
int lb_decap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 len = data_end - data;
	struct ethhdr eth;
	int outer_len;
	__be16 inner_proto;

	if (data + sizeof(eth) > data_end)
		return done(1, len, XDP_PASS);
	__builtin_memcpy(&eth, data, sizeof(eth));
	if (eth.h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + sizeof(eth);

		if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_IPIP || ip->ihl != 5 ||
		    (ip->frag_off & bpf_htons(0x3fff)))
			return done(1, len, XDP_PASS);
		outer_len = sizeof(*ip);
		inner_proto = bpf_htons(ETH_P_IP);
	} else if (eth.h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + sizeof(eth);

		if ((void *)(ip6 + 1) > data_end || ip6->nexthdr != IPPROTO_IPV6)
			return done(1, len, XDP_PASS);
		outer_len = sizeof(*ip6);
		inner_proto = bpf_htons(ETH_P_IPV6);
	} else {
		return done(1, len, XDP_PASS);
	}
	if (bpf_xdp_adjust_head(ctx, outer_len))
		return done(1, len, XDP_PASS);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + sizeof(eth) > data_end)
		return done(1, len, XDP_DROP);
	eth.h_proto = inner_proto;
	__builtin_memcpy(data, &eth, sizeof(eth));
	return done(0, len, XDP_PASS);
}

char LICENSE[] SEC("license") = "GPL";
