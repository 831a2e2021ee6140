// SPDX-License-Identifier: GPL-2.0
/* The endpoint (pod) datapath: anti-spoofing, conntrack and identity-based policy.
 *
 * Each endpoint loads its own copy of this object with the load-time constants ep_id,
 * ep_ipv4 and (dual-stack) ep_ipv6, reusing the node maps pinned by the agent
 * (abi/endpoint.h). Two programs, named
 * by the pod's point of view:
 *   from_container  tc/tcx ingress of the node-side veth: the pod's EGRESS
 *   to_container    tc/tcx egress of the node-side veth:  the pod's INGRESS
 *
 * Per packet: parse; ARP passes (from the pod only with the pod's own sender address);
 * IPv6 neighbour discovery and multicast listener messages pass without policy (from the
 * pod only from its own, a link-local or the unspecified address, and a neighbour
 * advertisement only for its own or a link-local target); anything but untagged IPv4,
 * and IPv6 when the endpoint has an IPv6 address, is dropped (the veth carries no VLAN
 * tags); from the pod the source must be ep_ipv4 / ep_ipv6; then conntrack (`ct` or
 * `ct6` by family):
 * an established connection passes without a policy lookup unless the endpoint's
 * policy_rev moved on since its verdict (then it is checked again and dropped if the new
 * policy denies it); a reply passes; a new connection needs an allow verdict and is then
 * tracked. Every drop is counted in `drops` and reported as FLOW_EVENT_DROP; every new
 * allowed flow is reported once as FLOW_EVENT_POLICY_VERDICT. Every packet that passes is
 * counted in `forwards` (per CPU and direction), and traced as FLOW_EVENT_TRACE when the
 * node's trace_mode (`monitor_config`, read at run time) asks: by default per connection,
 * like Cilium's medium monitor aggregation -- its first packet, its first reply, a packet
 * that adds SYN, FIN or RST to the flags its direction has seen (ct_account), untracked
 * packets -- so a busy established connection emits nothing.
 *
 * L4 keys:
 *   TCP, UDP, SCTP   ports. A TCP header must be complete (20 bytes), also in a first
 *                    fragment, so a tiny first fragment cannot hide the flags.
 * ICMP means ICMPv4 or ICMPv6 by family (echo 8/0 or 128/129; errors below or 1-4).
 *   ICMP echo        request: ct ports (0, id); reply: (id, 0), so the reversed tuple
 *                    of a reply is its request and a request is never taken for a reply.
 *                    A reply without its request is checked by policy and never tracked.
 *   ICMP errors      destination unreachable (incl. fragmentation needed), time exceeded
 *                    and parameter problem quote the IP header and 8 bytes of L4 of the
 *                    packet they answer. When that packet belongs to a tracked connection
 *                    of this endpoint, the error passes as a reply would (path-MTU
 *                    discovery works under default deny) and is reported as a verdict
 *                    with FLOW_MATCH_RELATED. Otherwise it is checked like other ICMP.
 *   other ICMP       not tracked: every packet is checked by policy (port = ICMP type)
 *                    and an allowed one is reported as a new flow.
 *   other protocols  tracked with ports 0; policy entries for the whole protocol match.
 * Fragments (IPv4, and IPv6 fragment headers): a first fragment that passed records its L4
 * key under (saddr, daddr, id, proto) in this endpoint's map for its family and direction
 * (frags_ingress, frags_egress, frags6_ingress, frags6_egress); a later
 * fragment takes it from there (or is dropped as FRAG_NOT_FOUND), and so gets exactly its
 * first fragment's conntrack and policy treatment. Recording only after the verdict means
 * a denied first fragment changes nothing; a map per endpoint and direction means a flood
 * of first fragments can only evict records of the endpoint and direction it is aimed at
 * (and needs a policy letting it in there).
 */
#include "include/common.h"
#include <linux/pkt_cls.h>
#include "abi/endpoint.h"
#include "lib/events.h"
/* Extension headers walked before a pod's packet counts as unreadable (dropped as
 * INVALID_PACKET): Cilium walks 4 too. Each one more costs the verifier ~5 ms a load. */
#define PARSE_MAX_EXTHDRS 4
#include "lib/parse.h"
#include "lib/ipcache.h"
#include "lib/policy.h"
#include "lib/conntrack.h"
#include "lib/service_nat.h"
#include "lib/icmp_nat.h"

const volatile __u16 ep_id = 0;
const volatile __be32 ep_ipv4 = 0;
/* All zero: the endpoint has no IPv6 address, and IPv6 is not its protocol. */
const volatile __u32 ep_ipv6[4] = {};

/* Ethernet + IPv6 with a few extension headers (or IPv4 with options) + TCP header. */
#define PULL_BYTES 128
/* Where an L4 header may start for us to read it (the verifier needs a bound). */
#define L4_OFF_MAX 1023

/* data + off for an offset checked to be <= L4_OFF_MAX. The mask is done in inline
 * assembly: the compiler knows it changes nothing and would drop it, or check one copy of
 * the offset and add another, leaving the verifier without the bound on the register it
 * adds. */
static __always_inline __u8 *l4_at(void *data, __u64 off)
{
	asm volatile("%0 &= 0x3ff" : "+r"(off));
	return data + off;
}
/* Per endpoint, family and direction: datagrams whose first fragment passed and whose
 * later ones may still come. Legitimate traffic needs few at a time (a record is used
 * within microseconds of its writing); ~45 KiB of kernel memory per IPv4 map. */
#define FRAGS_MAX_ENTRIES 512
#define DROPS_MAX_ENTRIES 16384
/* What ct_account may report that is traced: the first appearance of a TCP flag in a
 * direction of a connection (Cilium's default --monitor-aggregation-flags: syn, fin, rst),
 * and its first reply (a UDP or ICMP answer; for TCP the SYN-ACK). */
#define TRACE_NEWS (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST | CT_NEWS_FIRST_REPLY)

#define ICMP_ECHOREPLY_ 0
#define ICMP_DEST_UNREACH_ 3
#define ICMP_ECHO_ 8
#define ICMP_TIME_EXCEEDED_ 11
#define ICMP_PARAMETERPROB_ 12
#define ICMPV6_DEST_UNREACH_ 1
#define ICMPV6_PARAMPROB_ 4 /* 1..4: unreachable, packet too big, time exceeded, this */
#define ICMPV6_ECHO_REQUEST_ 128
#define ICMPV6_ECHO_REPLY_ 129
#define ICMPV6_MLD_QUERY_ 130 /* 130..137: MLD, router and neighbour discovery, redirect */
#define ICMPV6_NDISC_REDIRECT_ 137
#define ICMPV6_NDISC_NA_ 136
#define ICMPV6_MLD2_REPORT_ 143

struct frags_map {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FRAGS_MAX_ENTRIES);
	__type(key, struct frag_key);
	__type(value, struct frag_ports);
};
struct frags_map frags_ingress SEC(".maps");
struct frags_map frags_egress SEC(".maps");

struct frags6_map {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FRAGS_MAX_ENTRIES);
	__type(key, struct frag6_key);
	__type(value, struct frag_ports);
};
struct frags6_map frags6_ingress SEC(".maps");
struct frags6_map frags6_egress SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, DROPS_MAX_ENTRIES);
	__type(key, struct drop_key);
	__type(value, struct drop_value);
} drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2); /* enum ep_direction */
	__type(key, __u32);
	__type(value, struct forward_value);
} forwards SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct monitor_config);
} monitor_config SEC(".maps");

EVENTS_RINGBUF();
ABI_EXPORT(flow_event);

/* What the program knows about the packet so far. */
struct flow {
	__u32 saddr[4]; /* network order; IPv4 in [0] */
	__u32 daddr[4];
	__u32 len;
	__u32 peer_identity;
	__u32 peer_addr_identity; /* the peer address's own identity, or 0 (ipcache.h) */
	__u32 policy_rev;
	__u32 frag_id;
	__u16 sport; /* as reported: ports, or ICMP type and code */
	__u16 dport;
	__u16 ct_sport;
	__u16 ct_dport;
	__u16 policy_port;
	__u16 l4_off;     /* from the start of the frame */
	__u8 family;      /* 4 or 6; 0 before the addresses are known */
	__u8 proto;
	__u8 dir;
	__u8 tcp_flags;
	__u8 tracked;     /* conntrack applies */
	__u8 peer_known;  /* peer_identity is set */
	__u8 first_fragment; /* record frag_l4 under frag_id once the packet passes */
	__u8 fragment;    /* enum pkt_fragment */
	__u8 service;     /* translated to a service's backend here (CT_SERVICE) */
	struct frag_ports frag_l4;
};

struct arp_ipv4 {
	__be16 hrd;
	__be16 pro;
	__u8 hln;
	__u8 pln;
	__be16 op;
	__u8 sha[6];
	__u8 spa[4];
	__u8 tha[6];
	__u8 tpa[4];
};

static __always_inline int ipv6_equal(const __u32 *a, const volatile __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline int ipv6_link_local(const __u32 *a)
{
	return (a[0] & bpf_htonl(0xffc00000)) == bpf_htonl(0xfe800000);
}

static __always_inline int ipv6_unspecified(const __u32 *a)
{
	return !(a[0] | a[1] | a[2] | a[3]);
}

static __always_inline int endpoint_has_ipv6(void)
{
	return ep_ipv6[0] | ep_ipv6[1] | ep_ipv6[2] | ep_ipv6[3];
}

static __always_inline __u32 peer_identity(struct flow *f)
{
	const __u32 *peer;

	if (!f->peer_known) {
		peer = f->dir == EP_DIR_EGRESS ? f->daddr : f->saddr;
		f->peer_identity = f->family == 6 ?
					   ipcache6_identity(peer, &f->peer_addr_identity) :
					   ipcache_identity(peer[0], &f->peer_addr_identity);
		f->peer_known = 1;
	}
	return f->peer_identity;
}

static __always_inline void report(struct flow *f, __u16 type, __u16 reason, __u8 match,
				   __u32 rule_id)
{
	struct flow_event ev = {};

	fill_event_header(&ev.h, type);
	__builtin_memcpy(ev.saddr, f->saddr, 16);
	__builtin_memcpy(ev.daddr, f->daddr, 16);
	ev.family = f->family;
	ev.sport = f->sport;
	ev.dport = f->dport;
	ev.proto = f->proto;
	ev.dir = f->dir;
	ev.tcp_flags = f->tcp_flags;
	ev.match = match;
	ev.ep_id = ep_id;
	ev.drop_reason = reason;
	ev.peer_identity = f->family ? peer_identity(f) : 0;
	ev.rule_id = rule_id;
	ev.policy_rev = f->policy_rev;
	ev.len = f->len;
	emit_event(&ev, sizeof(ev));
}

static __always_inline void count_drop(__u8 dir, __u32 reason, __u32 len)
{
	struct drop_key key = { .ep_id = ep_id, .dir = dir, .reason = reason };
	struct drop_value *v = bpf_map_lookup_elem(&drops, &key);

	if (!v) {
		struct drop_value zero = {};

		bpf_map_update_elem(&drops, &key, &zero, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&drops, &key);
		if (!v)
			return;
	}
	v->packets += 1;
	v->bytes += len;
}

/* A packet that passes, as FLOW_EVENT_TRACE; `match` is what conntrack found (see
 * abi/endpoint.h). Global: checked once, and its event is not on the caller's stack. */
__noinline int trace(struct flow *f, __u32 match)
{
	if (!f)
		return 0;
	report(f, FLOW_EVENT_TRACE, DROP_NONE, match, 0);
	return 0;
}

/* Whether the node's trace_mode traces this packet; `notable`: it opens a connection, is
 * untracked, or adds a TCP flag of TRACE_TCP_FLAGS to its direction's. One array read
 * (inlined by the verifier) on every packet; the event only when wanted. */
static __always_inline int trace_wanted(__u8 dir, int notable)
{
	__u32 zero = 0;
	struct monitor_config *cfg = bpf_map_lookup_elem(&monitor_config, &zero);
	__u32 mode = cfg ? cfg->trace_mode : TRACE_MODE_OFF;

	if (mode == TRACE_MODE_CONNECTIONS)
		return notable;
	if (mode == TRACE_MODE_TO_ENDPOINT)
		return dir == EP_DIR_INGRESS;
	return mode == TRACE_MODE_ALL;
}

/* A global function: the verifier checks it once, not once per drop site. */
__noinline int drop(struct flow *f, __u32 reason, __u32 match, __u32 rule_id)
{
	if (!f)
		return TC_ACT_SHOT;
	count_drop(f->dir, reason, f->len);
	report(f, FLOW_EVENT_DROP, reason, match, rule_id);
	return TC_ACT_SHOT;
}

/* The policy verdict for the packet in `f`; 1 when allowed. Global, so the verifier
 * checks it once instead of once for every way a packet can arrive here. */
__noinline int flow_allowed(struct flow *f, struct policy_verdict *v)
{
	struct endpoint_state *st = endpoint_state_of(ep_id);

	if (!f || !v)
		return 0;
	if (!st) {
		v->reason = DROP_NO_ENDPOINT_STATE;
		v->match = FLOW_MATCH_NONE;
		v->rule_id = 0;
		return 0;
	}
	peer_identity(f);
	return policy_allows(st, ep_id, f->dir, f->peer_identity, f->peer_addr_identity, f->proto,
			     f->policy_port, v);
}

static __always_inline int is_icmp(__u8 proto)
{
	return proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6;
}

static __always_inline int icmp_echo_request(__u8 proto, __u8 type)
{
	return type == (proto == IPPROTO_ICMPV6 ? ICMPV6_ECHO_REQUEST_ : ICMP_ECHO_);
}

static __always_inline int icmp_echo_reply(__u8 proto, __u8 type)
{
	return type == (proto == IPPROTO_ICMPV6 ? ICMPV6_ECHO_REPLY_ : ICMP_ECHOREPLY_);
}

static __always_inline int icmp_is_error(__u8 proto, __u16 type)
{
	if (proto == IPPROTO_ICMPV6)
		return type >= ICMPV6_DEST_UNREACH_ && type <= ICMPV6_PARAMPROB_;
	return type == ICMP_DEST_UNREACH_ || type == ICMP_TIME_EXCEEDED_ ||
	       type == ICMP_PARAMETERPROB_;
}

/* Neighbour discovery and multicast listener messages: the link's own plumbing. */
static __always_inline int icmpv6_is_link_control(__u16 type)
{
	return (type >= ICMPV6_MLD_QUERY_ && type <= ICMPV6_NDISC_REDIRECT_) ||
	       type == ICMPV6_MLD2_REPORT_;
}

static __always_inline void flow_set_ports(struct flow *f, __u16 sport, __u16 dport)
{
	f->sport = f->ct_sport = sport;
	f->dport = f->ct_dport = f->policy_port = dport;
	f->tracked = 1;
}

static __always_inline void flow_set_icmp(struct flow *f, __u8 type, __u8 code, __u16 id)
{
	int request = icmp_echo_request(f->proto, type), reply = icmp_echo_reply(f->proto, type);

	f->sport = type;
	f->dport = code;
	f->policy_port = type;
	f->tracked = request || reply;
	f->ct_sport = reply ? id : 0;
	f->ct_dport = request ? id : 0;
}

/* A first fragment's L4 key as `frags` keeps it: ports, or for ICMP (type << 8 | code)
 * and the echo id. */
static __always_inline void flow_set_recorded(struct flow *f, const struct frag_ports *fp)
{
	if (is_icmp(f->proto))
		flow_set_icmp(f, fp->sport >> 8, fp->sport & 0xff, fp->dport);
	else
		flow_set_ports(f, fp->sport, fp->dport);
}

static __always_inline void *frags_of(__u8 family, __u8 dir)
{
	if (family == 6)
		return dir == EP_DIR_EGRESS ? (void *)&frags6_egress : (void *)&frags6_ingress;
	return dir == EP_DIR_EGRESS ? (void *)&frags_egress : (void *)&frags_ingress;
}

union any_frag_key {
	struct frag_key v4;
	struct frag6_key v6;
};

/* The fragment key of `f` for its family's map, in `fk`. */
static __always_inline void *frag_key_of(const struct flow *f, union any_frag_key *fk)
{
	if (f->family == 6) {
		__builtin_memcpy(fk->v6.saddr, f->saddr, 16);
		__builtin_memcpy(fk->v6.daddr, f->daddr, 16);
		fk->v6.id = f->frag_id;
		fk->v6.proto = f->proto;
		return &fk->v6;
	}
	fk->v4.saddr = f->saddr[0];
	fk->v4.daddr = f->daddr[0];
	fk->v4.id = f->frag_id;
	fk->v4.proto = f->proto;
	return &fk->v4;
}

/* The packet passes. A first fragment records its L4 key now, after the verdict, so that
 * a denied one neither creates nor overwrites a record. */
static __always_inline int pass(const struct flow *f)
{
	union any_frag_key fk = {};

	if (f->first_fragment)
		bpf_map_update_elem(frags_of(f->family, f->dir), frag_key_of(f, &fk), &f->frag_l4,
				    BPF_ANY);
	return TC_ACT_OK;
}

/* Fill the L4 part of `f` from the headers (or, for a later fragment, from its first
 * fragment). Returns a drop reason, DROP_NONE when the packet can be judged. */
static __always_inline __u32 load_l4(void *data, void *data_end, const struct pkt *p,
				     struct flow *f)
{
	union any_frag_key fk = {};
	struct frag_ports fp = {};
	struct frag_ports *recorded;
	__u8 *l4;

	f->l4_off = p->l3_off + p->l4_rel;
	f->frag_id = p->frag_id;
	if (f->l4_off > L4_OFF_MAX)
		return DROP_INVALID_PACKET;
	l4 = l4_at(data, f->l4_off);

	if (p->fragment == PKT_LATER_FRAGMENT) {
		if (!proto_has_ports(f->proto) && !is_icmp(f->proto)) {
			flow_set_ports(f, 0, 0);
			return DROP_NONE;
		}
		recorded = bpf_map_lookup_elem(frags_of(f->family, f->dir), frag_key_of(f, &fk));
		if (!recorded)
			return DROP_FRAG_NOT_FOUND;
		flow_set_recorded(f, recorded);
		return DROP_NONE;
	}

	switch (f->proto) {
	case IPPROTO_TCP:
		if (l4 + 20 > (__u8 *)data_end || l4[12] >> 4 < 5)
			return DROP_CT_TRUNCATED_OR_INVALID_HEADER;
		f->tcp_flags = l4[13];
		fp.sport = p->sport;
		fp.dport = p->dport;
		break;
	case IPPROTO_UDP:
		if (l4 + 8 > (__u8 *)data_end)
			return DROP_CT_TRUNCATED_OR_INVALID_HEADER;
		fp.sport = p->sport;
		fp.dport = p->dport;
		break;
	case IPPROTO_SCTP:
		if (!p->has_ports)
			return DROP_CT_TRUNCATED_OR_INVALID_HEADER;
		fp.sport = p->sport;
		fp.dport = p->dport;
		break;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		if (l4 + 8 > (__u8 *)data_end)
			return DROP_CT_TRUNCATED_OR_INVALID_HEADER;
		fp.sport = (__u16)l4[0] << 8 | l4[1];
		fp.dport = bpf_ntohs(*(__be16 *)(l4 + 4));
		break;
	default:
		flow_set_ports(f, 0, 0);
		return DROP_NONE;
	}
	flow_set_recorded(f, &fp);
	f->first_fragment = p->fragment == PKT_FIRST_FRAGMENT;
	f->frag_l4 = fp;
	return DROP_NONE;
}

/* Ports of the connection an ICMP error quotes (its 8 bytes of L4 `l4`, protocol
 * `proto`), as conntrack keys that connection; 0 when conntrack keeps no such thing. */
static __always_inline int quoted_ports(__u8 proto, const __u8 *l4, __u16 *sport, __u16 *dport)
{
	switch (proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		*sport = (__u16)l4[0] << 8 | l4[1];
		*dport = (__u16)l4[2] << 8 | l4[3];
		return 1;
	case IPPROTO_ICMP: /* echo ids as flow_set_icmp tracks them; no errors about errors */
	case IPPROTO_ICMPV6:
		if (icmp_echo_request(proto, l4[0]))
			*dport = (__u16)l4[4] << 8 | l4[5];
		else if (icmp_echo_reply(proto, l4[0]))
			*sport = (__u16)l4[4] << 8 | l4[5];
		else
			return 0;
		return 1;
	default: /* tracked with ports 0 */
		return 1;
	}
}

/* Whether the ICMP error in `f` (a whole datagram) speaks of a connection conntrack
 * tracks for this endpoint; if so, *entry is that connection's. The error quotes the
 * packet it answers (IP header, then at least 8 bytes of L4), which went the other way:
 * looked up as a packet of direction !dir, it is either the connection's original
 * direction or its reply. Read with bpf_skb_load_bytes: the quote may lie beyond the
 * linear part, and the packet pointers stay valid. IPv6 quotes with extension headers
 * are not followed (they are checked like other ICMP). Not inlined: its stack is its own. */
static __noinline int icmp_error_related(struct __sk_buff *skb, const struct flow *f,
					 __u64 now, struct ct_entry **entry)
{
	__u32 off = f->l4_off + 8; /* the ICMP header */
	__u8 l4[8];

	if (f->family == 6) {
		struct ct6_key key = { .ep_id = ep_id, .dir = !f->dir };
		struct ipv6hdr quoted;

		if (bpf_skb_load_bytes(skb, off, &quoted, sizeof(quoted)) < 0)
			return 0;
		/* Errors go back to the quoted sender. */
		if (quoted.version != 6 || !ipv6_equal((__u32 *)&quoted.saddr, f->daddr))
			return 0;
		if (bpf_skb_load_bytes(skb, off + sizeof(quoted), l4, sizeof(l4)) < 0)
			return 0;
		__builtin_memcpy(key.saddr, &quoted.saddr, 16);
		__builtin_memcpy(key.daddr, &quoted.daddr, 16);
		key.proto = quoted.nexthdr;
		if (!quoted_ports(key.proto, l4, &key.sport, &key.dport))
			return 0;
		return ct6_lookup(&key, now, 0, entry) != CT_NEW;
	} else {
		struct ct_key key = { .ep_id = ep_id, .dir = !f->dir };
		struct iphdr quoted;

		if (bpf_skb_load_bytes(skb, off, &quoted, sizeof(quoted)) < 0)
			return 0;
		/* Errors are only sent about offset-0 fragments, and back to the quoted sender. */
		if (quoted.version != 4 || quoted.ihl < 5 ||
		    quoted.frag_off & bpf_htons(0x1fff) || quoted.saddr != f->daddr[0])
			return 0;
		if (bpf_skb_load_bytes(skb, off + quoted.ihl * 4, l4, sizeof(l4)) < 0)
			return 0;
		key.saddr = quoted.saddr;
		key.daddr = quoted.daddr;
		key.proto = quoted.protocol;
		if (!quoted_ports(key.proto, l4, &key.sport, &key.dport))
			return 0;
		return ct_lookup(&key, now, 0, entry) != CT_NEW;
	}
}

/* What parse_flow says besides drop reasons: the packet passes as it is. */
#define PARSED_PASS 1

/* ARP from the pod must speak for the pod's own address; ARP to the pod passes. */
static __always_inline __u32 check_arp(void *data, void *data_end, struct flow *f)
{
	struct arp_ipv4 *arp = data + sizeof(struct ethhdr);

	if (f->dir == EP_DIR_INGRESS)
		return PARSED_PASS;
	if ((void *)(arp + 1) > data_end || arp->pro != bpf_htons(ETH_P_IP) || arp->pln != 4)
		return DROP_INVALID_PACKET;
	__builtin_memcpy(&f->saddr[0], arp->spa, 4);
	__builtin_memcpy(&f->daddr[0], arp->tpa, 4);
	f->family = 4;
	if (f->saddr[0] != ep_ipv4)
		return DROP_INVALID_SOURCE_IP;
	return PARSED_PASS;
}

/* Neighbour discovery and MLD, as handle_arp for IPv6: to the pod it passes; from the
 * pod only from an address of its own (its address, its link-local one, or none yet),
 * and an advertisement only for such a target, so a pod cannot claim a neighbour's
 * address. */
static __always_inline __u32 check_link_control(void *data_end, struct flow *f,
						 const __u8 *l4)
{
	__u32 target[4];

	if (f->dir == EP_DIR_INGRESS)
		return PARSED_PASS;
	if (!ipv6_equal(f->saddr, ep_ipv6) && !ipv6_link_local(f->saddr) &&
	    !ipv6_unspecified(f->saddr))
		return DROP_INVALID_SOURCE_IP;
	if (l4[0] == ICMPV6_NDISC_NA_) {
		if ((void *)(l4 + 24) > data_end)
			return DROP_INVALID_PACKET;
		__builtin_memcpy(target, l4 + 8, 16);
		if (!ipv6_equal(target, ep_ipv6) && !ipv6_link_local(target))
			return DROP_INVALID_SOURCE_IP;
	}
	return PARSED_PASS;
}

/* The IP header: `f` gets the addresses and protocol; a drop reason, or DROP_NONE. */
static __always_inline __u32 load_l3(struct ethhdr *eth, void *data_end, struct pkt *p,
				     struct flow *f)
{
	int res;

	p->l3_off = sizeof(*eth);
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		if (parse_ipv4(eth + 1, data_end, p) == PARSE_TRUNCATED)
			return DROP_INVALID_PACKET;
		f->family = 4;
		__builtin_memcpy(&f->saddr[0], p->src, 4);
		__builtin_memcpy(&f->daddr[0], p->dst, 4);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6) && endpoint_has_ipv6()) {
		res = parse_ipv6(eth + 1, data_end, p);
		if (res == PARSE_TRUNCATED)
			return DROP_INVALID_PACKET;
		f->family = 6;
		__builtin_memcpy(f->saddr, p->src, 16);
		__builtin_memcpy(f->daddr, p->dst, 16);
		/* A header chain we cannot walk hides the protocol: no verdict possible. */
		if (res == PARSE_ADDRS)
			return DROP_INVALID_PACKET;
	} else {
		return DROP_UNSUPPORTED_L3_PROTOCOL;
	}
	f->proto = p->protocol;
	return DROP_NONE;
}

static __always_inline int source_is_endpoint(const struct flow *f)
{
	return f->family == 6 ? ipv6_equal(f->saddr, ep_ipv6) : f->saddr[0] == ep_ipv4;
}

/* Everything the headers say, into `f`: DROP_NONE to go on to conntrack and policy,
 * PARSED_PASS when the packet passes as it is (ARP, neighbour discovery), or a drop
 * reason. A global function: the verifier checks it once, on its own, and the caller
 * goes on from one state instead of one per way through the parser (the load took ~7x
 * longer inlined); and its scratch is not on the stack while the verdict is made (the
 * tc stack is 512 bytes for all frames together). */
__noinline __u32 parse_flow(struct __sk_buff *skb, struct flow *f)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct pkt p = {};
	__u32 reason;
	__u8 *l4;

	if (!f)
		return DROP_INVALID_PACKET;
	if ((void *)(eth + 1) > data_end)
		return DROP_INVALID_PACKET;
	if (eth->h_proto == bpf_htons(ETH_P_ARP))
		return check_arp(data, data_end, f);
	reason = load_l3(eth, data_end, &p, f);
	if (reason != DROP_NONE)
		return reason;
	/* A spoofed source is dropped before its L4 header is read (neighbour discovery,
	 * which may come from other addresses of the pod's own, is told apart below). */
	if (f->dir == EP_DIR_EGRESS && !source_is_endpoint(f) && f->proto != IPPROTO_ICMPV6)
		return DROP_INVALID_SOURCE_IP;
	reason = load_l4(data, data_end, &p, f);
	if (reason != DROP_NONE)
		return reason;
	f->fragment = p.fragment;
	if (f->proto == IPPROTO_ICMPV6 && p.fragment == PKT_NOT_FRAGMENT &&
	    icmpv6_is_link_control(f->sport)) {
		l4 = l4_at(data, f->l4_off); /* load_l4 checked it */
		if ((void *)(l4 + 8) > data_end)
			return DROP_INVALID_PACKET;
		return check_link_control(data_end, f, l4);
	}
	if (f->dir == EP_DIR_EGRESS && !source_is_endpoint(f))
		return DROP_INVALID_SOURCE_IP;
	return DROP_NONE;
}

union any_ct_key {
	struct ct_key v4;
	struct ct6_key v6;
};

/* A conntrack key of this endpoint's (ct or ct6 by family), or a svc_nat one (`dir` an
 * enum svc_nat_dir: the client's tuple to the frontend or the backend). */
static __always_inline void ct_key_of(union any_ct_key *key, __u8 family, __u8 proto,
				      const __u32 *saddr, const __u32 *daddr, __u16 sport,
				      __u16 dport, __u8 dir)
{
	if (family == 6) {
		__builtin_memcpy(key->v6.saddr, saddr, 16);
		__builtin_memcpy(key->v6.daddr, daddr, 16);
		key->v6.sport = sport;
		key->v6.dport = dport;
		key->v6.proto = proto;
		key->v6.dir = dir;
		key->v6.ep_id = ep_id;
		return;
	}
	key->v4.saddr = saddr[0];
	key->v4.daddr = daddr[0];
	key->v4.sport = sport;
	key->v4.dport = dport;
	key->v4.proto = proto;
	key->v4.dir = dir;
	key->v4.ep_id = ep_id;
}

/* Conntrack of `f` in its family's map: the result, *e the entry when found. */
static __always_inline enum ct_result flow_ct_lookup(const struct flow *f, __u64 now,
						     union any_ct_key *key, struct ct_entry **e)
{
	/* a constant family each: one branch, as if written out twice */
	if (f->family == 6) {
		ct_key_of(key, 6, f->proto, f->saddr, f->daddr, f->ct_sport, f->ct_dport, f->dir);
		return ct6_lookup(&key->v6, now, f->tcp_flags, e);
	}
	ct_key_of(key, 4, f->proto, f->saddr, f->daddr, f->ct_sport, f->ct_dport, f->dir);
	return ct_lookup(&key->v4, now, f->tcp_flags, e);
}

static __always_inline void *svc_nat_of(__u8 family)
{
	return family == 6 ? (void *)&svc_nat6 : (void *)&svc_nat;
}

/* Whether the packet's destination is in the service CIDR of its family. */
static __always_inline int in_service_cidr(const struct flow *f)
{
	return f->family == 6 ? svc_in_cidr6(f->daddr) : svc_in_cidr4(f->daddr[0]);
}

/* What a packet from the pod pays before conntrack when no socket LB hook translated its
 * connection: a compare with the service CIDR (load-time constants). Whole TCP and UDP
 * packets only: fragments, ICMP and other protocols to a ClusterIP go on untranslated. */
static __always_inline int to_service_cidr(const struct flow *f)
{
	if (!in_service_cidr(f))
		return 0;
	return f->fragment == PKT_NOT_FRAGMENT &&
	       (f->proto == IPPROTO_TCP || f->proto == IPPROTO_UDP);
}

/* Whether the packet opens a new connection on a tuple svc_nat knows (`known`: its
 * backend then), so that it picks its backend afresh: the translation lives as long as
 * the flow's conntrack entry, as Cilium's service entries do. A TCP SYN (without ACK)
 * with no live entry of the translated tuple or a closing one, or a packet of another
 * protocol with no live entry. TCP's other packets keep their backend without a lookup. */
static __always_inline int svc_flow_opens(const struct flow *f, const struct svc_nat *known)
{
	union any_ct_key key = {};
	struct ct_entry *e;

	if (f->proto == IPPROTO_TCP &&
	    (f->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN)
		return 0;
	ct_key_of(&key, f->family, f->proto, f->saddr, (const __u32 *)known->addr, f->sport,
		    known->port, f->dir);
	e = bpf_map_lookup_elem(f->family == 6 ? (void *)&ct6 : (void *)&ct, &key);
	if (!ct_live(e, ct_now()))
		return 1;
	return f->proto == IPPROTO_TCP && (e->flags & CT_CLOSING);
}

/* The pod's packet to a ClusterIP frontend, to the flow's backend: chosen on the flow's
 * first packet as the socket LB chooses (svc_nat_pick), kept in svc_nat with the reverse
 * translation of its replies; a flow whose backend is gone, and a new connection on a
 * tuple whose conntrack entry ended (svc_flow_opens), pick anew (as Cilium). Both
 * checksums are fixed, and `f` then describes the translated packet, so that conntrack
 * and policy see the backend. DROP_NONE also when the address is no frontend (the packet
 * goes on as it is). Global: verified once, and off the path of other packets. */
__noinline __u32 service_translate(struct __sk_buff *skb, struct flow *f)
{
	union any_ct_key key = {};
	struct svc_nat nat = {};
	struct svc_backend *be = NULL;
	struct svc_nat *known;
	void *map;
	__u32 id = 0;

	if (!f)
		return DROP_NONE;
	map = svc_nat_of(f->family);
	ct_key_of(&key, f->family, f->proto, f->saddr, f->daddr, f->sport, f->dport,
		    SVC_NAT_FWD);
	known = bpf_map_lookup_elem(map, &key);
	if (known && !svc_flow_opens(f, known)) {
		be = svc_backend(known->backend);
		if (be && be->port == known->port && svc_addr_equal(be->addr, known->addr))
			id = known->backend;
	}
	if (!id) {
		struct svc_frontend_key fk = { .scope = SVC_SCOPE_INTERNAL };
		struct svc_frontend *fe;

		__builtin_memcpy(fk.addr, f->daddr, 16);
		fk.port = f->dport;
		fk.protocol = f->proto;
		fk.family = f->family;
		fe = svc_lookup(&fk);
		if (!fe)
			return DROP_NONE;
		id = svc_nat_pick(fe, f->saddr, f->daddr, f->sport, f->dport, f->proto);
		be = id ? svc_backend(id) : NULL;
		if (!be || be->family != f->family)
			return DROP_SERVICE_BACKEND_NOT_FOUND;
		__builtin_memcpy(nat.addr, be->addr, 16);
		nat.port = be->port;
		nat.backend = id;
		nat.revnat = fe->revnat;
		bpf_map_update_elem(map, &key, &nat, BPF_ANY);
		/* The replies' way back: from the backend to the frontend. */
		ct_key_of(&key, f->family, f->proto, f->saddr, (const __u32 *)be->addr,
			    f->sport, be->port, SVC_NAT_REV);
		__builtin_memcpy(nat.addr, f->daddr, 16);
		nat.port = f->dport;
		bpf_map_update_elem(map, &key, &nat, BPF_ANY);
		svc_nat_note(ep_id, be, fe->revnat);
	}
	if (l4_nat_rewrite(skb, SVC_NAT_ETH_HLEN, f->l4_off, f->family, f->proto, 0,
			   (const __u8 *)f->daddr, be->addr, f->dport, be->port))
		return DROP_INVALID_PACKET;
	__builtin_memcpy(f->daddr, be->addr, 16);
	f->dport = f->ct_dport = f->policy_port = be->port;
	f->service = 1;
	return DROP_NONE;
}

/* A reply of a translated flow (its conntrack entry has CT_SERVICE): from the frontend
 * again, as the client sent to it. Whole packets only (see to_service_cidr). */
__noinline __u32 service_reverse(struct __sk_buff *skb, struct flow *f)
{
	union any_ct_key key = {};
	struct svc_nat *from;

	if (!f || f->fragment != PKT_NOT_FRAGMENT)
		return DROP_NONE;
	ct_key_of(&key, f->family, f->proto, f->daddr, f->saddr, f->dport, f->sport,
		    SVC_NAT_REV);
	from = bpf_map_lookup_elem(svc_nat_of(f->family), &key);
	if (!from)
		return DROP_NONE;
	if (l4_nat_rewrite(skb, SVC_NAT_ETH_HLEN, f->l4_off, f->family, f->proto, 1,
			   (const __u8 *)f->saddr, from->addr, f->sport, from->port))
		return DROP_INVALID_PACKET;
	__builtin_memcpy(f->saddr, from->addr, 16);
	f->sport = f->ct_sport = from->port;
	return DROP_NONE;
}

/* An ICMP error about a translated flow, rewritten as the pod's view of the flow has it
 * (lib/icmp_nat.h does the rewrite):
 *   to the pod (ingress), quoting its request to the backend: the quote names the
 *     frontend again, and an error the backend itself sent comes from the frontend
 *     (port unreachable -> ECONNREFUSED; a router's "fragmentation needed" / "packet too
 *     big" keeps its source and reaches the socket: path MTU);
 *   from the pod (egress), quoting a reply it got from the frontend: the quote names the
 *     backend, and an error to the frontend goes to the backend.
 * `f` then names the rewritten addresses. Global: verified once, off every other path. */
__noinline __u32 service_icmp_error(struct __sk_buff *skb, struct flow *f)
{
	union any_ct_key key = {};
	struct np6_tuple q;
	struct svc_nat *nat;
	int ingress, outer;
	__u32 len;

	if (!f || icmp_quoted(skb, f->l4_off, f->family, &q, &len))
		return DROP_NONE;
	ingress = f->dir == EP_DIR_INGRESS;
	if (ingress)
		ct_key_of(&key, f->family, q.protocol, (const __u32 *)q.saddr,
			    (const __u32 *)q.daddr, q.sport, q.dport, SVC_NAT_REV);
	else
		ct_key_of(&key, f->family, q.protocol, (const __u32 *)q.daddr,
			    (const __u32 *)q.saddr, q.dport, q.sport, SVC_NAT_FWD);
	nat = bpf_map_lookup_elem(svc_nat_of(f->family), &key);
	if (!nat)
		return DROP_NONE;
	/* The outer address on the frontend's side: when it is the quoted one, it moves too. */
	if (ingress) {
		outer = addr_equal((const __u8 *)f->saddr, q.daddr, f->family);
		__builtin_memcpy(q.daddr, nat->addr, 16);
		q.dport = nat->port;
	} else {
		outer = addr_equal((const __u8 *)f->daddr, q.saddr, f->family);
		__builtin_memcpy(q.saddr, nat->addr, 16);
		q.sport = nat->port;
	}
	if (icmp_quote_rewrite(skb, f->l4_off, f->family, &q, len))
		return DROP_INVALID_PACKET;
	if (!outer)
		return DROP_NONE;
	if (icmp_outer_rewrite(skb, SVC_NAT_ETH_HLEN, f->l4_off, f->family, ingress,
			       (const __u8 *)(ingress ? f->saddr : f->daddr), nat->addr))
		return DROP_INVALID_PACKET;
	__builtin_memcpy(ingress ? f->saddr : f->daddr, nat->addr, 16);
	return DROP_NONE;
}

/* A tracked packet's trace: its peer is the connection's (no ipcache lookup needed). */
static __always_inline void trace_tracked(struct flow *f, const struct ct_entry *e, __u32 match)
{
	f->peer_identity = e->peer_identity;
	f->peer_known = 1;
	trace(f, match);
}

static __always_inline void count_forward(__u8 dir, __u32 len)
{
	__u32 key = dir;
	struct forward_value *v = bpf_map_lookup_elem(&forwards, &key);

	if (v) {
		v->packets += 1;
		v->bytes += len;
	}
}

static __always_inline int handle(struct __sk_buff *skb, __u8 dir)
{
	struct flow f = { .dir = dir, .len = skb->len };
	struct policy_verdict v = {};
	struct endpoint_state *st;
	struct ct_entry *e = NULL;
	union any_ct_key key = {};
	__u32 reason;
	__u64 now = 0;
	__u32 gained;

	if (skb->data_end - skb->data < PULL_BYTES && skb->len > skb->data_end - skb->data)
		bpf_skb_pull_data(skb, skb->len < PULL_BYTES ? skb->len : PULL_BYTES);
	reason = parse_flow(skb, &f);
	if (reason == PARSED_PASS) /* ARP, neighbour discovery: counted, never traced */
		return TC_ACT_OK;
	if (reason != DROP_NONE)
		return drop(&f, reason, FLOW_MATCH_NONE, 0);

	st = endpoint_state_of(ep_id);
	if (!st)
		return drop(&f, DROP_NO_ENDPOINT_STATE, FLOW_MATCH_NONE, 0);
	f.policy_rev = st->policy_rev;

	if (dir == EP_DIR_EGRESS && to_service_cidr(&f)) {
		reason = service_translate(skb, &f);
		if (reason != DROP_NONE)
			return drop(&f, reason, FLOW_MATCH_NONE, 0);
	}

	if (is_icmp(f.proto) && f.fragment == PKT_NOT_FRAGMENT &&
	    icmp_is_error(f.proto, f.sport)) {
		now = ct_now();
		/* from the pod to a frontend: about a translated flow's reply, if any */
		if (dir == EP_DIR_EGRESS && in_service_cidr(&f)) {
			reason = service_icmp_error(skb, &f);
			if (reason != DROP_NONE)
				return drop(&f, reason, FLOW_MATCH_NONE, 0);
		}
		if (icmp_error_related(skb, &f, now, &e)) {
			if (dir == EP_DIR_INGRESS && (e->flags & CT_SERVICE)) {
				reason = service_icmp_error(skb, &f);
				if (reason != DROP_NONE)
					return drop(&f, reason, FLOW_MATCH_NONE, 0);
			}
			report(&f, FLOW_EVENT_POLICY_VERDICT, DROP_NONE, FLOW_MATCH_RELATED,
			       e->rule_id);
			if (trace_wanted(f.dir, 1))
				trace(&f, FLOW_MATCH_RELATED);
			return TC_ACT_OK;
		}
	}

	if (f.tracked) {
		now = ct_now();
		switch (flow_ct_lookup(&f, now, &key, &e)) {
		case CT_REPLY:
			if (dir == EP_DIR_INGRESS && (e->flags & CT_SERVICE)) {
				reason = service_reverse(skb, &f);
				if (reason != DROP_NONE)
					return drop(&f, reason, FLOW_MATCH_NONE, 0);
			}
			gained = ct_account(e, f.proto, 1, f.tcp_flags, now);
			if (trace_wanted(f.dir, gained & TRACE_NEWS))
				trace_tracked(&f, e, FLOW_MATCH_REPLY);
			return pass(&f);
		case CT_ESTABLISHED:
			if (e->policy_rev != f.policy_rev) {
				/* The policy changed since this connection's verdict. */
				if (!flow_allowed(&f, &v))
					return drop(&f, v.reason, v.match, v.rule_id);
				e->policy_rev = f.policy_rev;
				e->rule_id = v.rule_id;
				e->peer_identity = f.peer_identity;
			}
			if (f.service)
				e->flags |= CT_SERVICE; /* the tuple was last used directly */
			gained = ct_account(e, f.proto, 0, f.tcp_flags, now);
			if (trace_wanted(f.dir, gained & TRACE_NEWS))
				trace_tracked(&f, e, FLOW_MATCH_ESTABLISHED);
			return pass(&f);
		default:
			break;
		}
	}

	if (!flow_allowed(&f, &v))
		return drop(&f, v.reason, v.match, v.rule_id);
	/* An echo reply that answers nothing is not a flow: tracked, its reversed tuple (our
	 * echo request with that id) would pass as a reply, past the egress policy. */
	if (f.tracked && !(is_icmp(f.proto) && icmp_echo_reply(f.proto, f.sport)))
		ct_create_in(f.family == 6 ? (void *)&ct6 : (void *)&ct, &key, f.proto,
			     f.tcp_flags, now, f.policy_rev, v.rule_id, f.peer_identity,
			     f.service ? CT_SERVICE : 0);
	report(&f, FLOW_EVENT_POLICY_VERDICT, DROP_NONE, v.match, v.rule_id);
	if (trace_wanted(f.dir, 1))
		trace(&f, FLOW_MATCH_NONE);
	return pass(&f);
}

/* The verdict, and the packet counted when it passes. */
static __always_inline int run(struct __sk_buff *skb, __u8 dir)
{
	int verdict = handle(skb, dir);

	if (verdict == TC_ACT_OK)
		count_forward(dir, skb->len);
	return verdict;
}

SEC("tc")
int from_container(struct __sk_buff *skb)
{
	return run(skb, EP_DIR_EGRESS);
}

SEC("tc")
int to_container(struct __sk_buff *skb)
{
	return run(skb, EP_DIR_INGRESS);
}

char LICENSE[] SEC("license") = "GPL";
