// SPDX-License-Identifier: GPL-2.0
/* `membrane filter drop-dst`, `drop-src`, `drop-proto`, `rate-limit` and `syn-guard`:
 * one XDP program per device. Deny lists come first, then the token-bucket guards, so a
 * listed packet never spends a token.
 *
 * Load-time constants switch each filter on, so a device pays only for the filters it
 * has; adding the other filter reloads the program (maps are pinned and reused) and
 * swaps it in with bpf_link_update. Packets whose headers cannot be read far enough for
 * a rule are passed and counted as unparsed: a filter never drops what no rule names.
 */
#include "include/common.h"
#include "lib/filter.h"

const volatile bool enable_drop_dst = false;
const volatile bool enable_drop_proto = false;
const volatile bool enable_drop_src = false;
const volatile bool enable_rate_limit = false;
const volatile bool enable_syn_guard = false;

/* A deny list of prefixes, by the address it judges (drop_dst_*, drop_src_*):
 *   <dir>_v4      the IPv4 list as written: the control plane's record (list, remove, rule
 *                 ids); the program never reads it, it reads the DIR-24-8 tables
 *   <dir>_tbl24, <dir>_groups, <dir>_top   IPv4 lookups in one to four array reads
 *                 whatever the prefixes (see abi/filter.h)
 *   <dir>_v6      LPM trie */
#define PREFIX_LIST_MAPS(dir)                                         \
	struct {                                                      \
		__uint(type, BPF_MAP_TYPE_HASH);                      \
		__uint(max_entries, FILTER_MAX_RULES);                \
		__uint(map_flags, BPF_F_NO_PREALLOC);                 \
		__type(key, struct lpm_v4_key);                       \
		__type(value, __u32);                                 \
	} dir##_v4 SEC(".maps");                                      \
	struct {                                                      \
		__uint(type, BPF_MAP_TYPE_ARRAY);                     \
		__uint(max_entries, DIR24_BLOCKS);                    \
		__uint(map_flags, BPF_F_MMAPABLE);                    \
		__type(key, __u32);                                   \
		__type(value, struct dir24_block);                    \
	} dir##_tbl24 SEC(".maps");                                   \
	struct {                                                      \
		__uint(type, BPF_MAP_TYPE_ARRAY);                     \
		__uint(max_entries, DIR24_GROUPS);                    \
		__uint(map_flags, BPF_F_MMAPABLE);                    \
		__type(key, __u32);                                   \
		__type(value, struct dir24_group);                    \
	} dir##_groups SEC(".maps");                                  \
	struct {                                                      \
		__uint(type, BPF_MAP_TYPE_ARRAY);                     \
		__uint(max_entries, 1);                               \
		__uint(map_flags, BPF_F_MMAPABLE);                    \
		__type(key, __u32);                                   \
		__type(value, struct dir24_top);                      \
	} dir##_top SEC(".maps");                                     \
	struct {                                                      \
		__uint(type, BPF_MAP_TYPE_LPM_TRIE);                  \
		__uint(max_entries, FILTER_MAX_RULES);                \
		__uint(map_flags, BPF_F_NO_PREALLOC);                 \
		__type(key, struct lpm_v6_key);                       \
		__type(value, __u32);                                 \
	} dir##_v6 SEC(".maps")

PREFIX_LIST_MAPS(drop_dst);
PREFIX_LIST_MAPS(drop_src);

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} drop_proto SEC(".maps");

/* The rule of the longest prefix of a list holding `addr` (0: none). */
static __always_inline __u32 match_prefix(const __u8 *addr, __u8 family, void *tbl24,
					  void *groups, void *top, void *v6)
{
	__u32 *rule;

	if (family == 4) {
		struct dir24_block *block;
		struct dir24_group *group;
		struct dir24_top *top_entries;
		__u32 ip, index, entry;

		__builtin_memcpy(&ip, addr, 4);
		ip = bpf_ntohl(ip);
		index = ip >> 8;
		block = bpf_map_lookup_elem(tbl24, &(__u32){ index / DIR24_BLOCK_ENTRIES });
		if (!block)
			return 0;
		/* one load: the control plane may rewrite the entry meanwhile */
		entry = *(volatile __u32 *)&block->entry[index % DIR24_BLOCK_ENTRIES];
		if (entry & (1U << DIR24_GROUP_BIT)) {
			index = entry & ~(1U << DIR24_GROUP_BIT);
			group = bpf_map_lookup_elem(groups, &index);
			if (!group)
				return 0;
			entry = *(volatile __u32 *)&group->entry[ip & 0xff];
			if (!entry) /* no prefix longer than /24: the /24's own answer */
				entry = *(volatile __u32 *)&group->covering;
		}
		if (!entry) { /* no prefix of /9 or longer: the /8's longest of /8 or shorter */
			top_entries = bpf_map_lookup_elem(top, &(__u32){ 0 });
			if (!top_entries)
				return 0;
			entry = *(volatile __u32 *)&top_entries->entry[ip >> 24];
		}
		return entry & ((1U << DIR24_LENGTH_SHIFT) - 1);
	} else {
		struct lpm_v6_key key = { .prefixlen = 128 };

		__builtin_memcpy(key.addr, addr, 16);
		rule = bpf_map_lookup_elem(v6, &key);
	}
	return rule ? *rule : 0;
}

#define match_list(p, field, dir) \
	match_prefix((p)->field, (p)->family, &dir##_tbl24, &dir##_groups, &dir##_top, &dir##_v6)

static __always_inline __u32 match_proto(const struct pkt *p)
{
	__u32 index = p->protocol;
	__u32 *rule = bpf_map_lookup_elem(&drop_proto, &index);

	return rule ? *rule : 0;
}

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, FILTER_GUARD_MAX);
	__type(key, __u32);
	__type(value, struct guard_config);
} guard_config SEC(".maps");

/* LRU: a spoofed flood of new sources evicts the least recently seen buckets instead of
 * filling the map (an evicted source starts again with a full bucket: the approximation,
 * which a map larger than the number of sources seen within burst / pps avoids). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FILTER_BUCKETS);
	__type(key, struct guard_bucket_key);
	__type(value, struct token_bucket);
} rate_buckets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FILTER_BUCKETS);
	__type(key, struct guard_bucket_key);
	__type(value, struct token_bucket);
} syn_buckets SEC(".maps");

#define CAS_TRIES 4

/* Take a token from the bucket of `key` (a new bucket starts full); false if it is empty.
 * Lock-free (see struct token_bucket): the CPU whose compare-and-swap moves updated_ns from
 * `last` to `now` owns that span and adds its tokens, so no span refills twice. */
static __always_inline bool take_token(void *buckets, const struct guard_bucket_key *key,
				       const struct guard_config *cfg)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 cap = (__u64)cfg->burst * FILTER_TOKEN;
	__u64 pps = cfg->pps, last, old, fill, want;
	struct token_bucket *b;

	b = bpf_map_lookup_elem(buckets, key);
	if (!b) {
		struct token_bucket fresh = { .tokens = cap, .updated_ns = now };

		/* BPF_NOEXIST: another CPU may have made it meanwhile; then its bucket counts */
		bpf_map_update_elem(buckets, key, &fresh, BPF_NOEXIST);
		b = bpf_map_lookup_elem(buckets, key);
		if (!b)
			return true; /* evicted at once under a flood of new keys: let it be */
	}
	last = *(volatile __u64 *)&b->updated_ns;
	if (now > last && __sync_val_compare_and_swap(&b->updated_ns, last, now) == last) {
		/* elapsed * pps cannot overflow: past cap / pps the bucket is full anyway */
		fill = now - last > cap / pps ? cap : (now - last) * pps;
		for (int i = 0; i < CAS_TRIES; i++) {
			old = *(volatile __u64 *)&b->tokens;
			want = old + fill > cap ? cap : old + fill; /* also trims a lowered burst */
			if (__sync_val_compare_and_swap(&b->tokens, old, want) == old)
				break;
		}
	}
	for (int i = 0; i < CAS_TRIES; i++) {
		old = *(volatile __u64 *)&b->tokens;
		if (old < FILTER_TOKEN)
			return false;
		if (__sync_val_compare_and_swap(&b->tokens, old, old - FILTER_TOKEN) == old)
			return true;
	}
	return false;
}

static __always_inline const struct guard_config *guard(__u32 which)
{
	const struct guard_config *cfg = bpf_map_lookup_elem(&guard_config, &which);

	return cfg && cfg->rule_id && cfg->pps && cfg->burst ? cfg : NULL;
}

/* Keep the first `len` bits of a 16-byte address. */
static __always_inline void mask_prefix(__u8 *addr, __u32 len)
{
#pragma unroll
	for (int i = 0; i < 16; i++) {
		if (len <= i * 8)
			addr[i] = 0;
		else if (len < i * 8 + 8)
			addr[i] &= 0xff << (i * 8 + 8 - len);
	}
}

/* The rate-limit rule if the packet's source (prefix) is over its rate, else 0. */
static __always_inline __u32 rate_limited(const struct pkt *p)
{
	const struct guard_config *cfg = guard(FILTER_GUARD_RATE);
	struct guard_bucket_key key = { .family = p->family };

	if (!cfg)
		return 0;
	__builtin_memcpy(key.addr, p->src, 16);
	mask_prefix(key.addr, p->family == 4 ? cfg->prefix_len4 : cfg->prefix_len6);
	return take_token(&rate_buckets, &key, cfg) ? 0 : cfg->rule_id;
}

/* The syn-guard rule if the packet is a TCP SYN (without ACK) over the rate of its
 * destination address and port, else 0. */
static __always_inline __u32 syn_limited(const struct pkt *p, void *data, void *data_end)
{
	struct guard_bucket_key key = {
		.family = p->family, .protocol = IPPROTO_TCP, .port = p->dport
	};
	const struct guard_config *cfg;
	__u32 off = p->l3_off + p->l4_rel + 13; /* TCP flags */
	__u8 *flags;

	if (off > 0x3fff) /* the verifier wants packet offsets well below 64 KiB */
		return 0;
	flags = data + off;
	if ((void *)(flags + 1) > data_end || (*flags & 0x12) != 0x02) /* SYN, not ACK */
		return 0;
	cfg = guard(FILTER_GUARD_SYN);
	if (!cfg)
		return 0;
	__builtin_memcpy(key.addr, p->dst, 16);
	return take_token(&syn_buckets, &key, cfg) ? 0 : cfg->rule_id;
}

SEC("xdp")
int filter_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 len = data_end - data;
	struct pkt p = {};
	bool unparsed = false;
	__u32 rule = 0;
	int res;

	res = parse_packet(data, data_end, &p);
	if (res == PARSE_NOT_IP) {
		count_stat(FILTER_STAT_PASSED, len);
		return XDP_PASS;
	}
	if (res == PARSE_TRUNCATED)
		goto unparsed;
	if (enable_drop_dst)
		rule = match_list(&p, dst, drop_dst);
	if (!rule && enable_drop_src)
		rule = match_list(&p, src, drop_src);
	if (!rule && enable_drop_proto) {
		if (res == PARSE_ADDRS)
			unparsed = true; /* the protocol rule cannot judge it; the guards still can */
		else
			rule = match_proto(&p);
	}
	if (!rule && enable_rate_limit)
		rule = rate_limited(&p);
	if (!rule && enable_syn_guard && res == PARSE_L4 && p.protocol == IPPROTO_TCP)
		rule = syn_limited(&p, data, data_end);
	if (rule) {
		count_rule(rule, len);
		count_stat(FILTER_STAT_DROPPED, len);
		report_drop(&p, ctx->ingress_ifindex, FILTER_HOOK_XDP, rule, len);
		return XDP_DROP;
	}
	if (unparsed)
		count_stat(FILTER_STAT_UNPARSED, len);
	count_stat(FILTER_STAT_PASSED, len);
	return XDP_PASS;
unparsed:
	count_stat(FILTER_STAT_UNPARSED, len);
	count_stat(FILTER_STAT_PASSED, len);
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
