// SPDX-License-Identifier: GPL-2.0
/* `membrane filter allow-only`: among packets to a guarded (protocol, port), only the
 * listed flows pass; other traffic to that port is dropped; everything else passes.
 *
 * Later IP fragments carry no ports and are passed: the first fragment decides, and a
 * datagram whose first fragment was dropped cannot be reassembled. (Linux discards first
 * fragments too short to hold the ports, so they cannot smuggle a port past the check.)
 */
#include "include/common.h"
#include <linux/pkt_cls.h>
#include "lib/filter.h"

const volatile bool enable_allow_only = true;
const volatile __u8 hook = FILTER_HOOK_TC_INGRESS;

/* Headers we need to see in the linear part of the skb. */
#define PARSE_PULL_BYTES 192

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct guard_key);
	__type(value, __u32);
} allow_guard SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FILTER_MAX_RULES);
	__type(key, struct flow_key);
	__type(value, __u32);
} allow_flows SEC(".maps");

SEC("tc")
int filter_tc(struct __sk_buff *skb)
{
	void *data, *data_end;
	struct guard_key gk = {};
	struct flow_key fk = {};
	struct pkt p = {};
	__u32 *guard, *flow;
	int res;

	if (skb->data_end - skb->data < PARSE_PULL_BYTES && skb->len > skb->data_end - skb->data)
		bpf_skb_pull_data(skb, skb->len < PARSE_PULL_BYTES ? skb->len : PARSE_PULL_BYTES);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;

	res = parse_packet(data, data_end, &p);
	if (res == PARSE_NOT_IP || !enable_allow_only)
		goto pass;
	if (res != PARSE_L4)
		goto unparsed_or_pass;

	gk.protocol = p.protocol;
	gk.port = p.dport;
	guard = bpf_map_lookup_elem(&allow_guard, &gk);
	if (!guard)
		goto pass;

	__builtin_memcpy(fk.src, p.src, 16);
	__builtin_memcpy(fk.dst, p.dst, 16);
	fk.port = p.dport;
	fk.protocol = p.protocol;
	fk.family = p.family;
	flow = bpf_map_lookup_elem(&allow_flows, &fk);
	if (flow) {
		count_rule(*flow, skb->len);
		goto pass;
	}
	count_rule(*guard, skb->len);
	count_stat(FILTER_STAT_DROPPED, skb->len);
	report_drop(&p, skb->ifindex, hook, *guard, skb->len);
	return TC_ACT_SHOT;

unparsed_or_pass:
	/* A later fragment (whether or not its protocol is known) or a protocol without
	 * ports is simply not ours to judge. */
	if (p.fragment != PKT_LATER_FRAGMENT && (res != PARSE_L3 || proto_has_ports(p.protocol)))
		count_stat(FILTER_STAT_UNPARSED, skb->len);
pass:
	count_stat(FILTER_STAT_PASSED, skb->len);
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "GPL";
