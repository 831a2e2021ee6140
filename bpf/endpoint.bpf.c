// SPDX-License-Identifier: GPL-2.0
/* The endpoint (pod) datapath: anti-spoofing, conntrack and identity-based policy.
 *
 * Each endpoint loads its own copy of this object with the load-time constants ep_id and
 * ep_ipv4, reusing the node maps pinned by the agent (abi/endpoint.h). Two programs, named
 * by the pod's point of view:
 *   from_container  tc/tcx ingress of the node-side veth: the pod's EGRESS
 *   to_container    tc/tcx egress of the node-side veth:  the pod's INGRESS
 *
 * Per packet: parse; ARP passes (from the pod only with the pod's own sender address);
 * anything but untagged IPv4 is dropped (pods are IPv4-only and their veth carries no VLAN
 * tags); from the pod the source must be ep_ipv4; then conntrack:
 * an established connection passes without a policy lookup unless the endpoint's
 * policy_rev moved on since its verdict (then it is checked again and dropped if the new
 * policy denies it); a reply passes; a new connection needs an allow verdict and is then
 * tracked. Every drop is counted in `drops` and reported as FLOW_EVENT_DROP; every new
 * allowed flow is reported once as FLOW_EVENT_POLICY_VERDICT.
 *
 * L4 keys:
 *   TCP, UDP, SCTP   ports. A TCP header must be complete (20 bytes), also in a first
 *                    fragment, so a tiny first fragment cannot hide the flags.
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
 * IPv4 fragments: a first fragment that passed records its L4 key under (saddr, daddr, id,
 * proto) in this endpoint's map for its direction (frags_ingress, frags_egress); a later
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
#include "lib/parse.h"
#include "lib/ipcache.h"
#include "lib/policy.h"
#include "lib/conntrack.h"

const volatile __u16 ep_id = 0;
const volatile __be32 ep_ipv4 = 0;

/* Ethernet + IPv4 with options + TCP header. */
#define PULL_BYTES 96
/* Per endpoint and direction: datagrams whose first fragment passed and whose later ones
 * may still come. Legitimate traffic needs few at a time (a record is used within
 * microseconds of its writing); ~45 KiB of kernel memory per map, two per endpoint. */
#define FRAGS_MAX_ENTRIES 512
#define DROPS_MAX_ENTRIES 16384

#define ICMP_ECHOREPLY_ 0
#define ICMP_DEST_UNREACH_ 3
#define ICMP_ECHO_ 8
#define ICMP_TIME_EXCEEDED_ 11
#define ICMP_PARAMETERPROB_ 12

struct frags_map {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FRAGS_MAX_ENTRIES);
	__type(key, struct frag_key);
	__type(value, struct frag_ports);
};
struct frags_map frags_ingress SEC(".maps");
struct frags_map frags_egress SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, DROPS_MAX_ENTRIES);
	__type(key, struct drop_key);
	__type(value, struct drop_value);
} drops SEC(".maps");

EVENTS_RINGBUF();
ABI_EXPORT(flow_event);

/* What the program knows about the packet so far. */
struct flow {
	__u32 saddr; /* network order */
	__u32 daddr;
	__u32 len;
	__u32 peer_identity;
	__u32 policy_rev;
	__u16 sport; /* as reported: ports, or ICMP type and code */
	__u16 dport;
	__u16 ct_sport;
	__u16 ct_dport;
	__u16 policy_port;
	__u8 proto;
	__u8 dir;
	__u8 tcp_flags;
	__u8 tracked;     /* conntrack applies */
	__u8 has_addrs;   /* saddr/daddr are set */
	__u8 peer_known;  /* peer_identity is set */
	__u8 first_fragment; /* record frag_l4 under ip_id once the packet passes */
	__u16 ip_id;
	__u16 l4_off;     /* from the start of the frame */
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

static __always_inline __u32 peer_identity(struct flow *f)
{
	if (!f->peer_known) {
		f->peer_identity = ipcache_identity(f->dir == EP_DIR_EGRESS ? f->daddr : f->saddr);
		f->peer_known = 1;
	}
	return f->peer_identity;
}

static __always_inline void report(struct flow *f, __u16 type, __u16 reason, __u8 match,
				   __u32 rule_id)
{
	struct flow_event ev = {};

	fill_event_header(&ev.h, type);
	ev.saddr = f->saddr;
	ev.daddr = f->daddr;
	ev.sport = f->sport;
	ev.dport = f->dport;
	ev.proto = f->proto;
	ev.dir = f->dir;
	ev.tcp_flags = f->tcp_flags;
	ev.match = match;
	ev.ep_id = ep_id;
	ev.drop_reason = reason;
	ev.peer_identity = f->has_addrs ? peer_identity(f) : 0;
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
	return policy_allows(st, ep_id, f->dir, peer_identity(f), f->proto, f->policy_port, v);
}

static __always_inline void flow_set_ports(struct flow *f, __u16 sport, __u16 dport)
{
	f->sport = f->ct_sport = sport;
	f->dport = f->ct_dport = f->policy_port = dport;
	f->tracked = 1;
}

static __always_inline void flow_set_icmp(struct flow *f, __u8 type, __u8 code, __u16 id)
{
	f->sport = type;
	f->dport = code;
	f->policy_port = type;
	f->tracked = type == ICMP_ECHO_ || type == ICMP_ECHOREPLY_;
	f->ct_sport = type == ICMP_ECHOREPLY_ ? id : 0;
	f->ct_dport = type == ICMP_ECHO_ ? id : 0;
}

/* A first fragment's L4 key as `frags` keeps it: ports, or for ICMP (type << 8 | code)
 * and the echo id. */
static __always_inline void flow_set_recorded(struct flow *f, const struct frag_ports *fp)
{
	if (f->proto == IPPROTO_ICMP)
		flow_set_icmp(f, fp->sport >> 8, fp->sport & 0xff, fp->dport);
	else
		flow_set_ports(f, fp->sport, fp->dport);
}

static __always_inline void *frags_of(__u8 dir)
{
	return dir == EP_DIR_EGRESS ? (void *)&frags_egress : (void *)&frags_ingress;
}

static __always_inline void frag_key_of(const struct flow *f, struct frag_key *fk)
{
	fk->saddr = f->saddr;
	fk->daddr = f->daddr;
	fk->id = f->ip_id;
	fk->proto = f->proto;
}

/* The packet passes. A first fragment records its L4 key now, after the verdict, so that
 * a denied one neither creates nor overwrites a record. */
static __always_inline int pass(const struct flow *f, __u8 dir)
{
	struct frag_key fk = {};

	if (f->first_fragment) {
		frag_key_of(f, &fk);
		bpf_map_update_elem(frags_of(dir), &fk, &f->frag_l4, BPF_ANY);
	}
	return TC_ACT_OK;
}

/* Fill the L4 part of `f` from the headers (or, for a later fragment, from its first
 * fragment). Returns a drop reason, DROP_NONE when the packet can be judged. */
static __always_inline __u32 load_l4(void *data, void *data_end, const struct pkt *p,
				     struct flow *f)
{
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct frag_key fk = {};
	struct frag_ports fp = {};
	struct frag_ports *recorded;
	__u8 *l4;

	if ((void *)(ip + 1) > data_end)
		return DROP_INVALID_PACKET;
	l4 = (void *)ip + ip->ihl * 4;
	f->l4_off = sizeof(struct ethhdr) + ip->ihl * 4;
	f->ip_id = ip->id;

	if (p->fragment == PKT_LATER_FRAGMENT) {
		if (!proto_has_ports(f->proto) && f->proto != IPPROTO_ICMP) {
			flow_set_ports(f, 0, 0);
			return DROP_NONE;
		}
		frag_key_of(f, &fk);
		recorded = bpf_map_lookup_elem(frags_of(f->dir), &fk);
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

static __always_inline int icmp_is_error(__u16 type)
{
	return type == ICMP_DEST_UNREACH_ || type == ICMP_TIME_EXCEEDED_ ||
	       type == ICMP_PARAMETERPROB_;
}

/* Whether the ICMP error in `f` (a whole datagram) speaks of a connection conntrack
 * tracks for this endpoint; if so, *entry is that connection's. The error quotes the
 * packet it answers (IP header, then at least 8 bytes of L4), which went the other way:
 * looked up as a packet of direction !dir, it is either the connection's original
 * direction or its reply. Read with bpf_skb_load_bytes: the quote may lie beyond the
 * linear part, and the packet pointers stay valid. */
static __always_inline int icmp_error_related(struct __sk_buff *skb, const struct flow *f,
					      __u64 now, struct ct_entry **entry)
{
	struct ct_key key = { .ep_id = ep_id, .dir = !f->dir };
	__u32 off = f->l4_off + 8; /* the ICMP header */
	struct iphdr quoted;
	__u8 l4[8];

	if (bpf_skb_load_bytes(skb, off, &quoted, sizeof(quoted)) < 0)
		return 0;
	/* Errors are only sent about offset-0 fragments, and back to the quoted sender. */
	if (quoted.version != 4 || quoted.ihl < 5 || quoted.frag_off & bpf_htons(0x1fff) ||
	    quoted.saddr != f->daddr)
		return 0;
	if (bpf_skb_load_bytes(skb, off + quoted.ihl * 4, l4, sizeof(l4)) < 0)
		return 0;
	key.saddr = quoted.saddr;
	key.daddr = quoted.daddr;
	key.proto = quoted.protocol;
	switch (quoted.protocol) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		key.sport = (__u16)l4[0] << 8 | l4[1];
		key.dport = (__u16)l4[2] << 8 | l4[3];
		break;
	case IPPROTO_ICMP: /* echo ids as flow_set_icmp tracks them; no errors about errors */
		if (l4[0] == ICMP_ECHO_)
			key.dport = (__u16)l4[4] << 8 | l4[5];
		else if (l4[0] == ICMP_ECHOREPLY_)
			key.sport = (__u16)l4[4] << 8 | l4[5];
		else
			return 0;
		break;
	default: /* tracked with ports 0 */
		break;
	}
	return ct_lookup(&key, now, 0, entry) != CT_NEW;
}

/* ARP from the pod must speak for the pod's own address; ARP to the pod passes. */
static __always_inline int handle_arp(void *data, void *data_end, struct flow *f)
{
	struct arp_ipv4 *arp = data + sizeof(struct ethhdr);

	if (f->dir == EP_DIR_INGRESS)
		return TC_ACT_OK;
	if ((void *)(arp + 1) > data_end || arp->pro != bpf_htons(ETH_P_IP) || arp->pln != 4)
		return drop(f, DROP_INVALID_PACKET, FLOW_MATCH_NONE, 0);
	__builtin_memcpy(&f->saddr, arp->spa, 4);
	__builtin_memcpy(&f->daddr, arp->tpa, 4);
	f->has_addrs = 1;
	if (f->saddr != ep_ipv4)
		return drop(f, DROP_INVALID_SOURCE_IP, FLOW_MATCH_NONE, 0);
	return TC_ACT_OK;
}

static __always_inline int handle(struct __sk_buff *skb, __u8 dir)
{
	struct flow f = { .dir = dir, .len = skb->len };
	struct policy_verdict v = {};
	struct endpoint_state *st;
	struct ct_entry *e = NULL;
	struct ct_key key = {};
	void *data, *data_end;
	struct ethhdr *eth;
	struct pkt p = {};
	__u32 reason;
	__u64 now = 0;

	if (skb->data_end - skb->data < PULL_BYTES && skb->len > skb->data_end - skb->data)
		bpf_skb_pull_data(skb, skb->len < PULL_BYTES ? skb->len : PULL_BYTES);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;

	if ((void *)(eth + 1) > data_end)
		return drop(&f, DROP_INVALID_PACKET, FLOW_MATCH_NONE, 0);
	if (eth->h_proto == bpf_htons(ETH_P_ARP))
		return handle_arp(data, data_end, &f);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return drop(&f, DROP_UNSUPPORTED_L3_PROTOCOL, FLOW_MATCH_NONE, 0);
	if (parse_ipv4(eth + 1, data_end, &p) == PARSE_TRUNCATED)
		return drop(&f, DROP_INVALID_PACKET, FLOW_MATCH_NONE, 0);

	__builtin_memcpy(&f.saddr, p.src, 4);
	__builtin_memcpy(&f.daddr, p.dst, 4);
	f.has_addrs = 1;
	f.proto = p.protocol;
	if (dir == EP_DIR_EGRESS && f.saddr != ep_ipv4)
		return drop(&f, DROP_INVALID_SOURCE_IP, FLOW_MATCH_NONE, 0);
	reason = load_l4(data, data_end, &p, &f);
	if (reason != DROP_NONE)
		return drop(&f, reason, FLOW_MATCH_NONE, 0);

	st = endpoint_state_of(ep_id);
	if (!st)
		return drop(&f, DROP_NO_ENDPOINT_STATE, FLOW_MATCH_NONE, 0);
	f.policy_rev = st->policy_rev;

	if (f.proto == IPPROTO_ICMP && p.fragment == PKT_NOT_FRAGMENT && icmp_is_error(f.sport)) {
		now = ct_now();
		if (icmp_error_related(skb, &f, now, &e)) {
			report(&f, FLOW_EVENT_POLICY_VERDICT, DROP_NONE, FLOW_MATCH_RELATED,
			       e->rule_id);
			return TC_ACT_OK;
		}
	}

	if (f.tracked) {
		key.saddr = f.saddr;
		key.daddr = f.daddr;
		key.sport = f.ct_sport;
		key.dport = f.ct_dport;
		key.proto = f.proto;
		key.dir = dir;
		key.ep_id = ep_id;
		now = ct_now();
		switch (ct_lookup(&key, now, f.tcp_flags, &e)) {
		case CT_REPLY:
			ct_account(e, &key, 1, f.tcp_flags, now);
			return pass(&f, dir);
		case CT_ESTABLISHED:
			if (e->policy_rev != f.policy_rev) {
				/* The policy changed since this connection's verdict. */
				if (!flow_allowed(&f, &v))
					return drop(&f, v.reason, v.match, v.rule_id);
				e->policy_rev = f.policy_rev;
				e->rule_id = v.rule_id;
				e->peer_identity = f.peer_identity;
			}
			ct_account(e, &key, 0, f.tcp_flags, now);
			return pass(&f, dir);
		default:
			break;
		}
	}

	if (!flow_allowed(&f, &v))
		return drop(&f, v.reason, v.match, v.rule_id);
	/* An echo reply that answers nothing is not a flow: tracked, its reversed tuple (our
	 * echo request with that id) would pass as a reply, past the egress policy. */
	if (f.tracked && !(f.proto == IPPROTO_ICMP && f.sport == ICMP_ECHOREPLY_))
		ct_create(&key, f.tcp_flags, now, f.policy_rev, v.rule_id, f.peer_identity);
	report(&f, FLOW_EVENT_POLICY_VERDICT, DROP_NONE, v.match, v.rule_id);
	return pass(&f, dir);
}

SEC("tc")
int from_container(struct __sk_buff *skb)
{
	return handle(skb, EP_DIR_EGRESS);
}

SEC("tc")
int to_container(struct __sk_buff *skb)
{
	return handle(skb, EP_DIR_INGRESS);
}

char LICENSE[] SEC("license") = "GPL";
