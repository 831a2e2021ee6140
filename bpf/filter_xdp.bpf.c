// SPDX-License-Identifier: GPL-2.0
/* `membrane filter drop-dst` and `drop-proto`: one XDP program per device.
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

/* The IPv4 deny list as written: the control plane's record (list, remove, rule ids).
 * The program never reads it; it reads the DIR-24-8 tables below. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FILTER_MAX_RULES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v4_key);
	__type(value, __u32);
} drop_dst_v4 SEC(".maps");

/* IPv4 lookups in one to four array reads whatever the prefixes (see abi/filter.h). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DIR24_BLOCKS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct dir24_block);
} drop_dst_tbl24 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DIR24_GROUPS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct dir24_group);
} drop_dst_groups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct dir24_top);
} drop_dst_top SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, FILTER_MAX_RULES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v6_key);
	__type(value, __u32);
} drop_dst_v6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} drop_proto SEC(".maps");

static __always_inline __u32 match_dst(const struct pkt *p)
{
	__u32 *rule;

	if (p->family == 4) {
		struct dir24_block *block;
		struct dir24_group *group;
		struct dir24_top *top;
		__u32 dst, index, entry;

		__builtin_memcpy(&dst, p->dst, 4);
		dst = bpf_ntohl(dst);
		index = dst >> 8;
		block = bpf_map_lookup_elem(&drop_dst_tbl24, &(__u32){ index / DIR24_BLOCK_ENTRIES });
		if (!block)
			return 0;
		/* one load: the control plane may rewrite the entry meanwhile */
		entry = *(volatile __u32 *)&block->entry[index % DIR24_BLOCK_ENTRIES];
		if (entry & (1U << DIR24_GROUP_BIT)) {
			index = entry & ~(1U << DIR24_GROUP_BIT);
			group = bpf_map_lookup_elem(&drop_dst_groups, &index);
			if (!group)
				return 0;
			entry = *(volatile __u32 *)&group->entry[dst & 0xff];
			if (!entry) /* no prefix longer than /24: the /24's own answer */
				entry = *(volatile __u32 *)&group->covering;
		}
		if (!entry) { /* no prefix of /9 or longer: the /8's longest of /8 or shorter */
			top = bpf_map_lookup_elem(&drop_dst_top, &(__u32){ 0 });
			if (!top)
				return 0;
			entry = *(volatile __u32 *)&top->entry[dst >> 24];
		}
		return entry & ((1U << DIR24_LENGTH_SHIFT) - 1);
	} else {
		struct lpm_v6_key key = { .prefixlen = 128 };

		__builtin_memcpy(key.addr, p->dst, 16);
		rule = bpf_map_lookup_elem(&drop_dst_v6, &key);
	}
	return rule ? *rule : 0;
}

static __always_inline __u32 match_proto(const struct pkt *p)
{
	__u32 index = p->protocol;
	__u32 *rule = bpf_map_lookup_elem(&drop_proto, &index);

	return rule ? *rule : 0;
}

SEC("xdp")
int filter_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 len = data_end - data;
	struct pkt p = {};
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
		rule = match_dst(&p);
	if (!rule && enable_drop_proto) {
		if (res == PARSE_ADDRS)
			goto unparsed;
		rule = match_proto(&p);
	}
	if (rule) {
		count_rule(rule, len);
		count_stat(FILTER_STAT_DROPPED, len);
		report_drop(&p, ctx->ingress_ifindex, FILTER_HOOK_XDP, rule, len);
		return XDP_DROP;
	}
	count_stat(FILTER_STAT_PASSED, len);
	return XDP_PASS;
unparsed:
	count_stat(FILTER_STAT_UNPARSED, len);
	count_stat(FILTER_STAT_PASSED, len);
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
