/* Shared by C and Python: maps and events of `membrane filter`.
 *
 * Maps of filter_xdp.bpf.o (XDP; drop-dst, drop-src, drop-proto, rate-limit, syn-guard),
 * per device:
 *   drop_dst_v4                hash: lpm_v4_key -> __u32 rule id; the IPv4 deny list as
 *                              written (control plane only: the program reads the tables)
 *   drop_dst_tbl24             array[2^20] of dir24_block: 2^24 entries, one per /24
 *   drop_dst_groups            array[DIR24_GROUPS] of dir24_group (tbl8): 256 entries, one
 *                              per address of a /24 that holds prefixes longer than /24
 *   drop_dst_top               array[1] of dir24_top: 256 entries, one per /8, for the
 *                              prefixes of /8 or shorter
 *   drop_dst_v6                LPM trie: lpm_v6_key -> __u32 rule id
 *   drop_src_*                 the same five maps for source prefixes (drop-src): one
 *                              implementation parameterised by the address it looks up
 *   drop_proto                 array[256] indexed by IP protocol -> __u32 rule id (0 = none)
 *   guard_config               array[FILTER_GUARD_MAX] of guard_config: the rate-limit and
 *                              syn-guard settings, read per packet (changed live)
 *   rate_buckets               LRU hash: guard_bucket_key (source address or prefix) ->
 *                              token_bucket; size set at attach (bounded under spoofing)
 *   syn_buckets                LRU hash: guard_bucket_key (destination address and port)
 *                              -> token_bucket, TCP SYNs without ACK only
 * Maps of filter_tc.bpf.o (tc; allow-only), per device and direction:
 *   allow_guard                guard_key (protocol, port) -> __u32 rule id
 *   allow_flows                flow_key -> __u32 rule id
 * Both objects:
 *   rule_stats   per-CPU array [rule id] -> counter (packets and bytes the rule matched)
 *   filter_stats per-CPU array [enum filter_stat] -> counter
 *   filter_meta  array[1] of filter_meta: what the manager attached (not read by the program)
 *   events, events_lost        shared ring buffer of filter_event (see lib/events.h)
 * Rule ids start at 1; 0 means "no rule". Ports are in host byte order; addresses in
 * network byte order; IPv4 addresses fill the first 4 bytes of the 16-byte fields.
 */
#ifndef MEMBRANE_ABI_FILTER_H
#define MEMBRANE_ABI_FILTER_H

#include "abi/events.h"

#define FILTER_MAX_RULES 65536

enum filter_stat {
	FILTER_STAT_SEEN = 0,     /* not counted in the kernel: seen = passed + dropped */
	FILTER_STAT_PASSED = 1,
	FILTER_STAT_DROPPED = 2,
	FILTER_STAT_UNPARSED = 3, /* passed because headers were truncated or too deep */
	FILTER_STAT_MAX = 4,
};
ABI_EXPORT_ENUM(filter_stat);

enum filter_event_type {
	FILTER_EVENT_DROP = 1,
};
ABI_EXPORT_ENUM(filter_event_type);

enum filter_hook {
	FILTER_HOOK_XDP = 1,
	FILTER_HOOK_TC_INGRESS = 2,
	FILTER_HOOK_TC_EGRESS = 3,
};
ABI_EXPORT_ENUM(filter_hook);

/* filter_meta.xdp_mode: how the XDP program was attached. */
enum filter_xdp_mode {
	FILTER_XDP_MODE_NATIVE = 1,
	FILTER_XDP_MODE_GENERIC = 2,
};
ABI_EXPORT_ENUM(filter_xdp_mode);

struct filter_counter {
	__u64 packets;
	__u64 bytes;
};

struct lpm_v4_key {
	__u32 prefixlen;
	__u8 addr[4];
};

/* IPv4 drop-dst as DIR-24-8 (DPDK's rte_lpm scheme) for prefixes of /9 and longer, and a
 * table of 256 entries (one per /8) for those of /8 and shorter. An address is answered by
 * one read of tbl24 (indexed by its top 24 bits) or, when that entry points to a group, one
 * more read of the group's entry for its last byte, and a third of the group's `covering`
 * when that entry is 0; when the answer is still 0 (no prefix of /9 or longer holds it),
 * by one read of the top table's entry for its top 8 bits. An entry (__u32):
 *   0                          tbl24: no prefix of /9 or longer holds the address; group:
 *                              no prefix longer than /24 does, the group's `covering`
 *                              answers; top: no prefix of /8 or shorter holds the /8
 *   rule | length << 16        the longest prefix holding it: its rule id and length
 *   1 << 31 | group            (tbl24 only) look in group `group`
 * A group's entries name only prefixes longer than /24; the answer of the /24 itself (its
 * longest prefix of /9 to /24) is stored once, in `covering`. tbl24 and groups name no
 * prefix of /8 or shorter; the top table names only those. So a change writes at most:
 * 256 group entries (longer than /24); 2^(24 - length) tbl24 entries plus one `covering`
 * word per group among them (/9 to /24: a /9 is 32,768 + at most 8,192 stores); 2^(8 -
 * length) top entries (/8 and shorter: 256 for 0.0.0.0/0).
 * Entries carry the prefix length so that the control plane can add and remove prefixes
 * by reading the tables alone. The maps are BPF_F_MMAPABLE: the control plane writes
 * entries with aligned 4-byte stores, so a lookup sees each entry whole, old or new; a
 * change writes one table only, so an address's answer goes from the old to the new.
 * An array element is rounded up to 8 bytes, so entries are packed 16 (tbl24) and 256
 * (groups, top) to an element: tbl24 costs 64 MiB, a group 1,032 bytes (8 MiB for 8,192;
 * the number of groups is the map's max_entries, set at load).
 * (Older builds kept IPv4 in an LPM trie, then in drop_dst_tbl8, whose groups repeated
 * the /24's answer in every entry, then in tbl24 and groups alone, prefixes of /8 and
 * shorter included (no drop_dst_top): the manager moves such a filter to these maps.)
 */
enum dir24_layout {
	DIR24_LENGTH_SHIFT = 16,
	DIR24_GROUP_BIT = 31,
	DIR24_BLOCK_ENTRIES = 16,
	DIR24_BLOCKS = 1048576,        /* 2^24 entries, 16 to a block */
	DIR24_GROUP_ENTRIES = 256,
	DIR24_GROUPS = 8192,           /* default number of groups */
	DIR24_RETIRED = 1073741824,    /* 1 << 30: dir24_group.state of an unlinked group */
	DIR24_TOP_LENGTH = 8,          /* prefixes this long or shorter are in drop_dst_top */
	DIR24_TOP_ENTRIES = 256,
};
ABI_EXPORT_ENUM(dir24_layout);

struct dir24_block {
	__u32 entry[DIR24_BLOCK_ENTRIES];
};

struct dir24_group {
	__u32 entry[DIR24_GROUP_ENTRIES];
	__u32 state;     /* control plane only: 0 free, n + 1 in use by /24 number n, or
			  * DIR24_RETIRED */
	__u32 covering;  /* the entry of the /24's longest prefix of /24 or shorter (0: none),
			  * the answer wherever `entry` is 0 */
};

struct dir24_top {
	__u32 entry[DIR24_TOP_ENTRIES]; /* per /8: its longest prefix of /8 or shorter */
};

struct lpm_v6_key {
	__u32 prefixlen;
	__u8 addr[16];
};

/* Token buckets (rate-limit, syn-guard). Exact integer arithmetic in units of 1/10^9
 * token: a bucket holds at most burst * 10^9; `elapsed_ns * pps` is added at packet time
 * (bpf_ktime_get_ns, no timers) and a packet takes 10^9. CPUs share a bucket through
 * compare-and-swap (LRU maps cannot hold a bpf_spin_lock): a token is never spent twice and
 * a span of time never refills twice; a CPU that loses four races in a row on one packet
 * counts it as over the rate (errs toward dropping, only under contention). */
enum filter_guard {
	FILTER_GUARD_RATE = 0,   /* per-source rate limit */
	FILTER_GUARD_SYN = 1,    /* per-destination (address, port) SYN rate limit */
	FILTER_GUARD_MAX = 2,
	FILTER_TOKEN = 1000000000, /* one token, in bucket units */
	FILTER_BUCKETS = 65536,    /* default LRU size of each bucket map */
};
ABI_EXPORT_ENUM(filter_guard);

struct guard_config {
	__u32 rule_id;   /* 0: the guard is off */
	__u32 pps;       /* tokens added per second */
	__u32 burst;     /* bucket size, in packets */
	__u8 prefix_len4; /* rate-limit: the source prefix a bucket covers (32: per address) */
	__u8 prefix_len6; /* rate-limit: the same for IPv6 (128: per address) */
	__u8 pad[2];
};

struct guard_bucket_key {
	__u8 family;     /* 4 or 6 */
	__u8 protocol;   /* syn-guard: IPPROTO_TCP; rate-limit: 0 */
	__u16 port;      /* syn-guard: destination port; rate-limit: 0 */
	__u8 addr[16];   /* masked to the prefix (rate-limit) or the destination (syn-guard) */
};

struct token_bucket {
	__u64 tokens;    /* in 1/FILTER_TOKEN token */
	__u64 updated_ns;
};

struct guard_key {
	__u8 protocol;   /* IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP */
	__u8 pad;
	__u16 port;      /* destination port */
};

struct flow_key {
	__u8 src[16];
	__u8 dst[16];
	__u16 port;      /* destination port */
	__u8 protocol;
	__u8 family;     /* 4 or 6 */
};

enum filter_feature {
	FILTER_FEATURE_DROP_DST = 1,
	FILTER_FEATURE_DROP_PROTO = 2,
	FILTER_FEATURE_ALLOW_ONLY = 4,
	FILTER_FEATURE_DROP_SRC = 8,
	FILTER_FEATURE_RATE_LIMIT = 16,
	FILTER_FEATURE_SYN_GUARD = 32,
};
ABI_EXPORT_ENUM(filter_feature);

struct filter_meta {
	__u32 instance;  /* unique per attachment; events carry it */
	__u32 ifindex;   /* at attach time */
	__u32 features;  /* enum filter_feature bits the loaded program has enabled */
	__u8 hook;       /* enum filter_hook */
	__u8 xdp_mode;   /* enum filter_xdp_mode (XDP only) */
	__u8 pad[2];
	__u32 tc_handle; /* clsact fallback only (tcx links are pinned instead) */
	__u32 tc_priority;
};

struct filter_event {
	struct event_header hdr;
	__u32 instance;  /* filter_meta.instance of the program that dropped */
	__u32 ifindex;
	__u32 rule_id;
	__u32 pkt_len;
	__u8 hook;       /* enum filter_hook */
	__u8 family;     /* 4 or 6 */
	__u8 protocol;
	__u8 pad;
	__u16 sport;
	__u16 dport;
	__u8 src[16];
	__u8 dst[16];
};

#endif
