/* Address and port translation of a TCP or UDP packet, either family: the one rewrite
 * the NodePort path (nodeport.bpf.c) and the endpoint programs' per-packet ClusterIP
 * path (lib/service_nat.h) share, and the IP header offsets lib/icmp_nat.h uses too.
 *
 *   addr_equal(a, b, family)    two addresses (16 bytes, IPv4 in the first 4) equal
 *   l4_nat_rewrite(skb, l3, l4, family, proto, src, old, new, old_port, new_port)
 *           the source (src) or destination address and port to `new`, `new_port`
 *
 * `l3`, `l4`: offsets of the IP and the TCP/UDP header. Ports in host order.
 */
#ifndef MEMBRANE_LIB_L4_NAT_H
#define MEMBRANE_LIB_L4_NAT_H

#include <linux/in.h>

#define IP_CSUM_OFF 10
#define IP_SRC_OFF 12
#define IP_DST_OFF 16
#define IP6_SRC_OFF 8
#define IP6_DST_OFF 24

static __always_inline int addr_equal(const __u8 *a, const __u8 *b, __u8 family)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;

	if (family == 4)
		return x[0] == y[0];
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/* Fixes the L4 checksum (its pseudo-header too) and IPv4's header checksum. A UDP
 * checksum of 0 stays 0 ("none" in IPv4, a tunnel's zero checksum in IPv6) and one that
 * comes out 0 is sent as 0xffff. 0, or -1 when the skb refused. */
static __always_inline int l4_nat_rewrite(struct __sk_buff *skb, __u32 l3, __u32 l4,
					  __u8 family, __u8 proto, int src, const __u8 *old_addr,
					  const __u8 *new_addr, __u16 old_port, __u16 new_port)
{
	__u32 csum = l4 + (proto == IPPROTO_TCP ? 16 : 6);
	__u64 mangled = proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__be16 op = bpf_htons(old_port), np = bpf_htons(new_port);

	if (!addr_equal(old_addr, new_addr, family)) {
		if (family == 4) {
			__be32 from = *(const __be32 *)old_addr, to = *(const __be32 *)new_addr;

			if (bpf_l4_csum_replace(skb, csum, from, to,
						BPF_F_PSEUDO_HDR | mangled | sizeof(to)) ||
			    bpf_l3_csum_replace(skb, l3 + IP_CSUM_OFF, from, to, sizeof(to)) ||
			    bpf_skb_store_bytes(skb, l3 + (src ? IP_SRC_OFF : IP_DST_OFF), &to,
						sizeof(to), 0))
				return -1;
		} else {
			__s64 diff = bpf_csum_diff((__be32 *)old_addr, 16, (__be32 *)new_addr, 16, 0);

			if (bpf_l4_csum_replace(skb, csum, 0, diff, BPF_F_PSEUDO_HDR | mangled) ||
			    bpf_skb_store_bytes(skb, l3 + (src ? IP6_SRC_OFF : IP6_DST_OFF),
						new_addr, 16, 0))
				return -1;
		}
	}
	if (op != np &&
	    (bpf_l4_csum_replace(skb, csum, op, np, mangled | sizeof(np)) ||
	     bpf_skb_store_bytes(skb, l4 + (src ? 0 : 2), &np, sizeof(np), 0)))
		return -1;
	return 0;
}

#endif
