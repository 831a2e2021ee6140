// SPDX-License-Identifier: GPL-2.0
/* The floor of bench/kernel_drops.py: a program that only returns, on the tracepoint the
 * kernel drop monitor uses. Its run time is what the kernel's tp_btf dispatch (and the
 * run-time statistics themselves) cost before the monitor does anything. */
#include "include/trace.h"

SEC("tp_btf/kfree_skb")
int BPF_PROG(kfree_skb_floor, struct sk_buff *skb)
{
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
