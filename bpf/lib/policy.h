/* Policy verdicts of the endpoint programs.
 *
 *   struct endpoint_state *st = endpoint_state_of(ep_id);      NULL: fail closed
 *   struct policy_verdict v;
 *   if (!policy_allows(st, ep_id, dir, peer_identity, addr_identity, proto, port, &v))
 *           drop with v.reason, v.match, v.rule_id
 *
 * `addr_identity` (0: none) is the peer address's own identity (ipcache.h): its entries
 * count as the peer's, so a deny for either identity wins and an allow for either allows.
 *
 * Maps: `endpoints` (__u32 ep_id -> endpoint_state) and `policy` (LPM trie, policy_key ->
 * policy_value); both layouts and the generation protocol are in abi/endpoint.h.
 * `port` is host order: the destination port, or the ICMP type with proto IPPROTO_ICMP.
 * A packet must pass every live generation (gen[0], and gen[1] when it differs), so while
 * the agent switches policies only traffic that both the old and the new policy allow
 * passes.
 */
#ifndef MEMBRANE_LIB_POLICY_H
#define MEMBRANE_LIB_POLICY_H

#include "abi/endpoint.h"

#define ENDPOINTS_MAX_ENTRIES 16384
#define POLICY_MAX_ENTRIES (1 << 20)

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ENDPOINTS_MAX_ENTRIES);
	__type(key, __u32);
	__type(value, struct endpoint_state);
} endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, POLICY_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
} policy SEC(".maps");

struct policy_verdict {
	__u32 rule_id; /* the deciding entry's rule, 0 when no entry decided */
	__u16 reason;  /* DROP_NONE when allowed, else DROP_POLICY_DENY / DROP_POLICY_DENIED */
	__u8 match;    /* enum flow_match: NONE, RULE or DEFAULT */
	__u8 pad;
};

static __always_inline struct endpoint_state *endpoint_state_of(__u32 id)
{
	return bpf_map_lookup_elem(&endpoints, &id);
}

/* One generation: a deny for the peer (either of its identities) or for any peer wins,
 * else an allow for any of them, else the direction's default. Returns 1 when allowed. */
static __always_inline int policy_allows_gen(__u16 ep, __u8 gen, __u8 enforce, __u8 dir,
					     __u32 peer, __u32 peer_addr, __u8 proto, __u16 port,
					     struct policy_verdict *v)
{
	struct policy_key key = {
		.prefixlen = POLICY_KEY_FULL_BITS,
		.ep_id = ep,
		.gen = gen,
		.dir = dir,
		.identity = peer,
		.proto = proto,
		.dport = bpf_htons(port),
	};
	struct policy_value *by_peer, *by_addr = NULL, *by_any, *hit;

	by_peer = bpf_map_lookup_elem(&policy, &key);
	if (peer_addr) {
		key.identity = peer_addr;
		by_addr = bpf_map_lookup_elem(&policy, &key);
	}
	key.identity = IDENTITY_ANY;
	by_any = bpf_map_lookup_elem(&policy, &key);

	if (by_peer && by_peer->deny)
		hit = by_peer;
	else if (by_addr && by_addr->deny)
		hit = by_addr;
	else if (by_any && by_any->deny)
		hit = by_any;
	else
		hit = by_peer ? by_peer : by_addr ? by_addr : by_any;
	if (hit) {
		v->rule_id = hit->rule_id;
		v->match = FLOW_MATCH_RULE;
		v->reason = hit->deny ? DROP_POLICY_DENY : DROP_NONE;
		return !hit->deny;
	}
	v->rule_id = 0;
	if (enforce & (1 << dir)) {
		v->match = FLOW_MATCH_DEFAULT;
		v->reason = DROP_POLICY_DENIED;
		return 0;
	}
	v->match = FLOW_MATCH_NONE;
	v->reason = DROP_NONE;
	return 1;
}

/* Every live generation must allow. On a deny `v` is the denying generation's verdict;
 * when allowed it is the newer generation's (gen[1]). */
static __always_inline int policy_allows(const struct endpoint_state *st, __u16 ep, __u8 dir,
					 __u32 peer, __u32 peer_addr, __u8 proto, __u16 port,
					 struct policy_verdict *v)
{
	__u8 g0 = st->gen[0] & 1, g1 = st->gen[1] & 1;

	if (!policy_allows_gen(ep, g0, st->enforce[g0], dir, peer, peer_addr, proto, port, v))
		return 0;
	if (g1 == g0)
		return 1;
	return policy_allows_gen(ep, g1, st->enforce[g1], dir, peer, peer_addr, proto, port, v);
}

#endif
