/* Connection tracking of the endpoint programs (map `ct`, layouts in abi/endpoint.h).
 *
 *   __u64 now = ct_now();
 *   struct ct_entry *e;
 *   switch (ct_lookup(&key, now, tcp_flags, &e)) {
 *   case CT_ESTABLISHED: ...; gained = ct_account(e, proto, 0, tcp_flags, now); break;
 *   case CT_REPLY:       gained = ct_account(e, proto, 1, tcp_flags, now); break;
 *   case CT_NEW:         if allowed: ct_create_in(&ct, &key, proto, tcp_flags, now, rev,
 *                                                 rule, peer, flags);
 *   }
 *
 * IPv6: ct6_lookup, and ct_create_in on map `ct6` with a struct ct6_key; ct_account
 * serves both.
 *
 * `key` is the packet's own tuple (ports host order) with the program's direction and
 * endpoint. A hit on it is the original direction; a hit on the reversed tuple with the
 * other direction is a reply. Expired entries count as misses. A TCP SYN without ACK is
 * never a reply, and on a closing entry it is a new connection reusing the tuple: both
 * need a verdict of their own.
 *
 * An ICMP error relates to a connection when ct_lookup (tcp_flags 0) of the packet it
 * quotes, as a packet of the other direction, finds it either way (endpoint.bpf.c).
 *
 * Cost: lookups only on the hot path; an entry is inserted only after a miss (an insert
 * on every packet cost 188 ns). Established packets bump a counter in place and write
 * expires_ns at most once per CT_REFRESH_NS, or when the state (and so the timeout)
 * changes. Timeouts are load-time constants in seconds.
 */
#ifndef MEMBRANE_LIB_CONNTRACK_H
#define MEMBRANE_LIB_CONNTRACK_H

#include "abi/endpoint.h"

#define CT_MAX_ENTRIES 262144
#define CT_REFRESH_NS 1000000000ULL
#define NSEC_PER_SEC 1000000000ULL

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

const volatile __u32 ct_timeout_tcp_established_s = 21600;
const volatile __u32 ct_timeout_tcp_syn_s = 60;
const volatile __u32 ct_timeout_tcp_closing_s = 10;
const volatile __u32 ct_timeout_other_s = 60;

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CT_MAX_ENTRIES);
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
} ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CT_MAX_ENTRIES);
	__type(key, struct ct6_key);
	__type(value, struct ct_entry);
} ct6 SEC(".maps");

enum ct_result {
	CT_NEW = 0,
	CT_ESTABLISHED = 1,
	CT_REPLY = 2,
};

/* Conntrack's clock: CLOCK_MONOTONIC at tick resolution. Plenty for timeouts in
 * seconds, and ~20 ns a packet cheaper than bpf_ktime_get_ns() on our VMs. */
static __always_inline __u64 ct_now(void)
{
	return bpf_ktime_get_coarse_ns();
}

static __always_inline __u64 ct_timeout_ns(__u8 proto, __u8 flags)
{
	if (proto != IPPROTO_TCP)
		return ct_timeout_other_s * NSEC_PER_SEC;
	if (flags & CT_CLOSING)
		return ct_timeout_tcp_closing_s * NSEC_PER_SEC;
	if (!(flags & CT_SEEN_REPLY))
		return ct_timeout_tcp_syn_s * NSEC_PER_SEC;
	return ct_timeout_tcp_established_s * NSEC_PER_SEC;
}

static __always_inline __u8 ct_flags_after(__u8 flags, __u8 tcp_flags)
{
	return tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) ? flags | CT_CLOSING : flags;
}

static __always_inline int ct_live(const struct ct_entry *e, __u64 now)
{
	return e && now <= e->expires_ns;
}

/* The lookup of either family: `key` the packet's tuple, `reverse` the reply's. */
static __always_inline enum ct_result ct_lookup_in(void *map, const void *key,
						   const void *reverse, __u64 now,
						   __u8 tcp_flags, struct ct_entry **entry)
{
	int syn_only = (tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
	struct ct_entry *e = bpf_map_lookup_elem(map, key);

	if (ct_live(e, now) && !(syn_only && (e->flags & CT_CLOSING))) {
		*entry = e;
		return CT_ESTABLISHED;
	}
	/* A SYN opens a connection; it never answers one. */
	if (syn_only)
		return CT_NEW;
	e = bpf_map_lookup_elem(map, reverse);
	if (ct_live(e, now)) {
		*entry = e;
		return CT_REPLY;
	}
	return CT_NEW;
}

static __always_inline enum ct_result ct_lookup(const struct ct_key *key, __u64 now,
						__u8 tcp_flags, struct ct_entry **entry)
{
	struct ct_key reverse = {
		.saddr = key->daddr,
		.daddr = key->saddr,
		.sport = key->dport,
		.dport = key->sport,
		.proto = key->proto,
		.dir = !key->dir,
		.ep_id = key->ep_id,
	};

	return ct_lookup_in(&ct, key, &reverse, now, tcp_flags, entry);
}

static __always_inline enum ct_result ct6_lookup(const struct ct6_key *key, __u64 now,
						 __u8 tcp_flags, struct ct_entry **entry)
{
	struct ct6_key reverse = {
		.sport = key->dport,
		.dport = key->sport,
		.proto = key->proto,
		.dir = !key->dir,
		.ep_id = key->ep_id,
	};

	__builtin_memcpy(reverse.saddr, key->daddr, 16);
	__builtin_memcpy(reverse.daddr, key->saddr, 16);
	return ct_lookup_in(&ct6, key, &reverse, now, tcp_flags, entry);
}

/* ct_account's news beside the TCP flags (bits 0-7): the connection's first reply. */
#define CT_NEWS_FIRST_REPLY 0x100

/* Count a packet of a tracked connection of protocol `proto`. Returns what is new about
 * it (0 for most packets): the TCP flags it is the first of its direction to carry, and
 * CT_NEWS_FIRST_REPLY; what the trace events' per-connection aggregation reports. */
static __always_inline __u32 ct_account(struct ct_entry *e, __u8 proto, int reply,
					__u8 tcp_flags, __u64 now)
{
	__u8 flags = ct_flags_after(e->flags, tcp_flags);
	__u32 gained;
	__u8 seen;
	__u64 expires;

	if (reply) {
		e->packets_reply += 1;
		flags |= CT_SEEN_REPLY;
		seen = e->tcp_flags_reply;
		gained = tcp_flags & (__u8)~seen;
		if (gained)
			e->tcp_flags_reply = seen | tcp_flags;
		if (!(e->flags & CT_SEEN_REPLY))
			gained |= CT_NEWS_FIRST_REPLY;
	} else {
		e->packets_orig += 1;
		seen = e->tcp_flags_orig;
		gained = tcp_flags & (__u8)~seen;
		if (gained)
			e->tcp_flags_orig = seen | tcp_flags;
	}
	expires = now + ct_timeout_ns(proto, flags);
	if (flags != e->flags) {
		/* A new state has its own timeout, which may be shorter. */
		e->flags = flags;
		e->expires_ns = expires;
	} else if (expires > e->expires_ns + CT_REFRESH_NS) {
		e->expires_ns = expires;
	}
	return gained;
}

static __always_inline void ct_create_in(void *map, const void *key, __u8 proto,
					 __u8 tcp_flags, __u64 now, __u32 policy_rev,
					 __u32 rule_id, __u32 peer_identity, __u8 flags)
{
	struct ct_entry e = {
		.created_ns = now,
		.policy_rev = policy_rev,
		.rule_id = rule_id,
		.peer_identity = peer_identity,
		.tcp_flags_orig = tcp_flags,
		.flags = ct_flags_after(flags, tcp_flags),
		.packets_orig = 1,
	};

	e.expires_ns = now + ct_timeout_ns(proto, e.flags);
	/* BPF_ANY: we just missed (or found an expired entry, which this replaces). A full
	 * LRU evicts; a failed insert only means the reply will need a verdict of its own. */
	bpf_map_update_elem(map, key, &e, BPF_ANY);
}

#endif
