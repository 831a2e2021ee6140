/* Packet parsing shared by every networking program.
 *
 *   struct pkt p = {};
 *   int res = parse_packet(data, data_end, &p);
 *
 * Walks Ethernet, up to two VLAN tags (802.1Q / 802.1ad), IPv4 (with options) or IPv6
 * (with up to PARSE_MAX_EXTHDRS extension headers) and the first 4 bytes of TCP, UDP or
 * SCTP. Fills as much of `p` as the packet allows and says how far it got, so that each
 * caller can act on what it knows (a destination-address rule needs no ports) and let pass
 * what it cannot judge. Addresses stay in network byte order; ports are host order.
 */
#ifndef MEMBRANE_LIB_PARSE_H
#define MEMBRANE_LIB_PARSE_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>

#define PARSE_MAX_VLANS 2
#ifndef PARSE_MAX_EXTHDRS
#define PARSE_MAX_EXTHDRS 8
#endif

enum parse_result {
	PARSE_L4 = 0,        /* everything known, including ports for TCP/UDP/SCTP */
	PARSE_L3 = 1,        /* addresses and protocol known; no ports (ICMP, non-first
			      * fragment, other protocols, or L4 header cut short) */
	PARSE_ADDRS = 2,     /* addresses known, protocol not (IPv6 header chain too long or
			      * cut short, or a later fragment whose fragmentable part
			      * begins with an extension header) */
	PARSE_NOT_IP = 3,    /* neither IPv4 nor IPv6 */
	PARSE_TRUNCATED = 4, /* Ethernet or IP header cut short or malformed, or more VLAN
			      * tags than we walk */
};

enum pkt_fragment {
	PKT_NOT_FRAGMENT = 0,
	PKT_FIRST_FRAGMENT = 1,
	PKT_LATER_FRAGMENT = 2, /* carries no L4 header */
};

struct vlan_hdr_ {
	__be16 tci;
	__be16 encapsulated_proto;
};

struct pkt {
	__u8 src[16];
	__u8 dst[16];
	__u8 family;    /* 4 or 6 */
	__u8 protocol;  /* upper-layer protocol (after IPv6 extension headers) */
	__u8 fragment;  /* enum pkt_fragment */
	__u8 has_ports;
	__u16 sport;
	__u16 dport;
	__u32 l3_off;   /* offset of the IP header from the start of the frame */
	__u32 frag_id;  /* IPv4 id or IPv6 fragment header identification (as on the wire) */
	__u16 l4_rel;   /* offset of the upper-layer header from the IP header (PARSE_L3/L4) */
	__u16 pad;
};

static __always_inline int proto_has_ports(__u8 protocol)
{
	return protocol == IPPROTO_TCP || protocol == IPPROTO_UDP || protocol == IPPROTO_SCTP;
}

static __always_inline int parse_ports(void *l4, void *data_end, struct pkt *p)
{
	__be16 *ports = l4;

	if (p->fragment == PKT_LATER_FRAGMENT || !proto_has_ports(p->protocol))
		return PARSE_L3;
	if ((void *)(ports + 2) > data_end)
		return PARSE_L3;
	p->sport = bpf_ntohs(ports[0]);
	p->dport = bpf_ntohs(ports[1]);
	p->has_ports = 1;
	return PARSE_L4;
}

static __always_inline int parse_ipv4(void *cursor, void *data_end, struct pkt *p)
{
	struct iphdr *ip = cursor;
	__u32 hlen;
	__u16 frag;

	if ((void *)(ip + 1) > data_end)
		return PARSE_TRUNCATED;
	if (ip->version != 4 || ip->ihl < 5)
		return PARSE_TRUNCATED;
	hlen = ip->ihl * 4;
	if (cursor + hlen > data_end)
		return PARSE_TRUNCATED;
	p->family = 4;
	p->protocol = ip->protocol;
	p->frag_id = ip->id;
	p->l4_rel = hlen;
	__builtin_memcpy(p->src, &ip->saddr, 4);
	__builtin_memcpy(p->dst, &ip->daddr, 4);
	frag = bpf_ntohs(ip->frag_off);
	if (frag & 0x1fff)
		p->fragment = PKT_LATER_FRAGMENT;
	else if (frag & 0x2000)
		p->fragment = PKT_FIRST_FRAGMENT;
	return parse_ports(cursor + hlen, data_end, p);
}

struct ipv6_opt_hdr_ {
	__u8 nexthdr;
	__u8 hdrlen;
};

struct ipv6_frag_hdr_ {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 identification;
};

/* The headers parse_ipv6() walks through. */
static __always_inline int ipv6_is_exthdr(__u8 next)
{
	return next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS ||
	       next == IPPROTO_AH || next == IPPROTO_FRAGMENT;
}

static __always_inline int parse_ipv6(void *cursor, void *data_end, struct pkt *p)
{
	struct ipv6hdr *ip6 = cursor;
	__u8 next;

	if ((void *)(ip6 + 1) > data_end)
		return PARSE_TRUNCATED;
	if (ip6->version != 6)
		return PARSE_TRUNCATED;
	p->family = 6;
	__builtin_memcpy(p->src, &ip6->saddr, 16);
	__builtin_memcpy(p->dst, &ip6->daddr, 16);
	next = ip6->nexthdr;
	cursor = ip6 + 1;

	/* One turn per extension header, and one more to reach the upper layer after
	 * the last of PARSE_MAX_EXTHDRS headers. */
#pragma unroll
	for (int i = 0; i <= PARSE_MAX_EXTHDRS; i++) {
		struct ipv6_opt_hdr_ *opt = cursor;

		switch (next) {
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
			if ((void *)(opt + 1) > data_end)
				return PARSE_ADDRS;
			next = opt->nexthdr;
			cursor += (opt->hdrlen + 1) * 8;
			break;
		case IPPROTO_AH:
			if ((void *)(opt + 1) > data_end)
				return PARSE_ADDRS;
			next = opt->nexthdr;
			cursor += (opt->hdrlen + 2) * 4;
			break;
		case IPPROTO_FRAGMENT: {
			struct ipv6_frag_hdr_ *fh = cursor;

			if ((void *)(fh + 1) > data_end)
				return PARSE_ADDRS;
			next = fh->nexthdr;
			p->frag_id = fh->identification;
			if (bpf_ntohs(fh->frag_off) & 0xfff8)
				p->fragment = PKT_LATER_FRAGMENT;
			else if (bpf_ntohs(fh->frag_off) & 1)
				p->fragment = PKT_FIRST_FRAGMENT;
			cursor = fh + 1;
			/* A later fragment carries payload, not headers: `next` is the upper
			 * layer unless the fragmentable part began with an extension header. */
			if (p->fragment == PKT_LATER_FRAGMENT && ipv6_is_exthdr(next))
				return PARSE_ADDRS;
			break;
		}
		default:
			p->protocol = next;
			p->l4_rel = cursor - (void *)ip6;
			return parse_ports(cursor, data_end, p);
		}
	}
	return PARSE_ADDRS; /* chain longer than we walk */
}

static __always_inline int parse_packet(void *data, void *data_end, struct pkt *p)
{
	struct ethhdr *eth = data;
	void *cursor = eth + 1;
	__be16 proto;

	if (cursor > data_end)
		return PARSE_TRUNCATED;
	proto = eth->h_proto;

#pragma unroll
	for (int i = 0; i < PARSE_MAX_VLANS; i++) {
		struct vlan_hdr_ *vh = cursor;

		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		if ((void *)(vh + 1) > data_end)
			return PARSE_TRUNCATED;
		proto = vh->encapsulated_proto;
		cursor = vh + 1;
	}
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD))
		return PARSE_TRUNCATED;
	p->l3_off = cursor - data;
	if (proto == bpf_htons(ETH_P_IP))
		return parse_ipv4(cursor, data_end, p);
	if (proto == bpf_htons(ETH_P_IPV6))
		return parse_ipv6(cursor, data_end, p);
	return PARSE_NOT_IP;
}

#endif
