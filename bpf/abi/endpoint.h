/* Shared by C and Python: the endpoint datapath's maps and flow events.
 *
 * One set of node maps (pinned once per agent under its bpffs directory) serves every
 * endpoint program: ipcache, endpoint state, policy, conntrack, fragments, drop counters,
 * events. Each endpoint loads its own copy of endpoint.bpf.o with load-time constants
 * (ep_id, ep_ipv4, ep_ipv6) and reuses the pinned node maps.
 *
 * Directions are the pod's: INGRESS is traffic to the pod (the program on the node-side
 * veth's tc egress), EGRESS is traffic from the pod (tc ingress of the node-side veth).
 */
#ifndef MEMBRANE_ABI_ENDPOINT_H
#define MEMBRANE_ABI_ENDPOINT_H

#include <linux/in.h>
#include "abi/events.h"

enum ep_direction {
	EP_DIR_INGRESS = 0,
	EP_DIR_EGRESS = 1,
};
ABI_EXPORT_ENUM(ep_direction);

/* The layer-4 protocols the endpoint datapath reads ports (or the ICMP type) of, and
 * policies name. */
enum ip_proto {
	IP_PROTO_ICMP = IPPROTO_ICMP,
	IP_PROTO_TCP = IPPROTO_TCP,
	IP_PROTO_UDP = IPPROTO_UDP,
	IP_PROTO_SCTP = IPPROTO_SCTP,
	IP_PROTO_ICMPV6 = 58, /* IPPROTO_ICMPV6 is in linux/in6.h */
};
ABI_EXPORT_ENUM(ip_proto);

/* Reserved identities, numbered as Cilium numbers them. Endpoint identities start at
 * IDENTITY_FIRST_ENDPOINT, identities of policy CIDRs at IDENTITY_FIRST_CIDR. An
 * IPv4-only node gives the world IDENTITY_WORLD; a dual-stack one gives it
 * IDENTITY_WORLD_IPV4 and IDENTITY_WORLD_IPV6 (as Cilium does). */
enum reserved_identity {
	IDENTITY_ANY = 0, /* in policy keys only: any peer */
	IDENTITY_HOST = 1,
	IDENTITY_WORLD = 2,
	IDENTITY_UNMANAGED = 3,
	IDENTITY_HEALTH = 4,
	IDENTITY_INIT = 5,
	IDENTITY_REMOTE_NODE = 6,
	IDENTITY_KUBE_APISERVER = 7,
	IDENTITY_INGRESS = 8,
	IDENTITY_WORLD_IPV4 = 9, /* the world of a dual-stack node, per family */
	IDENTITY_WORLD_IPV6 = 10,
	IDENTITY_FIRST_ENDPOINT = 256,
	IDENTITY_FIRST_CIDR = 16777217, /* (1 << 24) + 1 */
};
ABI_EXPORT_ENUM(reserved_identity);

/* ipcache: prefix -> identity (LPM tries, one per family). 0.0.0.0/0 and ::/0 -> the
 * world identity of their family are always present; a miss also means world. */
struct ipcache_key {
	__u32 prefixlen; /* 0..32 */
	__u32 addr;      /* network byte order */
};

struct ipcache6_key {
	__u32 prefixlen; /* 0..128 */
	__u32 addr[4];   /* network byte order */
};

struct ipcache_value {
	__u32 identity;
	__u16 ep_id; /* endpoint on this node, or 0 */
	__u16 flags;
	/* A pod address inside prefixes that Kubernetes ipBlocks (or Cilium CIDR rules under
	 * --policy-cidr-match-mode=all) name: the identity of that address (labels cidr:...),
	 * whose policy entries apply beside those of `identity`; 0 when none. */
	__u32 addr_identity;
};

/* Per-endpoint dynamic state (hash, key __u32 ep_id). Replaced whole by one map update,
 * so the datapath never sees half of a change.
 *
 * Policy entries carry a generation (0 or 1); a packet must pass both gen[0] and gen[1]
 * (at least as strict as either). The agent changes policy in place in the live
 * generation (gen[0] == gen[1]), tightening key changes before loosening ones (see
 * membrane/datapath/policy.py); two different generations are what a switch of an older
 * agent ({old, new}) leaves, which the agent finishes. */
struct endpoint_state {
	__u32 identity;   /* the endpoint's own identity (for events) */
	__u32 policy_rev; /* bumped on every policy change; conntrack caches verdicts per rev */
	__u8 gen[2];      /* policy generations that must both allow */
	__u8 enforce[2];  /* per generation: bit (1 << dir) set = default deny in dir */
	__u16 flags;
	__u32 pad;
};

/* Policy (LPM trie). Data after prefixlen is matched as a bit string:
 *   ep_id, gen, dir, identity  always matched in full        (64 bits)
 *   pad, proto                 matched unless the entry is for all protocols (+16)
 *   dport (network order)      matched for the entry's port prefix (+0..16)
 * so prefixlen = 64 (every protocol and port), 80 (every port of proto), 80 + n (ports
 * whose top n bits equal dport's). A port range becomes a few prefix entries. The datapath
 * looks up the peer's identity and IDENTITY_ANY: a deny from either wins; else an allow
 * from either allows; else the direction's enforce bit decides. The compiler makes every
 * longest match correct by turning allows covered by a broader deny into denies. */
struct policy_key {
	__u32 prefixlen;
	__u16 ep_id;
	__u8 gen;
	__u8 dir;
	__u32 identity;
	__u8 pad;
	__u8 proto; /* IPPROTO_*, ICMP types go in dport */
	__u16 dport; /* network byte order; for ICMP: the type */
};

enum policy_key_bits {
	POLICY_KEY_FIXED_BITS = 64, /* ep_id, gen, dir, identity */
	POLICY_KEY_PROTO_BITS = 80, /* ... pad, proto */
	POLICY_KEY_FULL_BITS = 96,  /* ... dport */
};
ABI_EXPORT_ENUM(policy_key_bits);

struct policy_value {
	__u32 rule_id; /* the agent's rule table; 0 = none */
	__u8 deny;
	__u8 pad[3];
};

/* Conntrack (LRU hash). The key is the tuple of the packet that opened the connection, as
 * seen by the endpoint's program in direction dir. A reply is found by looking up the
 * reversed tuple with the other direction. ICMP echo carries the echo id as one port: an
 * echo request as dport (sport 0), an echo reply as sport (dport 0), so a reply reversed
 * is its request, and a request in the other direction is never mistaken for a reply.
 * Ports are host order. */
struct ct_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 dir;
	__u16 ep_id;
};

/* The same for IPv6 (map `ct6`, same values). */
struct ct6_key {
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 dir;
	__u16 ep_id;
};

enum ct_flags {
	CT_SEEN_REPLY = 1,
	CT_CLOSING = 2, /* FIN or RST seen */
	CT_SERVICE = 4, /* the endpoint program translated it to a service's backend: its
			 * replies are translated back (abi/service.h: svc_nat) */
};
ABI_EXPORT_ENUM(ct_flags);

struct ct_entry {
	__u64 expires_ns;  /* bpf_ktime_get_ns() after which the entry is dead */
	__u64 created_ns;
	__u32 policy_rev;  /* endpoint_state.policy_rev when the verdict was last checked */
	__u32 rule_id;     /* the rule that allowed it */
	__u32 peer_identity;
	__u8 tcp_flags_orig;  /* TCP flags seen in the original direction (OR) */
	__u8 tcp_flags_reply; /* and in the reply direction */
	__u8 flags;           /* enum ct_flags */
	__u8 pad;
	__u64 packets_orig;
	__u64 packets_reply;
};

/* Fragments: the first fragment's ports, for the later ones. Each endpoint program
 * has an LRU hash of its own per direction (frags_ingress, frags_egress; not node maps,
 * not pinned: records live microseconds, and the maps go with the programs), so traffic
 * of one endpoint or direction can never evict or overwrite another's records. */
struct frag_key {
	__u32 saddr;
	__u32 daddr;
	__u16 id;
	__u8 proto;
	__u8 pad;
};

/* IPv6 fragments (frags6_ingress, frags6_egress): the fragment header's 32-bit id. */
struct frag6_key {
	__u32 saddr[4];
	__u32 daddr[4];
	__u32 id;
	__u8 proto;
	__u8 pad[3];
};

struct frag_ports {
	__u16 sport;
	__u16 dport;
};

/* Drop reasons: Hubble's names and numbers where Hubble has them. */
enum drop_reason {
	DROP_NONE = 0,
	DROP_INVALID_SOURCE_IP = 132,
	DROP_POLICY_DENIED = 133, /* no rule allows it (default deny) */
	DROP_INVALID_PACKET = 134,
	DROP_CT_TRUNCATED_OR_INVALID_HEADER = 135,
	DROP_UNSUPPORTED_L3_PROTOCOL = 139,
	DROP_FRAG_NOT_FOUND = 155, /* a later fragment whose first one we did not see */
	DROP_SERVICE_BACKEND_NOT_FOUND = 158, /* to a service frontend without a backend */
	DROP_NO_ENDPOINT_STATE = 160,
	DROP_POLICY_DENY = 181, /* a deny rule matched */
};
ABI_EXPORT_ENUM(drop_reason);

/* Drop counters (per-CPU hash). */
struct drop_key {
	__u16 ep_id;
	__u8 dir;
	__u8 pad;
	__u32 reason;
};

struct drop_value {
	__u64 packets;
	__u64 bytes;
};

enum flow_event_type {
	FLOW_EVENT_POLICY_VERDICT = 1, /* a new connection's first packet, or a related ICMP
					* error (match FLOW_MATCH_RELATED), allowed */
	FLOW_EVENT_DROP = 2,
	FLOW_EVENT_TRACE = 3, /* a packet that passes, sampled per connection (trace_mode);
			       * match says what conntrack found: FLOW_MATCH_NONE (a new
			       * connection or an untracked packet), ESTABLISHED, REPLY or
			       * RELATED; rule_id 0 */
};
ABI_EXPORT_ENUM(flow_event_type);

enum flow_match {
	FLOW_MATCH_NONE = 0,    /* no policy in this direction: allowed by default */
	FLOW_MATCH_RULE = 1,    /* a policy entry decided (rule_id says which) */
	FLOW_MATCH_DEFAULT = 2, /* default deny: the endpoint is selected, no rule allows */
	FLOW_MATCH_REPLY = 3,   /* reply of a tracked connection */
	FLOW_MATCH_ESTABLISHED = 4,
	FLOW_MATCH_RELATED = 5, /* ICMP error about a tracked connection: passes as a reply */
};
ABI_EXPORT_ENUM(flow_match);

/* Which forwarded packets are traced (FLOW_EVENT_TRACE), node-wide and at run time: the
 * one entry of the `monitor_config` array. Zero (a map nobody configured) traces nothing.
 * The agent's --monitor-aggregation names (Cilium's) map onto these. */
enum trace_mode {
	TRACE_MODE_OFF = 0,         /* maximum: no trace events */
	TRACE_MODE_CONNECTIONS = 1, /* medium: a connection's first packet and first reply, a
				     * packet that adds SYN, FIN or RST to what its direction
				     * has seen (so FIN/RST at close), untracked packets */
	TRACE_MODE_TO_ENDPOINT = 2, /* low, lowest: every packet to the pod */
	TRACE_MODE_ALL = 3,         /* none: every packet, both ways */
};
ABI_EXPORT_ENUM(trace_mode);

struct monitor_config {
	__u32 trace_mode; /* enum trace_mode */
	__u32 pad;
};

/* Forwarded packets (per-CPU array, index enum ep_direction): everything the endpoint
 * programs let pass, node-wide, for cilium_forward_count_total / _bytes_total. */
struct forward_value {
	__u64 packets;
	__u64 bytes; /* skb->len */
};

/* Addresses are 16 bytes whatever the family: an IPv4 address is the first 4. */
struct flow_event {
	struct event_header h; /* type: enum flow_event_type */
	__u32 saddr[4];        /* network byte order */
	__u32 daddr[4];
	__u16 sport;           /* host order; ICMP: type in sport, code in dport */
	__u16 dport;
	__u8 proto;
	__u8 dir;              /* enum ep_direction */
	__u8 tcp_flags;
	__u8 match;            /* enum flow_match */
	__u16 ep_id;
	__u16 drop_reason;     /* enum drop_reason; 0 when forwarded */
	__u32 peer_identity;
	__u32 rule_id;
	__u32 policy_rev;
	__u32 len;             /* skb->len */
	__u8 family;           /* 4 or 6 */
	__u8 pad[3];
};

#endif
