/* ICMP errors about address-translated flows, shared by the NodePort path and the
 * endpoint programs' per-packet ClusterIP path: one rewrite of the outer and the quoted
 * header, so that the stack the error goes to finds the socket it is about (port
 * unreachable -> ECONNREFUSED, fragmentation needed / packet too big -> path MTU).
 *
 *   icmp_quoted(skb, l4, family, &q, &len)    the quoted packet as a tuple (TCP or UDP
 *           only, no IPv4 options or IPv6 extension headers); -1 for anything else
 *   icmp_quote_rewrite(skb, l4, family, &to, len)   the quote's addresses and ports to
 *           `to`, fixing the quote's IP and L4 checksums and the ICMP one
 *   icmp_outer_rewrite(skb, l3, l4, family, src, old, new)   the error's own source
 *           (src) or destination address, with IPv4's header or ICMPv6's checksum
 *   icmp_outer_addrs(skb, l3, family, src, dst)   the error's own addresses, read
 *
 * `l3`, `l4`: offsets of the error's IP and ICMP headers. Tuples are struct np6_tuple
 * (abi/nodeport.h) of either family: IPv4 addresses in the first 4 bytes, ports in host
 * order. Callers keep these off their hot path (only ICMP errors get here). icmp_quoted
 * and icmp_quote_rewrite are global functions: include this header once per object.
 */
#ifndef MEMBRANE_LIB_ICMP_NAT_H
#define MEMBRANE_LIB_ICMP_NAT_H

#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include "abi/nodeport.h"
#include "lib/l4_nat.h"

#define ICMP_CSUM_OFF 2
#define ICMP_HLEN 8

/* A checksum as stored after the bytes it covers changed by `diff` (bpf_csum_diff). */
static __always_inline __u16 csum_moved(__u16 check, __s64 diff)
{
	__u32 d = (__u32)diff;
	__u64 sum = (__u16)~check;

	sum += (d & 0xffff) + (d >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* The quoted header of an ICMP error and what follows it (up to TCP's checksum), as
 * stored: rewritten in memory, then stored whole with one ICMP checksum update. */
union icmp_quote {
	struct {
		struct iphdr ip;
		__u8 l4[20];
	} v4;
	struct {
		struct ipv6hdr ip;
		__u8 l4[20];
	} v6;
};

/* An L4 checksum inside a quote, moved by `diff`; UDP's "none" (IPv4) stays none. */
static __always_inline void icmp_quote_l4_csum(__u8 *l4, __u8 proto, __u32 len, __s64 diff)
{
	__u32 at = proto == IPPROTO_TCP ? 16 : 6;
	__u16 check, moved;

	if (at + 2 > len)
		return; /* not quoted: the receiver does not check what it cannot see */
	__builtin_memcpy(&check, l4 + at, 2);
	if (proto == IPPROTO_UDP && !check)
		return;
	moved = csum_moved(check, diff);
	if (proto == IPPROTO_UDP && !moved)
		moved = 0xffff;
	__builtin_memcpy(l4 + at, &moved, 2);
}

/* The ports of a quote's L4 header as the tuple's (host order) into `ports`. */
static __always_inline void icmp_quote_ports(__u8 *l4, const struct np6_tuple *q)
{
	__be16 ports[2] = { bpf_htons(q->sport), bpf_htons(q->dport) };

	__builtin_memcpy(l4, ports, sizeof(ports));
}

/* One copy of the quote, no "before": checksum differences start from the old bytes' sum
 * (bpf_csum_diff to nothing) and add the new. */
static __always_inline int icmp_quote_rewrite_in(struct __sk_buff *skb, __u32 l4,
						 __u8 family, const struct np6_tuple *to,
						 __u32 len)
{
	__u32 at = l4 + ICMP_HLEN, l4_len = len >= 20 ? 20 : 8;
	__u32 ip_len = family == 4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);
	__u32 n = ip_len + l4_len, addr_len = family == 4 ? 8 : 32;
	union icmp_quote q;
	__u8 *addrs, *ports, proto;
	__s64 icmp_diff, diff, port_diff;

	if (n > sizeof(q) || bpf_skb_load_bytes(skb, at, &q, n))
		return -1;
	if (family == 4) {
		addrs = (__u8 *)&q.v4.ip.saddr;
		ports = q.v4.l4;
		proto = q.v4.ip.protocol;
	} else {
		addrs = (__u8 *)&q.v6.ip.saddr;
		ports = q.v6.l4;
		proto = q.v6.ip.nexthdr;
	}
	icmp_diff = bpf_csum_diff((__be32 *)&q, n, NULL, 0, 0);
	diff = bpf_csum_diff((__be32 *)addrs, addr_len, NULL, 0, 0);
	port_diff = bpf_csum_diff((__be32 *)ports, 4, NULL, 0, 0);
	if (family == 4) {
		__builtin_memcpy(addrs, to->saddr, 4);
		__builtin_memcpy(addrs + 4, to->daddr, 4);
	} else {
		__builtin_memcpy(addrs, to->saddr, 16);
		__builtin_memcpy(addrs + 16, to->daddr, 16);
	}
	icmp_quote_ports(ports, to);
	diff = bpf_csum_diff(NULL, 0, (__be32 *)addrs, addr_len, diff);
	if (family == 4) /* IPv6 has no header checksum */
		q.v4.ip.check = csum_moved(q.v4.ip.check, diff);
	diff = bpf_csum_diff(NULL, 0, (__be32 *)ports, 4, diff + port_diff);
	icmp_quote_l4_csum(ports, proto, len, diff);
	icmp_diff = bpf_csum_diff(NULL, 0, (__be32 *)&q, n, icmp_diff);
	if (bpf_skb_store_bytes(skb, at, &q, n, 0) ||
	    bpf_l4_csum_replace(skb, l4 + ICMP_CSUM_OFF, 0, icmp_diff, 0))
		return -1;
	return 0;
}

/* Global: the verifier checks it once, with the family and lengths unknown (inlined or a
 * static subprogram, its branches multiplied the callers' verified instructions: +13k in
 * each endpoint program), and its copy of the quote is a stack frame of its own (all
 * frames of a tc program share 512 bytes). */
__noinline int icmp_quote_rewrite(struct __sk_buff *skb, __u32 l4, __u8 family,
					 const struct np6_tuple *to, __u32 len)
{
	/* one copy per family: constant offsets, fewer registers to spill */
	if (!to)
		return -1;
	if (family == 4)
		return icmp_quote_rewrite_in(skb, l4, 4, to, len);
	return icmp_quote_rewrite_in(skb, l4, 6, to, len);
}

static __always_inline int icmp_outer_rewrite(struct __sk_buff *skb, __u32 l3, __u32 l4,
					      __u8 family, int src, const __u8 *old,
					      const __u8 *new)
{
	if (addr_equal(old, new, family))
		return 0;
	if (family == 4) {
		__be32 from = *(const __be32 *)old, to = *(const __be32 *)new;

		if (bpf_l3_csum_replace(skb, l3 + IP_CSUM_OFF, from, to, sizeof(to)))
			return -1;
		return bpf_skb_store_bytes(skb, l3 + (src ? IP_SRC_OFF : IP_DST_OFF), &to,
					   sizeof(to), 0) ? -1 : 0;
	} else {
		__s64 diff = bpf_csum_diff((__be32 *)old, 16, (__be32 *)new, 16, 0);

		if (bpf_l4_csum_replace(skb, l4 + ICMP_CSUM_OFF, 0, diff, BPF_F_PSEUDO_HDR))
			return -1;
		return bpf_skb_store_bytes(skb, l3 + (src ? IP6_SRC_OFF : IP6_DST_OFF), new, 16,
					   0) ? -1 : 0;
	}
}

/* The error's outer source and destination addresses into `src`, `dst` (16 bytes each,
 * zeroed first). 0, or -1 when the skb is too short. */
static __always_inline int icmp_outer_addrs(struct __sk_buff *skb, __u32 l3, __u8 family,
					    __u8 *src, __u8 *dst)
{
	__u32 n = family == 4 ? 4 : 16;

	__builtin_memset(src, 0, 16);
	__builtin_memset(dst, 0, 16);
	if (bpf_skb_load_bytes(skb, l3 + (family == 4 ? IP_SRC_OFF : IP6_SRC_OFF), src, n) ||
	    bpf_skb_load_bytes(skb, l3 + (family == 4 ? IP_DST_OFF : IP6_DST_OFF), dst, n))
		return -1;
	return 0;
}

/* Global, as icmp_quote_rewrite. */
__noinline int icmp_quoted(struct __sk_buff *skb, __u32 l4_off, __u8 family,
			   struct np6_tuple *q, __u32 *len)
{
	__u32 at = l4_off + ICMP_HLEN, l4;
	__be16 ports[2];

	if (!q || !len)
		return -1;
	__builtin_memset(q, 0, sizeof(*q));
	if (family == 4) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, at, &ip, sizeof(ip)) || ip.version != 4 ||
		    ip.ihl != 5 || ip.frag_off & bpf_htons(0x1fff))
			return -1;
		__builtin_memcpy(q->saddr, &ip.saddr, 4);
		__builtin_memcpy(q->daddr, &ip.daddr, 4);
		q->protocol = ip.protocol;
		l4 = at + sizeof(ip);
	} else {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, at, &ip6, sizeof(ip6)) || ip6.version != 6)
			return -1;
		__builtin_memcpy(q->saddr, &ip6.saddr, 16);
		__builtin_memcpy(q->daddr, &ip6.daddr, 16);
		q->protocol = ip6.nexthdr;
		l4 = at + sizeof(ip6);
	}
	if (q->protocol != IPPROTO_TCP && q->protocol != IPPROTO_UDP)
		return -1;
	if (bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)) || skb->len < l4 + 8)
		return -1;
	q->sport = bpf_ntohs(ports[0]);
	q->dport = bpf_ntohs(ports[1]);
	*len = skb->len - l4;
	return 0;
}

#endif
