// SPDX-License-Identifier: GPL-2.0
/* The baselines of bench/filter_cost.py: programs that only return, so a filter's cost is
 * read as a ratio to what the hook costs with nothing in it. */
#include "include/common.h"
#include <linux/pkt_cls.h>

SEC("xdp")
int empty_xdp(struct xdp_md *ctx)
{
	return XDP_PASS;
}

SEC("tc")
int empty_tc(struct __sk_buff *skb)
{
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "GPL";
